"""`sdrctl report`: what the stored turns say about the SLOs in sdr.toml.

Every figure is aggregated inside PostgreSQL (percentile_cont, FILTER, window sums), so a
month of a million turns is read in seconds without pulling rows into Python. All the
queries run in one read-only REPEATABLE READ transaction: the figures share one snapshot
and agree with each other. A turn belongs to the window [start, end) by its finished_at.

Follow-ups are counted apart from the turns (a window may hold follow-ups and no turn): see
FOLLOW_UPS. How bursts were answered (replies that interrupted a lead still typing, replies
thrown away, agent calls per turn): see BurstStats and BURSTS."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from daemon.config import SloSettings
from daemon.durations import duration_option
from daemon.errors import ConfigError

# A turn's life from the buffer to the reply; stages not listed here follow by name.
STAGE_ORDER = ("context", "knowledge", "agent", "store", "send")
# Timeline buckets: the smallest giving at most MAX_POINTS points over the window.
STEPS = tuple(timedelta(minutes=m) for m in (1, 5, 15, 30, 60, 180, 360, 720, 1440, 10080))
MAX_POINTS = 48
HISTOGRAM_BINS = 20
# Sorts of a million rows fit in memory instead of spilling; SET LOCAL, this report only.
WORK_MEM = "64MB"

# Listed (zeros included) in this order, so the JSON keeps its keys; other kinds follow by name.
FOLLOW_UP_KINDS = ("reengage", "nurture", "meeting_confirmation", "meeting_reminder")
REPLY_WITHIN = timedelta(hours=24)  # a lead's message this soon after a follow-up is its reply
# A lead's message this soon after a reply was delivered (not joined to the reply's turn):
# the lead was still typing when we answered. `--interrupt-window` changes it, within the bounds.
INTERRUPT_WINDOW = timedelta(seconds=5)
INTERRUPT_WINDOW_MIN_S, INTERRUPT_WINDOW_MAX_S = 0.1, 60.0


# --- the window ------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    def describe(self) -> str:
        return f"{_iso(self.start)} and {_iso(self.end)}"


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(option: str, text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"{option} {text!r}: use an ISO 8601 date or time, such as 2026-11-01 or 2026-11-01T14:00:00-03:00"
        ) from None
    return when if when.tzinfo else when.astimezone()  # a bare date or time is local time


def interrupt_window(text: str | float) -> timedelta:
    """--interrupt-window: seconds after a delivered reply in which a lead's message means
    the reply interrupted a burst; whole microseconds (the database's resolution)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and INTERRUPT_WINDOW_MIN_S <= seconds <= INTERRUPT_WINDOW_MAX_S):
        raise ConfigError(
            f"--interrupt-window {text!r}: use a number of seconds from {INTERRUPT_WINDOW_MIN_S:g} to "
            f"{INTERRUPT_WINDOW_MAX_S:g}, such as 5: how soon after a reply is delivered a message of the "
            "lead means it was still typing"
        )
    return timedelta(microseconds=round(seconds * 1_000_000))


def resolve_window(since: str | None, start: str | None, end: str | None, now: datetime | None = None) -> Window:
    """--since D (up to now; 24h by default), or --from T [--to T] (--to defaults to now)."""
    if since is not None and (start is not None or end is not None):
        raise ConfigError("use either --since or --from/--to, not both")
    if end is not None and start is None:
        raise ConfigError("--to needs --from (or use --since for a window up to now)")
    now = now or datetime.now(UTC)
    if start is None:
        return Window(now - timedelta(seconds=duration_option("--since", since or "24h")), now)
    window = Window(parse_time("--from", start), parse_time("--to", end) if end else now)
    if window.start >= window.end:
        raise ConfigError(f"--from {start!r} must be before --to ({_iso(window.end)})")
    return window


# --- the result --------------------------------------------------------------------------


@dataclass(frozen=True)
class Kpi:
    key: str
    label: str
    value: float | None  # None: not measured in this window (e.g. no cache lookups)
    unit: str  # ms | ratio | count
    target: float | None = None  # None: shown for context, no SLO
    objective: str | None = None  # "max": at most the target; "min": at least it

    @property
    def shown(self) -> str:
        """The unit people read: rates as percentages (JSON keeps ratios)."""
        return "percent" if self.key.endswith("_rate") else self.unit

    def text(self) -> str:
        return format_value(self.value, self.shown)

    @property
    def met(self) -> bool | None:
        """None when there is no target or nothing to compare: neither met nor missed."""
        if self.target is None or self.value is None:
            return None
        return self.value <= self.target if self.objective == "max" else self.value >= self.target


@dataclass(frozen=True)
class StageStats:
    stage: str
    turns: int  # turns that recorded a time for this stage
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    timeouts: int
    failures: int


@dataclass(frozen=True)
class SlowTurn:
    turn_id: int
    phone: str
    name: str | None
    finished_at: datetime
    response_ms: float
    outcome: str
    stages: dict[str, float]
    timeouts: list[str]


@dataclass(frozen=True)
class Point:
    """One timeline bucket, starting at `at`."""

    at: datetime
    turns: int
    response_p95_ms: float | None
    cache_hit_rate: float | None
    timeout_rate: float


@dataclass(frozen=True)
class Bin:
    """Turns whose response time is in [low_ms, high_ms); high_ms None: and above."""

    low_ms: float
    high_ms: float | None
    turns: int


@dataclass(frozen=True)
class FollowUpStats:
    """One kind's follow-ups: sent, failed and cancelled in the window, pending now, and the
    sent ones the lead answered within REPLY_WITHIN."""

    kind: str
    sent: int = 0
    failed: int = 0
    cancelled: int = 0
    pending: int = 0
    replied: int = 0

    @property
    def reply_rate(self) -> float | None:
        return self.replied / self.sent if self.sent else None

    @property
    def active(self) -> bool:
        return any((self.sent, self.failed, self.cancelled, self.pending))

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "kind"}, "reply_rate": self.reply_rate}


