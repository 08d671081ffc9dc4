"""`sdrctl replay` and `sdrctl export`: recorded conversations through the real pipeline."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from daemon.config import Config, load_config
from daemon.embedded import Endpoints
from daemon.errors import ConfigError
from daemon.evolution import split_message
from daemon.tools.replay import parse_file, parse_lines, pseudonym, replay
from tests.helpers import FAST_PROFILE, REPO, run_daemon
from tests.helpers import sdrctl as run_cli

SOLAR = REPO / "replays" / "solar.jsonl"
FAST = "200"  # --speed where the recorded spacing does not matter: the tests run quicker


async def sdrctl(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    return await run_cli(*args, env=env, timeout=timeout)


def solar_lines(*conversations: str) -> list[dict[str, object]]:
    docs = [json.loads(line) for line in SOLAR.read_text().splitlines()]
    return [d for d in docs if d["conversation"] in conversations]


def write_jsonl(path: Path, docs: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return path


def by_lead(docs: list[dict[str, object]]) -> dict[str, list[tuple[object, ...]]]:
    """Each lead's messages and replies in order; the lead's times as instants."""
    leads: dict[str, list[tuple[object, ...]]] = {}
    for d in docs:
        ts = datetime.fromisoformat(str(d["ts"])) if d["direction"] == "in" else None
        leads.setdefault(str(d["phone"]), []).append((d["direction"], d["text"], ts))
    return leads


async def fill(config: Config, *conversations: str) -> list[dict[str, object]]:
    """Plays some shipped conversations into the test database through a real daemon
    (over --url, which reads the replies from this database's outbox)."""
    docs = solar_lines(*conversations)
    convs = parse_lines([json.dumps(d) for d in docs], "solar")
    async with run_daemon(config) as d:
        report = await replay(convs, config, url=d.url, speed=float(FAST))
    assert report.counts() == {"exact": len(report.turns), "changed": 0, "missing": 0, "extra": 0}
    return docs


async def test_the_shipped_set_replays_without_differences() -> None:
    shipped = parse_file(SOLAR)
    assert len(shipped) >= 10 and len({c.phone for c in shipped}) == len(shipped)
    bursts = sum(len(c.bursts) for c in shipped)
    code, out, err = await sdrctl("replay", str(SOLAR), "--check", "--speed", "50", "--profile", FAST_PROFILE)
    assert code == 0, out + err
    assert f"{bursts} turns: {bursts} exact, 0 changed, 0 missing, 0 extra" in out
    assert "check passed: 0 difference(s), 0 tolerated" in out


async def test_an_edited_reply_fails_the_check_and_tolerate_accepts_it(tmp_path: Path) -> None:
    docs = solar_lines("c04")
    n, edited = next((i, d) for i, d in enumerate(docs) if d["direction"] == "out" and "Prazer" in str(d["text"]))
    edited["text"] = "Prazer, Diego! Qual é a sua cidade?"
    path = write_jsonl(tmp_path / "edited.jsonl", docs)
    code, out, err = await sdrctl("replay", str(path), "--check", "--speed", FAST, "--profile", FAST_PROFILE)
    assert code == 1, out + err
    # The difference names the conversation and the line of the burst, with a diff.
    assert f"c04 {path}:{n} changed" in out
    assert "-Prazer, Diego! Qual é a sua cidade?" in out
    assert "+Prazer, Diego! Para eu calcular" in out
    assert "check failed: 1 difference(s), 0 tolerated" in out

    code, out, err = await sdrctl(
        "replay",
        str(path),
        "--check",
        "--tolerate",
        "1",
        "--speed",
        FAST,
        "--profile",
        FAST_PROFILE,
        "--json",
        str(tmp_path / "result.json"),
    )
    assert code == 0, out + err
    assert "check passed: 1 difference(s), 1 tolerated" in out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["counts"]["changed"] == 1 and result["differences"] == 1
    [changed] = [t for t in result["conversations"][0]["turns"] if t["status"] == "changed"]
    assert changed["expected"] == "Prazer, Diego! Qual é a sua cidade?"
    assert all(t["latency_s"] > 0 for t in result["conversations"][0]["turns"])


async def test_missing_and_extra_replies_are_differences(tmp_path: Path) -> None:
    docs = solar_lines("c03")
    first_reply = next(i for i, d in enumerate(docs) if d["direction"] == "out")
    # A photo without a caption is not sent for now (no text): its recorded reply is missing.
    photo = {**docs[0], "text": "", "media": {"kind": "image", "ref": "3EB0PHOTO"}}
    recorded = {**docs[first_reply], "text": "Recebi a foto da conta!"}
    docs[first_reply + 1 : first_reply + 1] = [photo, recorded]
    del docs[-1]  # the last burst's reply not recorded: the one it gets now is extra
    path = write_jsonl(tmp_path / "gaps.jsonl", docs)
    code, out, err = await sdrctl("replay", str(path), "--check", "--speed", FAST, "--profile", FAST_PROFILE)
    assert code == 1, out + err
    assert f"c03 {path}:{first_reply + 2} missing" in out
    assert "no reply; recorded: Recebi a foto da conta!" in out
    assert "reply where none was recorded: Sem problemas!" in out
    assert "0 changed, 1 missing, 1 extra" in out
    assert "check failed: 2 difference(s), 0 tolerated" in out


async def test_a_reply_split_into_parts_is_compared_whole() -> None:
    # With short WhatsApp messages, each reply comes as several parts from one turn; the
    # recording holds the parts as separate "out" lines.
    config = load_config(None, FAST_PROFILE, {"SDR_LIMITS_MAX_MESSAGE_LENGTH": "60"})
    docs: list[dict[str, object]] = []
    for d in solar_lines("c01")[:7]:
        if d["direction"] == "out":
            docs += [{**d, "text": part} for part in split_message(str(d["text"]), 60)]
        else:
            docs.append(d)
    assert sum(d["direction"] == "out" for d in docs) > 3
    report = await replay(parse_lines([json.dumps(d) for d in docs], "split"), config, speed=float(FAST))
    [c01] = report.conversations
    assert [t.status for t in c01.turns] == ["exact", "exact", "exact"]
    assert len(c01.turns[0].parts) > 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", ":2: invalid JSON"),
        (
            '{"conversation": "c1", "phone": "5511999990000", "direction": "sideways", "text": "oi", '
            '"ts": "2026-11-20T14:03:05-03:00"}',
            ":2: unknown direction 'sideways'",
        ),
        (
            '{"conversation": "c1", "phone": "5511999990000", "direction": "in", "ts": "2026-11-20T14:03:05-03:00"}',
            ":2: missing field 'text'",
        ),
    ],
)
async def test_a_malformed_line_exits_2_naming_the_line(tmp_path: Path, line: str, message: str) -> None:
    good = solar_lines("c01")[0]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    code, out, err = await sdrctl("replay", str(path), "--profile", FAST_PROFILE)
    assert code == 2
    assert err.startswith(f"error: {path}{message}")
    assert len(err.strip().splitlines()) == 1  # one clear line, no traceback


