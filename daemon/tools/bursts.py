"""Per-burst accounting of a bench run: what happened to each burst a simulated lead sent.

Pure: the inputs are the bursts as the leads sent them, what the daemon's database says
became of each message (its turn) and when each turn's reply reached the lead (the fake
Evolution API's arrival times); nothing here touches a database or a clock, so the figures
can be checked on hand-made cases.

A burst is one of (in this order of precedence):
- **refused**: none of its posts was accepted (no 200): the daemon never took it;
- **lost**: a message accepted with 200 is not in the database (a durability bug);
- **unanswered**: a stored message has no turn, or its turn's reply never arrived by the
  end of the run;
- **split**: its messages were answered by more than one turn (the lead got several
  replies, each to a part of what it said);
- **whole**: all its messages in exactly one turn, whose reply arrived.

`response` (whole and split bursts) = the burst's last accepted message -> the arrival of
the first part of the reply *whose turn contains that last message*. Not the first reply
after it: with a split burst that one may answer an earlier part. `lead wait` = the last
accepted message -> the first reply the lead received after it, whatever it answers (what
the lead experiences)."""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

OUTCOMES = ("whole", "split", "lost", "unanswered", "refused")
MAX_PROBLEMS = 10  # lost/unanswered bursts listed by id in the figures


@dataclass
class SentBurst:
    """One burst as a simulated lead sent it."""

    phone: str
    ids: list[str] = field(default_factory=list)  # provider message ids, in the order sent
    accepted: list[float | None] = field(default_factory=list)  # time.time() of each 200; None: failed

    def add(self, message_id: str, accepted_at: float | None) -> None:
        self.ids.append(message_id)
        self.accepted.append(accepted_at)

    @property
    def failed(self) -> int:
        """Posts of this burst not answered 200."""
        return sum(1 for t in self.accepted if t is None)

    @property
    def last(self) -> tuple[str, float] | None:
        """The last accepted message: (id, accepted at), or None."""
        for message_id, at in zip(reversed(self.ids), reversed(self.accepted), strict=True):
            if at is not None:
                return message_id, at
        return None


@dataclass(frozen=True)
class BurstOutcome:
    kind: str  # one of OUTCOMES
    replies: int  # distinct turns answering its messages whose reply arrived
    response: float | None  # seconds; whole and split bursts only
    lead_wait: float | None  # seconds; None if no reply arrived after its last message


def classify(
    burst: SentBurst,
    stored: Mapping[str, int | None],
    deliveries: Mapping[int, Sequence[float]],
    received: Sequence[float] = (),
) -> BurstOutcome:
    """One burst's outcome.

    `stored`: provider message id -> its turn id (None: stored, no turn yet); an id absent
    is not in the database. `deliveries`: turn id -> the arrival times of its reply's
    parts, in part order (absent or empty: nothing arrived). `received`: every reply
    arrival the lead saw, sorted (for the lead wait)."""
    last = burst.last
    lead_wait = None
    if last is not None:
        i = bisect.bisect_right(received, last[1])
        lead_wait = received[i] - last[1] if i < len(received) else None
    # The burst's messages the daemon saw: accepted ones, and failed posts it stored anyway.
    seen = [(m, at) for m, at in zip(burst.ids, burst.accepted, strict=True) if at is not None or m in stored]
    turns = list(dict.fromkeys(stored[m] for m, _ in seen if m in stored))
    replies = sum(1 for t in turns if t is not None and deliveries.get(t))
    if last is None:
        return BurstOutcome("refused", replies, None, lead_wait)
    if any(at is not None and m not in stored for m, at in seen):
        return BurstOutcome("lost", replies, None, lead_wait)
    if any(t is None or not deliveries.get(t) for t in turns):
        return BurstOutcome("unanswered", replies, None, lead_wait)
    turn = stored[last[0]]
    assert turn is not None
    response = deliveries[turn][0] - last[1]
    return BurstOutcome("whole" if len(turns) == 1 else "split", replies, response, lead_wait)


@dataclass
class BurstFigures:
    """The per-burst figures of one profile's run."""

    outcomes: list[BurstOutcome]
    sizes: list[int]  # messages per burst, as sent
    turns: int
    discarded: int  # agent calls whose reply was thrown away (discarded_replies)
    cpu_seconds: float | None  # the daemon's user+system CPU over the run; None: not measured
    # The first lost and unanswered bursts (kind, phone, message ids): where a post-mortem starts.
    problems: list[dict[str, Any]] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind)

    def summary(self) -> dict[str, Any]:
        bursts = len(self.outcomes)
        counts = Counter(o.kind for o in self.outcomes)
        multi = sum(1 for n in self.sizes if n >= 2)
        split = counts["split"]
        answered = [o for o in self.outcomes if o.kind in ("whole", "split")]
        replies = [o.replies for o in answered]
        return {
            "bursts_by_outcome": {k: counts[k] for k in OUTCOMES},
            "multi_message_bursts": multi,
            "split_rate": ratio(split, bursts),  # of all bursts
            "split_rate_multi": ratio(split, multi),  # of the bursts of 2+ messages
            "replies_per_burst": ratio(sum(replies), len(replies)),  # answered bursts
            "replies_hist": {str(k): v for k, v in sorted(Counter(replies).items())},
            "response_s": spread([o.response for o in answered if o.response is not None]),
            "lead_wait_s": spread([o.lead_wait for o in self.outcomes if o.lead_wait is not None]),
            "discarded_replies": self.discarded,
            "agent_calls_per_turn": ratio(self.turns + self.discarded, self.turns),
            "cpu_s": self.cpu_seconds,
            "cpu_s_per_turn": None if self.cpu_seconds is None else ratio(self.cpu_seconds, self.turns),
            "problem_bursts": self.problems,
        }


def ratio(x: float, y: float) -> float | None:
    return x / y if y else None


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def spread(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "n": len(values),
    }


def account(
    bursts: Iterable[SentBurst],
    stored: Mapping[str, int | None],
    deliveries: Mapping[int, Sequence[float]],
    *,
    turns: int,
    discarded: int = 0,
    cpu_seconds: float | None = None,
) -> BurstFigures:
    """Every burst's outcome; a lead's received replies are those of the turns that
    answered its messages (every reply in a bench answers some message of its lead)."""
    bursts = list(bursts)
    answering: dict[str, set[int]] = {}
    for b in bursts:
        answering.setdefault(b.phone, set()).update(t for m in b.ids if (t := stored.get(m)) is not None)
    received = {
        phone: sorted(at for t in turns_of for at in deliveries.get(t, ())) for phone, turns_of in answering.items()
    }
    outcomes = [classify(b, stored, deliveries, received.get(b.phone, ())) for b in bursts]
    if cpu_seconds is not None and not math.isfinite(cpu_seconds):
        cpu_seconds = None
    problems = [
        {"kind": o.kind, "phone": b.phone, "ids": b.ids, "turns": [stored.get(m, "not stored") for m in b.ids]}
        for b, o in zip(bursts, outcomes, strict=True)
        if o.kind in ("lost", "unanswered")
    ][:MAX_PROBLEMS]
    return BurstFigures(outcomes, [len(b.ids) for b in bursts], turns, discarded, cpu_seconds, problems)