@dataclass(frozen=True)
class BurstStats:
    """How the window's bursts were answered (see BURSTS for the exact query).

    - `replies`: turns finished in the window whose reply was delivered: the turn's first
      outbox row (lowest id) has status 'sent'; its sent_at is the delivery time.
    - `interrupted` (an estimate): those replies after which the lead sent a message within
      `interrupt_window`: an inbound message of the lead with delivery < received_at <=
      delivery + interrupt_window, whose turn_id is NULL or another turn's (the reply did
      not include it). The lead was most likely still typing the burst we answered; a lead
      who reads and answers that fast is counted too, hence an estimate.
    - `discarded`: rows of discarded_replies with discarded_at in the window: replies the
      agent wrote and the daemon threw away because a newer message overtook them.
    - agent calls per turn = (turns + discarded) / turns: 1.00 when no reply was thrown away."""

    interrupt_window: timedelta = INTERRUPT_WINDOW
    turns: int = 0
    replies: int = 0
    interrupted: int = 0
    discarded: int = 0

    @property
    def interrupted_rate(self) -> float | None:
        return self.interrupted / self.replies if self.replies else None

    @property
    def agent_calls(self) -> int:
        return self.turns + self.discarded

    @property
    def agent_calls_per_turn(self) -> float | None:
        return self.agent_calls / self.turns if self.turns else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "interrupt_window_s": self.interrupt_window.total_seconds(),
            "replies": self.replies,
            "interrupted": self.interrupted,
            "interrupted_rate": self.interrupted_rate,
            "discarded_replies": self.discarded,
            "agent_calls": self.agent_calls,
            "agent_calls_per_turn": self.agent_calls_per_turn,
        }


@dataclass(frozen=True)
class AgentSpend:
    """What the agent's model billed in the window: the turns' calls and those whose reply
    was thrown away (both paid for). `cost` is None when no price is set ([agent] price_in,
    price_out); a qualified lead is one with a meeting booked."""

    calls: int = 0  # agent calls that reported usage
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None
    turns: int = 0
    qualified_leads: int = 0

    def per(self, n: int, value: float | None) -> float | None:
        return None if value is None or n == 0 else value / n

    def to_dict(self) -> dict[str, Any]:
        tokens = self.prompt_tokens + self.completion_tokens
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": self.cost,
            "tokens_per_turn": self.per(self.turns, tokens),
            "cost_per_turn": self.per(self.turns, self.cost),
            "qualified_leads": self.qualified_leads,
            "cost_per_qualified_lead": self.per(self.qualified_leads, self.cost),
        }