async def test_an_unreadable_file_exits_2(tmp_path: Path) -> None:
    code, _, err = await sdrctl("replay", str(tmp_path / "nowhere.jsonl"))
    assert code == 2
    assert err.strip() == f"error: {tmp_path / 'nowhere.jsonl'}: cannot be read: No such file or directory"


def test_lines_of_a_conversation_go_in_time_order() -> None:
    first, second = solar_lines("c01")[:2]
    with pytest.raises(ConfigError, match=r"^x:2: ts .* is earlier"):
        parse_lines([json.dumps(second), json.dumps(first)], "x")


async def test_an_export_replays_without_differences(config: Config, clean: Endpoints, tmp_path: Path) -> None:
    recorded = await fill(config, "c02", "c06")
    db = {"SDR_DATABASE_URL": clean.database_url}
    exported = tmp_path / "export.jsonl"
    code, out, err = await sdrctl("export", "--since", "1d", "-o", str(exported), "--profile", FAST_PROFILE, env=db)
    assert code == 0, err
    assert "exported 2 conversation(s)" in err
    lines = [json.loads(x) for x in exported.read_text().splitlines()]
    # The same messages and replies, in the same order, as the recording played in.
    assert by_lead(lines) == by_lead(recorded)
    code, out, err = await sdrctl("replay", str(exported), "--check", "--speed", FAST, "--profile", FAST_PROFILE)
    assert code == 0, out + err
    assert "check passed: 0 difference(s)" in out


async def test_replay_from_the_database_uses_a_fresh_daemon(config: Config, clean: Endpoints) -> None:
    await fill(config, "c05", "c08")
    code, out, err = await sdrctl(
        "replay",
        "--from-db",
        "--lead",
        "5562993210505",
        "--check",
        "--speed",
        FAST,
        "--profile",
        FAST_PROFILE,
        env={"SDR_DATABASE_URL": clean.database_url},
    )
    assert code == 0, out + err
    assert "replaying 1 conversation(s) from database" in err
    assert "6 turns: 6 exact" in out  # a lead already booked in the database would not be


async def test_anonymized_export_masks_phones_stably_and_keeps_the_text(
    config: Config, clean: Endpoints, tmp_path: Path
) -> None:
    recorded = await fill(config, "c01", "c09")
    db = {"SDR_DATABASE_URL": clean.database_url}
    runs = []
    for _ in range(2):
        code, out, err = await sdrctl("export", "--anonymize", "--profile", FAST_PROFILE, env=db)
        assert code == 0, err
        runs.append(out)
    assert runs[0] == runs[1]  # stable: same phone, same pseudonym, run after run
    assert not any(str(d["phone"]) in runs[0] for d in recorded)
    lines = [json.loads(x) for x in runs[0].splitlines()]
    assert all(d["name"] == f"Lead {str(d['phone'])[-4:]}" for d in lines)
    by_conversation = {(d["conversation"], d["phone"], d["name"]) for d in lines}
    assert len(by_conversation) == 2  # one pseudonym (and one name) per lead
    assert {d["phone"] for d in lines} == {pseudonym(p) for p in {str(d["phone"]) for d in recorded}}
    assert all(str(d["phone"]).startswith("55000") and len(str(d["phone"])) == 13 for d in lines)
    assert sorted(d["text"] for d in lines) == sorted(str(d["text"]) for d in recorded)
    # The masked recording still replays: the agent answers what the lead wrote.
    convs = parse_lines(runs[0].splitlines(), "anonymized")
    report = await replay(convs, load_config(None, FAST_PROFILE, {}), speed=float(FAST))
    assert report.differences() == 0 and len(report.turns) == 13
