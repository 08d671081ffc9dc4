"""What a replay found: each burst's new reply against the recorded one (exact, changed,
missing, extra), per conversation and in all, with the reply latencies."""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass
from typing import Any

from daemon.tools.bursts import spread

STATUSES = ("exact", "changed", "missing", "extra")
DIFFERENCES = ("changed", "missing", "extra")


def classify(expected: str | None, got: str | None) -> str:
    if expected is None:
        return "exact" if got is None else "extra"
    if got is None:
        return "missing"
    return "exact" if got == expected else "changed"


@dataclass(frozen=True)
class TurnResult:
    conversation: str
    where: str  # the burst's first line
    sent: list[str]  # what the lead said in the burst
    expected: str | None  # the recorded reply parts, joined
    parts: list[str]  # the reply now, as WhatsApp messages
    latency: float | None  # seconds: last message posted -> reply's first part delivered
    status: str

    @property
    def got(self) -> str | None:
        return "\n\n".join(self.parts) if self.parts else None

    def diff(self) -> list[str]:
        old, new = (self.expected or "").splitlines(), (self.got or "").splitlines()
        return list(difflib.unified_diff(old, new, "recorded", "replayed", n=1, lineterm=""))


@dataclass
class ConversationResult:
    id: str
    phone: str
    turns: list[TurnResult]

    def counts(self) -> dict[str, int]:
        return _counts(self.turns)

    def latency(self) -> dict[str, float | None]:
        return spread([t.latency for t in self.turns if t.latency is not None])


@dataclass
class ReplayReport:
    target: str
    speed: float
    conversations: list[ConversationResult]
    elapsed: float

    @property
    def turns(self) -> list[TurnResult]:
        return [t for c in self.conversations for t in c.turns]

    def counts(self) -> dict[str, int]:
        return _counts(self.turns)

    def differences(self) -> int:
        counts = self.counts()
        return sum(counts[s] for s in DIFFERENCES)

    def latency(self) -> dict[str, float | None]:
        return spread([t.latency for t in self.turns if t.latency is not None])

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "speed": self.speed,
            "elapsed_s": self.elapsed,
            "counts": self.counts(),
            "differences": self.differences(),
            "latency_s": self.latency(),
            "conversations": [
                {
                    "id": c.id,
                    "phone": c.phone,
                    "counts": c.counts(),
                    "latency_s": c.latency(),
                    "turns": [
                        {
                            "line": t.where,
                            "status": t.status,
                            "sent": t.sent,
                            "expected": t.expected,
                            "got": t.got,
                            "parts": t.parts,
                            "latency_s": t.latency,
                        }
                        for t in c.turns
                    ],
                }
                for c in self.conversations
            ],
        }


def _counts(turns: list[TurnResult]) -> dict[str, int]:
    seen = Counter(t.status for t in turns)
    return {s: seen[s] for s in STATUSES}