@dataclass(frozen=True)
class Report:
    window: Window
    turns: int
    kpis: list[Kpi]
    response_p50_ms: float | None = None
    response_p99_ms: float | None = None
    responded: int = 0  # turns whose reply was sent (response_ms set)
    stages: list[StageStats] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    slowest: list[SlowTurn] = field(default_factory=list)
    step: timedelta = STEPS[0]
    timeline: list[Point] = field(default_factory=list)
    histogram: list[Bin] = field(default_factory=list)
    followups: list[FollowUpStats] = field(default_factory=list)  # per kind
    bursts: BurstStats = field(default_factory=BurstStats)
    # People beside the bot (lead_events in the window): takeover, handoff, opt_out,
    # opt_in, suppressed (a burst or reply not answered: the lead was paused or ignored)...
    handover: dict[str, int] = field(default_factory=dict)
    agent: AgentSpend = field(default_factory=AgentSpend)

    @property
    def empty(self) -> bool:
        return self.turns == 0

    @property
    def missed(self) -> list[Kpi]:
        return [k for k in self.kpis if k.met is False]

    def kpi(self, key: str) -> Kpi:
        return next(k for k in self.kpis if k.key == key)

    @property
    def followups_total(self) -> FollowUpStats:
        f = self.followups
        return FollowUpStats(
            "total",
            sum(s.sent for s in f),
            sum(s.failed for s in f),
            sum(s.cancelled for s in f),
            sum(s.pending for s in f),
            sum(s.replied for s in f),
        )

    def to_dict(self) -> dict[str, Any]:
        """Stable keys for machines: times in ms, rates as ratios 0..1, instants in ISO 8601."""
        return {
            "from": _iso(self.window.start),
            "to": _iso(self.window.end),
            "empty": self.empty,
            "turns": self.turns,
            "slo_met": not self.missed,
            "missed": [k.key for k in self.missed],
            "kpis": {
                k.key: {
                    "label": k.label,
                    "value": k.value,
                    "unit": k.unit,
                    "target": k.target,
                    "objective": k.objective,
                    "met": k.met,
                }
                for k in self.kpis
            },
            "response_ms": {
                "p50": self.response_p50_ms,
                "p95": self.kpi("response_p95_ms").value,
                "p99": self.response_p99_ms,
                "responded": self.responded,
            },
            "stages": [asdict(s) for s in self.stages],
            "outcomes": self.outcomes,
            "slowest": [{**asdict(t), "finished_at": _iso(t.finished_at)} for t in self.slowest],
            "timeline": {
                "bucket_s": int(self.step.total_seconds()),
                "points": [{**asdict(p), "at": _iso(p.at)} for p in self.timeline],
            },
            "histogram": [asdict(b) for b in self.histogram],
            "followups": {
                "reply_within_s": int(REPLY_WITHIN.total_seconds()),
                "kinds": {s.kind: s.to_dict() for s in self.followups},
                "total": self.followups_total.to_dict(),
            },
            "bursts": self.bursts.to_dict(),
            "handover": {k: self.handover.get(k, 0) for k in HANDOVER_KINDS},
            "agent": self.agent.to_dict(),
        }


def format_value(value: float | None, unit: str) -> str:
    """How the table and the page show a figure: 1,234 ms, 12.5 %, 4, 1.25."""
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value:,.0f} ms"
    if unit == "percent":
        return f"{value:.2%}".replace("%", " %")  # 2 decimals: 1.00 % vs a 1 % target must read right
    return f"{value:,.0f}" if unit == "count" else f"{value:,.2f}"


def format_target(kpi: Kpi) -> str:
    if kpi.target is None:
        return ""
    return ("≤ " if kpi.objective == "max" else "≥ ") + format_value(kpi.target, kpi.shown)


