"""How well the knowledge base answers leads' questions: question -> expected entry pairs
(`knowledge/eval.jsonl`), run through each search method, scored by recall@1, recall@3
and mean reciprocal rank (of the first expected entry within the top 10)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from daemon.errors import ConfigError
from daemon.knowledge.search import Degraded, KnowledgeSearch

DEPTH = 10  # MRR looks this far down; an entry below it counts 0


@dataclass(frozen=True)
class Case:
    question: str
    expected: tuple[str, ...]  # keys; any of them answers the question


@dataclass
class Score:
    method: str
    cases: int = 0
    at_1: int = 0
    at_3: int = 0
    reciprocal: float = 0.0
    misses: list[tuple[str, list[str]]] = field(default_factory=list)  # (question, the top 3 keys)

    @property
    def recall_1(self) -> float:
        return self.at_1 / self.cases if self.cases else 0.0

    @property
    def recall_3(self) -> float:
        return self.at_3 / self.cases if self.cases else 0.0

    @property
    def mrr(self) -> float:
        return self.reciprocal / self.cases if self.cases else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "cases": self.cases,
            "recall_at_1": round(self.recall_1, 4),
            "recall_at_3": round(self.recall_3, 4),
            "mrr": round(self.mrr, 4),
            "misses": [{"question": q, "top3": top} for q, top in self.misses],
        }


def read_cases(path: Path) -> list[Case]:
    """JSON lines {"question": str, "expected": [key, ...]}; a bad line is a ConfigError
    naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.__class__.__name__}") from None
    cases = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, expected = row["question"], row["expected"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f'{path}:{n}: not a case; each line is {{"question": "...", "expected": ["key", ...]}}'
            ) from None
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{path}:{n}: question must be non-empty text")
        if not isinstance(expected, list) or not expected or not all(isinstance(k, str) for k in expected):
            raise ConfigError(f"{path}:{n}: expected must be a non-empty list of entry keys")
        cases.append(Case(question, tuple(expected)))
    if not cases:
        raise ConfigError(f"{path}: no cases")
    return cases


async def evaluate(search: KnowledgeSearch, cases: list[Case], methods: tuple[str, ...]) -> list[Score]:
    """Each method on every case, in order; a question whose embedding failed counts as a
    miss for the methods that needed it (not as full-text: that would flatter them)."""
    scores = []
    for method in methods:
        score = Score(method)
        for case in cases:
            try:
                keys = [r.key for r in await search.search(case.question, DEPTH, method)]
            except Degraded:
                keys = []
            score.cases += 1
            rank = next((i for i, k in enumerate(keys, start=1) if k in case.expected), None)
            if rank is not None:
                score.at_1 += rank == 1
                score.at_3 += rank <= 3
                score.reciprocal += 1 / rank
            if rank != 1:
                score.misses.append((case.question, keys[:3]))
        scores.append(score)
    return scores
