"""knowledge/eval.jsonl, the question -> expected entry pairs `sdrctl kb eval` scores search on (#19):
well formed, and every expected key names an entry the seed (sql/0002) holds. No database."""

from __future__ import annotations

import json
import re
from typing import Any

from daemon.knowledge.entry import slug
from tests.helpers import REPO

EVAL_FILE = REPO / "knowledge" / "eval.jsonl"
SEED = REPO / "sql" / "0002_seed_knowledge_base.sql"

# Each seeded row opens as  ('category',\n 'Title',\n 'content',\n 'keywords')  with '' for a quote.
_ROW = re.compile(r"^\('(\w+)',\n '((?:[^']|'')*)',\n '((?:[^']|'')*)',\n '((?:[^']|'')*)'\)", re.M)
_FILLER = {"que", "pra", "com", "uma", "uns", "vcs", "para", "por", "mais", "meu", "minha", "isso", "tem", "dos", "das"}


def _seed() -> dict[str, tuple[str, str]]:
    """key -> (title, keywords) for every entry of the seed."""
    text = SEED.read_text(encoding="utf-8")
    rows = _ROW.findall(text)
    assert len(rows) == len(re.findall(r"^\('", text, re.M)), "a seeded row the regex does not read"
    return {slug(title.replace("''", "'")): (title, keywords) for _, title, _, keywords in rows}


def _cases() -> list[dict[str, Any]]:
    lines = EVAL_FILE.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in lines), "blank line in eval.jsonl"
    return [json.loads(line) for line in lines]


def _words(text: str) -> set[str]:
    return {w for w in slug(text).split("-") if len(w) >= 3}


def test_the_seed_has_the_entries_the_eval_set_is_written_against() -> None:
    seed = _seed()
    assert len(seed) == 61
    assert "diferenca-entre-sistema-on-grid-e-off-grid" in seed


def test_every_line_is_a_question_with_its_expected_entries() -> None:
    cases = _cases()
    assert len(cases) >= 70
    for case in cases:
        assert set(case) <= {"question", "expected", "note"}, case
        assert isinstance(case["question"], str), case
        assert 3 <= len(case["question"]) <= 120, case
        expected = case["expected"]
        assert isinstance(expected, list) and 1 <= len(expected) <= 2, case
        assert len(set(expected)) == len(expected), case
        assert isinstance(case.get("note", ""), str), case


def test_every_expected_key_is_a_seeded_entry() -> None:
    seed = _seed()
    unknown = {key for case in _cases() for key in case["expected"] if key not in seed}
    assert not unknown, f"keys with no entry in {SEED.name}: {sorted(unknown)}"


def test_the_set_covers_most_entries() -> None:
    covered = {key for case in _cases() for key in case["expected"]}
    assert len(covered) >= 45, len(covered)


def test_no_question_is_asked_twice() -> None:
    seen: set[str] = set()
    for case in _cases():
        normal = " ".join(case["question"].lower().split())
        assert normal not in seen, case
        seen.add(normal)


def test_most_questions_are_worded_unlike_their_entry() -> None:
    notes = [case.get("note", "") for case in _cases()]
    close = sum(note.startswith("close") for note in notes)
    assert close <= len(notes) / 2, f"{close} of {len(notes)} questions follow the title's wording"


def test_a_question_noted_as_sharing_no_words_shares_none_with_its_entries() -> None:
    seed = _seed()
    for case in _cases():
        if "no shared words" not in case.get("note", ""):
            continue
        entry_words = set().union(*(_words(seed[key][0]) | _words(seed[key][1]) for key in case["expected"]))
        shared = (_words(case["question"]) - _FILLER) & entry_words
        assert not shared, (case, shared)