def kpis(
    slo: SloSettings,
    *,
    turns: int = 0,
    p95: float | None = None,
    timed_out: int = 0,
    hits: int = 0,
    misses: int = 0,
    peak: int | None = None,
    messages: int = 0,
) -> list[Kpi]:
    """The KPI rows in display order, against the [slo] targets (response_p95 is in s)."""
    return [
        Kpi("response_p95_ms", "P95 response time", p95, "ms", slo.response_p95 * 1000, "max"),
        Kpi("timeout_rate", "timeout rate", timed_out / turns if turns else None, "ratio", slo.timeout_rate, "max"),
        Kpi(
            "cache_hit_rate",
            "cache hit rate",
            hits / (hits + misses) if hits + misses else None,
            "ratio",
            slo.cache_hit_rate,
            "min",
        ),
        # Green while traffic stays within the load the SLOs are sized for; red above it.
        Kpi("peak_concurrent_leads", "peak concurrent leads", peak, "count", slo.concurrent_leads, "max"),
        Kpi("turns", "turns", turns, "count"),
        Kpi("messages_per_turn", "messages per turn", messages / turns if turns else None, "ratio"),
    ]


# --- the queries ---------------------------------------------------------------------------

RANGE = "finished_at >= $1 AND finished_at < $2"

# The set-returning function in the select list (ProjectSet) is the cheapest way to the keys.
STAGE_KEYS = f"SELECT DISTINCT k FROM (SELECT jsonb_object_keys(stages) AS k FROM turns WHERE {RANGE}) x"

# One pass: the response percentiles and, per stage, its percentiles (columns added below).
TOTALS = f"""
SELECT count(*) AS turns, count(response_ms) AS responded,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY response_ms) AS response,
       count(*) FILTER (WHERE cardinality(timeouts) > 0) AS timed_out,
       coalesce(sum(cache_hits), 0) AS hits, coalesce(sum(cache_misses), 0) AS misses,
       coalesce(sum(messages_joined), 0) AS messages{{stages}}
  FROM turns WHERE {RANGE}
"""
STAGE_COLUMNS = """,
       count(stages -> ${n}::text) AS n{i},
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY (stages ->> ${n}::text)::float8) AS p{i}"""

# A lead is "in progress" from its burst's first message until the reply is sent. A lead's
# turns can overlap (a new burst starts during a turn), so each turn is first clipped to
# what its lead's earlier turns do not cover; then a sweep over +1/-1 events counts the
# leads in progress (an end sorts before a start at the same instant: touching is not overlapping).
PEAK = f"""
WITH clipped AS (
    SELECT greatest(first_message_at, prev_end) AS s, finished_at AS e
      FROM (SELECT first_message_at, finished_at,
                   max(finished_at) OVER (PARTITION BY lead_id ORDER BY first_message_at
                                          ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end
              FROM turns WHERE {RANGE}) t
     WHERE prev_end IS NULL OR finished_at > prev_end)
SELECT coalesce(max(n), 0) FROM (
    SELECT sum(v.d) OVER (ORDER BY v.at, v.d ROWS UNBOUNDED PRECEDING) AS n
      FROM clipped, LATERAL (VALUES (clipped.s, 1), (clipped.e, -1)) AS v(at, d)) sweep
"""

INCIDENTS = f"""
SELECT i.stage, count(*) FILTER (WHERE i.kind = 'timeout') AS timeouts,
       count(*) FILTER (WHERE i.kind = 'failure') AS failures
  FROM turns t,
       LATERAL (SELECT x, 'timeout' FROM unnest(t.timeouts) AS x
                UNION ALL SELECT x, 'failure' FROM unnest(t.failures) AS x) AS i(stage, kind)
 WHERE {RANGE} AND (cardinality(t.timeouts) > 0 OR cardinality(t.failures) > 0)
 GROUP BY i.stage
"""

HANDOVER_KINDS = ("takeover", "handoff", "opt_out", "opt_in", "suppressed", "paused", "resumed", "ignored", "forgotten")
AGENT_SPEND = f"""
WITH calls AS (
    SELECT prompt_tokens, completion_tokens, cost FROM turns WHERE {RANGE} AND prompt_tokens IS NOT NULL
    UNION ALL
    SELECT prompt_tokens, completion_tokens, cost FROM discarded_replies
     WHERE discarded_at >= $1 AND discarded_at < $2 AND prompt_tokens IS NOT NULL)
SELECT count(*) AS calls, coalesce(sum(prompt_tokens), 0) AS prompt, coalesce(sum(completion_tokens), 0) AS completion,
       sum(cost)::float8 AS cost,
       (SELECT count(DISTINCT t.lead_id) FROM turns t JOIN leads l ON l.id = t.lead_id
         WHERE t.finished_at >= $1 AND t.finished_at < $2 AND l.meeting_at IS NOT NULL) AS qualified
  FROM calls"""
HANDOVER = "SELECT kind, count(*) AS n FROM lead_events WHERE at >= $1 AND at < $2 GROUP BY kind"
OUTCOMES = f"SELECT outcome, count(*) AS n FROM turns WHERE {RANGE} GROUP BY outcome ORDER BY outcome"

SLOWEST = f"""
SELECT t.id, l.phone_number, coalesce(l.name, l.push_name) AS name, t.finished_at, t.response_ms,
       t.outcome, t.stages::text AS stages, t.timeouts
  FROM (SELECT * FROM turns WHERE {RANGE} AND response_ms IS NOT NULL
         ORDER BY response_ms DESC, id LIMIT $3) t
  JOIN leads l ON l.id = t.lead_id
 ORDER BY t.response_ms DESC, t.id
"""

TIMELINE = f"""
SELECT date_bin($3::interval, finished_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS at, count(*) AS turns,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY response_ms) AS p95,
       sum(cache_hits)::float8 / nullif(sum(cache_hits) + sum(cache_misses), 0) AS hit_rate,
       count(*) FILTER (WHERE cardinality(timeouts) > 0)::float8 / count(*) AS timeout_rate
  FROM turns WHERE {RANGE}
 GROUP BY 1 ORDER BY 1
"""

# width_bucket with lower bounds: 0 below the first (none: the first is 0), i for edge i-1.
HISTOGRAM = f"""
SELECT width_bucket(response_ms, $3::float8[]) AS bin, count(*) AS n
  FROM turns WHERE {RANGE} AND response_ms IS NOT NULL
 GROUP BY 1 ORDER BY 1
"""

# Sent: sent_at in the window. Failed, cancelled: their last change (updated_at) in it.
# Pending: now, i.e. at the report's snapshot, whatever the window. A reply: an inbound
# message received within $3 after sent_at; received_at, like sent_at, is our own clock
# (provider_ts is the phone's, in whole seconds). EXISTS in a WHERE becomes one semi-join
# over the messages of the window (plus $3), not a lookup per follow-up.
FOLLOW_UPS = """
WITH f AS (
    SELECT id, lead_id, kind, status, sent_at
      FROM follow_ups
     WHERE status = 'pending' OR (status = 'sent' AND sent_at >= $1 AND sent_at < $2)
        OR (status IN ('failed', 'cancelled') AND updated_at >= $1 AND updated_at < $2)),
replied AS (
    SELECT f.id FROM f
     WHERE f.status = 'sent' AND EXISTS (
           SELECT 1 FROM messages m
            WHERE m.lead_id = f.lead_id AND m.direction = 'in'
              AND m.received_at > f.sent_at AND m.received_at <= f.sent_at + $3::interval
              AND m.received_at > $1 AND m.received_at <= $2 + $3::interval))
SELECT f.kind, count(*) FILTER (WHERE f.status = 'sent') AS sent,
       count(*) FILTER (WHERE f.status = 'failed') AS failed,
       count(*) FILTER (WHERE f.status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE f.status = 'pending') AS pending,
       count(r.id) AS replied
  FROM f LEFT JOIN replied r ON r.id = f.id
 GROUP BY f.kind
"""


# Interrupted replies and thrown-away ones (BurstStats says what each figure means); $3 is
# the interrupt window. The path follows the indexes, reading each lead's rows once:
# - the window's turns by finished_at;
# - their first outbox rows through outbox (phone_number, id), under every identity the
#   lead's replies may have gone to (its phone and its LID: a reply stored before the two
#   were linked carries the identity of its day);
# - the leads' inbound messages through messages (conversation_id, id), from the turns'
#   conversations and each lead's open one, kept only from the first delivery to the last
#   one plus $3.
# Then a hash join on (lead, slot): time cut in slots of $3 (date_bin, exact to the
# microsecond), a message within $3 after a delivery is in the delivery's slot or the next,
# so each reply meets only the few messages of two slots (a join on the lead alone compares
# every reply of a lead with every message of that lead).
# received_at and sent_at are both the database's clock.
BURSTS = f"""
WITH t AS MATERIALIZED (
    SELECT id, lead_id, conversation_id FROM turns WHERE {RANGE}),
identities AS (
    SELECT phone_number AS identity FROM leads WHERE id IN (SELECT lead_id FROM t)
    UNION
    SELECT lid FROM leads WHERE id IN (SELECT lead_id FROM t) AND lid IS NOT NULL),
replies AS MATERIALIZED (
    SELECT f.turn_id AS id, f.lead_id, f.sent_at
      FROM (SELECT DISTINCT ON (o.turn_id) o.turn_id, t.lead_id, o.status, o.sent_at
              FROM identities i
              CROSS JOIN LATERAL (SELECT o.id, o.turn_id, o.status, o.sent_at FROM outbox o
                                   WHERE o.phone_number = i.identity) o
              JOIN t ON t.id = o.turn_id
             ORDER BY o.turn_id, o.id) f
     WHERE f.status = 'sent' AND f.sent_at IS NOT NULL),
conversations_read AS (
    SELECT conversation_id AS id FROM t
    UNION
    SELECT c.id FROM conversations c WHERE c.status = 'open' AND c.lead_id IN (SELECT lead_id FROM t)),
after AS MATERIALIZED (
    SELECT m.lead_id, m.received_at, m.turn_id,
           date_bin($3::interval, m.received_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS slot
      FROM conversations_read c
      CROSS JOIN LATERAL (
           SELECT m.lead_id, m.received_at, m.turn_id FROM messages m
            WHERE m.conversation_id = c.id AND m.direction = 'in'
              AND m.received_at > (SELECT min(sent_at) FROM replies)
              AND m.received_at <= (SELECT max(sent_at) FROM replies) + $3::interval) m),
probes AS MATERIALIZED (  -- each reply twice: its slot and the next
    SELECT r.id, r.lead_id, r.sent_at,
           date_bin($3::interval, r.sent_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') + next.n * $3::interval AS slot
      FROM replies r CROSS JOIN (VALUES (0), (1)) AS next(n)),
interrupted AS (
    SELECT DISTINCT p.id
      FROM probes p JOIN after m ON m.lead_id = p.lead_id AND m.slot = p.slot
     WHERE m.received_at > p.sent_at AND m.received_at <= p.sent_at + $3::interval
       AND m.turn_id IS DISTINCT FROM p.id)
SELECT (SELECT count(*) FROM replies) AS replies,
       (SELECT count(*) FROM interrupted) AS interrupted,
       (SELECT count(*) FROM discarded_replies WHERE discarded_at >= $1 AND discarded_at < $2) AS discarded
"""


def stage_sort_key(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def _ordered(stages: dict[str, float]) -> dict[str, float]:
    return {k: stages[k] for k in sorted(stages, key=stage_sort_key)}


def timeline_step(window: Window) -> timedelta:
    span = window.end - window.start
    return next((s for s in STEPS if span / s <= MAX_POINTS), STEPS[-1])


def histogram_edges(upper_ms: float) -> list[float]:
    """Lower bounds of equal bins from 0 to a round figure at or above `upper_ms`, in a
    1-2-5 step; the last bin takes everything above."""
    upper = max(upper_ms, 1.0)
    magnitude = 10 ** math.floor(math.log10(upper / HISTOGRAM_BINS))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude * HISTOGRAM_BINS >= upper)
    count = math.ceil(upper / step)
    return [i * step for i in range(count + 1)]


async def build_report(
    conn: asyncpg.Connection,
    window: Window,
    slo: SloSettings,
    slowest: int = 10,
    interrupt_window: timedelta = INTERRUPT_WINDOW,
) -> Report:
    """The report of the turns that finished in `window`, against `slo`."""
    args = (window.start, window.end)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
        followups = await _followups(conn, args)
        handover = {r["kind"]: r["n"] for r in await conn.fetch(HANDOVER, *args)}
        spend = await conn.fetchrow(AGENT_SPEND, *args)
        assert spend is not None
        keys = sorted((r["k"] for r in await conn.fetch(STAGE_KEYS, *args)), key=stage_sort_key)
        columns = "".join(STAGE_COLUMNS.format(n=i + 3, i=i) for i in range(len(keys)))
        row = await conn.fetchrow(TOTALS.format(stages=columns), *args, *keys)
        assert row is not None
        b = await conn.fetchrow(BURSTS, *args, interrupt_window)
        assert b is not None
        bursts = BurstStats(interrupt_window, row["turns"], b["replies"], b["interrupted"], b["discarded"])
        if row["turns"] == 0:
            return Report(window, 0, kpis(slo), followups=followups, bursts=bursts, handover=handover)
        agent = AgentSpend(
            spend["calls"], spend["prompt"], spend["completion"], spend["cost"], row["turns"], spend["qualified"]
        )
        p50, p95, p99 = row["response"] if row["responded"] else (None, None, None)
        peak = await conn.fetchval(PEAK, *args)
        stages = _stages(keys, row, await conn.fetch(INCIDENTS, *args))
        outcomes = {r["outcome"]: r["n"] for r in await conn.fetch(OUTCOMES, *args)}
        slow = [
            SlowTurn(
                r["id"],
                r["phone_number"],
                r["name"],
                r["finished_at"],
                r["response_ms"],
                r["outcome"],
                _ordered(json.loads(r["stages"])),
                list(r["timeouts"]),
            )
            for r in await conn.fetch(SLOWEST, *args, slowest)
        ]
        step = timeline_step(window)
        timeline = [
            Point(r["at"], r["turns"], r["p95"], r["hit_rate"], r["timeout_rate"])
            for r in await conn.fetch(TIMELINE, *args, step)
        ]
        # Bins up to the P99 (or the SLO when higher): the tail beyond is one last bin.
        histogram = await _histogram(conn, args, max(p99, slo.response_p95 * 1000)) if p99 is not None else []
    return Report(
        window,
        row["turns"],
        kpis(
            slo,
            turns=row["turns"],
            p95=p95,
            timed_out=row["timed_out"],
            hits=row["hits"],
            misses=row["misses"],
            peak=peak,
            messages=row["messages"],
        ),
        response_p50_ms=p50,
        response_p99_ms=p99,
        responded=row["responded"],
        stages=stages,
        outcomes=outcomes,
        slowest=slow,
        step=step,
        timeline=timeline,
        histogram=histogram,
        followups=followups,
        bursts=bursts,
        handover=handover,
        agent=agent,
    )


def _stages(keys: list[str], row: asyncpg.Record, incidents: list[asyncpg.Record]) -> list[StageStats]:
    """Timed stages (columns n{i}, p{i} of TOTALS) and stages that only timed out or failed."""
    counted = {r["stage"]: (r["timeouts"], r["failures"]) for r in incidents}
    stages = []
    for name in sorted(set(keys) | set(counted), key=stage_sort_key):
        n, p = (row[f"n{keys.index(name)}"], row[f"p{keys.index(name)}"]) if name in keys else (0, None)
        p50, p95, p99 = p or (None, None, None)
        timeouts, failures = counted.get(name, (0, 0))
        stages.append(StageStats(name, n, p50, p95, p99, timeouts, failures))
    return stages


async def _histogram(conn: asyncpg.Connection, args: tuple[datetime, datetime], upper_ms: float) -> list[Bin]:
    edges = histogram_edges(upper_ms)
    counts = {r["bin"]: r["n"] for r in await conn.fetch(HISTOGRAM, *args, edges)}
    highs: list[float | None] = [*edges[1:], None]
    return [Bin(lo, hi, counts.get(i + 1, 0)) for i, (lo, hi) in enumerate(zip(edges, highs, strict=True))]


async def _followups(conn: asyncpg.Connection, args: tuple[datetime, datetime]) -> list[FollowUpStats]:
    counted = {r["kind"]: FollowUpStats(**dict(r)) for r in await conn.fetch(FOLLOW_UPS, *args, REPLY_WITHIN)}
    kinds = [*FOLLOW_UP_KINDS, *sorted(set(counted) - set(FOLLOW_UP_KINDS))]
    return [counted.get(k, FollowUpStats(k)) for k in kinds]
