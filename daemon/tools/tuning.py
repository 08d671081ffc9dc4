"""Tuning a profile: its knobs as data, validated edits written atomically, comparisons,
stage timeouts recommended from the latencies the `turns` table recorded, and the buffer's
windows recommended from the pauses leads make inside their bursts (`messages`).

`sdrctl tune` renders what these functions return; nothing here prints. Profiles are read
without `SDR_` environment overrides: tune works on the file, not on one process's view."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import tomli_w

# The loader's own coercion and wording, so `tune set` accepts exactly what loading accepts.
from daemon.config import (
    PROFILE_SECTIONS,
    Buffer,
    Profile,
    Timeouts,
    available_profiles,
    coerce_value,
    describe_knob,
    load_profile,
    profile_path,
    shipped_path,
)
from daemon.errors import ConfigError

HEADER_START = "# Written by `sdrctl tune`"
HEADER = HEADER_START + ", which keeps these header comments but not those beside keys."
PROFILE_NAME = re.compile(r"^[a-z0-9_-]+$")
NO_ENV: dict[str, str] = {}

# --- the knobs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Knob:
    key: str  # section.name
    value: Any
    kind: str  # int, float, bool or str
    unit: str
    min: float | None
    max: float | None
    choices: tuple[str, ...] | None
    allowed: str  # the range or choices, short, for a table column
    help: str


def _fields(section: str) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(PROFILE_SECTIONS[section])}


def _allowed(f: dataclasses.Field[Any]) -> str:
    meta = f.metadata
    if meta["describe"]:
        return str(meta["describe"])
    if meta["choices"]:
        return " | ".join(meta["choices"])
    if str(f.type) == "bool":
        return "true | false"
    if meta["min"] is not None and meta["max"] is not None:
        return f"{meta['min']:g} to {meta['max']:g}"
    return "any"


def knobs(profile: Profile) -> list[Knob]:
    """Every knob of the profile in declaration order (sections as in PROFILE_SECTIONS)."""
    out = []
    for section in PROFILE_SECTIONS:
        values = getattr(profile, section)
        for name, f in _fields(section).items():
            meta = f.metadata
            out.append(
                Knob(
                    f"{section}.{name}",
                    getattr(values, name),
                    str(f.type),
                    meta["unit"],
                    meta["min"],
                    meta["max"],
                    meta["choices"],
                    _allowed(f),
                    meta["help"],
                )
            )
    return out


def read(name: str) -> Profile:
    """A profile by name or path, validated as the daemon would load it (minus env)."""
    return load_profile(name, NO_ENV)


def env_overrides(env: dict[str, str]) -> dict[str, str]:
    """knob key -> the SDR_ variable that overrides it in this environment."""
    out = {}
    for section in PROFILE_SECTIONS:
        for name in _fields(section):
            var = f"SDR_{section.upper()}_{name.upper()}"
            if var in env:
                out[f"{section}.{name}"] = var
    return out


# --- relations tune enforces on what it writes ----------------------------------------
# Stricter than the loader's: a test or a bench may cross these on purpose through SDR_
# overrides (the daemon still runs), but a profile written by tune must not. Left out, as
# no constraint here: agent vs redis_lock_ttl (the lock is renewed while a turn runs),
# evolution_send vs webhook (the webhook never waits for a reply), a stage vs the turn (no
# whole-turn timeout), cache local_ttl vs lead_ttl/kb_ttl (the shorter one applies).


def check_relations(p: Profile, where: str) -> None:
    t, b = p.timeouts, p.buffer
    if b.extended_window > t.message_buffer:
        raise ConfigError(
            f"{where}: [buffer] extended_window = {b.extended_window:g} must not exceed [timeouts] "
            f"message_buffer = {t.message_buffer:g}: the buffer never waits past message_buffer, "
            "so a longer window would be cut short silently"
        )
    if p.features.parallel_context and t.knowledge_base > t.agent:
        raise ConfigError(
            f"{where}: [timeouts] knowledge_base = {t.knowledge_base:g} must not exceed agent = "
            f"{t.agent:g} while [features] parallel_context is on: the agent waits for the search "
            "inside its own timeout, so it would time out first and the lead would get the fallback reply"
        )
    if t.redis_lock_ttl <= 3 * t.redis:
        raise ConfigError(
            f"{where}: [timeouts] redis_lock_ttl = {t.redis_lock_ttl:g} must be more than 3 x "
            f"redis = {t.redis:g}: the lock is renewed every third of its TTL, and a renewal may "
            "take 2 x redis (a pooled connection, then the answer) and must land before it expires"
        )


# --- editing --------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any


def field_for(key: str) -> dataclasses.Field[Any]:
    section, _, name = key.partition(".")
    if section not in PROFILE_SECTIONS:
        owners = [s for s in PROFILE_SECTIONS if (name or section) in _fields(s)]
        hint = f"did you mean {owners[0]}.{name or section}? " if owners else ""
        raise ConfigError(
            f"unknown key {key!r}; {hint}a key is section.name, section one of {', '.join(PROFILE_SECTIONS)}"
        )
    fields = _fields(section)
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f"did you mean {section}.{close[0]}? " if close else ""
        raise ConfigError(f"unknown key {key!r}; {hint}[{section}] has: {', '.join(fields)}")
    return fields[name]


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`section.key=value` strings -> typed values, each checked against its knob."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise ConfigError(f"{item!r}: expected KEY=VALUE, e.g. buffer.quiet_window=0.8")
        f = field_for(key)
        if key in out:
            raise ConfigError(f"{key} is given twice")
        try:
            out[key] = coerce_value(f, raw, from_env=True)  # text in, as from SDR_ variables
        except (ValueError, TypeError):
            raise ConfigError(f"{key}={raw}: must be {describe_knob(f)}") from None
    return out


def writable_path(name: str) -> Path:
    """The file `name` resolves to, if tune may rewrite it. The profiles shipped with sdrctl
    are refused unless ./profiles is where they live (a checkout): an installed package's
    copy would be lost on upgrade, and another folder's would change behind its back."""
    path = profile_path(name)
    shipped = shipped_path("profiles").resolve()
    if path.resolve().parent == shipped and Path("profiles").resolve() != shipped:
        raise ConfigError(
            f"profile {path.stem!r} ships with sdrctl ({path}); tune a copy instead: "
            f"sdrctl tune new my-{path.stem} --from {path.stem}"
        )
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
        raise ConfigError(f"{path}: not writable; tune a copy: sdrctl tune new NAME --from {path}")
    return path


def _header(text: str, extra: list[str]) -> str:
    """Our header line, then the comment lines that opened the old file (ours dropped)."""
    kept = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#") and not line.startswith(HEADER_START):
            kept.append(line)
    return "\n".join([HEADER, *extra, *kept]) + "\n\n"


def _write_validated(path: Path, text: str, *, commit: bool = True) -> None:
    """Writes `text` to a temp file beside `path`, loads it as the daemon would, checks
    tune's relations, then renames it over `path`: a bad profile never reaches the file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        try:
            check_relations(load_profile(str(tmp), NO_ENV), str(path))
        except ConfigError as exc:  # name the real file, not the temp one
            raise ConfigError(str(exc).replace(str(tmp), str(path))) from None
        if commit:
            os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def set_values(name: str, updates: dict[str, Any], *, commit: bool = True) -> tuple[Path, list[Change]]:
    """Applies typed `updates` to the profile file and returns what changed. The file's
    keys keep their order; a key it did not have is added at the end of its section. The
    old file need not be valid (set may repair it); the new one must be, as a whole."""
    path = writable_path(name)
    try:
        text = path.read_text(encoding="utf-8")
        doc = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as TOML: {exc}") from None
    changes = []
    for key, value in updates.items():
        section, _, knob_name = key.partition(".")
        table = doc.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a [{section}] table")
        old = table.get(knob_name, field_for(key).default)
        if old != value:
            table[knob_name] = value
            changes.append(Change(key, old, value))
    if changes:
        _write_validated(path, _header(text, []) + tomli_w.dumps(doc), commit=commit)
    return path, changes


def new_profile(name: str, source: str) -> Path:
    """./profiles/NAME.toml holding every value of `source` (defaults spelled out)."""
    if not PROFILE_NAME.match(name):
        raise ConfigError(f"profile name {name!r}: use lowercase letters, digits, - and _ only")
    if name in available_profiles():
        raise ConfigError(f"profile {name!r} exists already ({profile_path(name)}); choose another name")
    src = read(source)
    doc = {section: {n: getattr(getattr(src, section), n) for n in _fields(section)} for section in PROFILE_SECTIONS}
    folder = Path("profiles")
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.toml"
    header = _header("", [f"# Copied from {src.name} ({src.source})."])
    _write_validated(path, header + tomli_w.dumps(doc))
    return path


def diff(a: Profile, b: Profile) -> list[tuple[Knob, Knob]]:
    """Every knob of a beside the same knob of b, in order (callers filter the changed)."""
    return list(zip(knobs(a), knobs(b), strict=True))


# --- recommending timeouts from recorded latencies ------------------------------------

# Stages a turn records in turns.stages -> the timeout they run under (daemon/turn.py).
# "store" and "send" are timed too, but after the turn's stages are recorded (the record
# is what "store" writes), so the table never holds them: nothing to recommend from.
STAGE_TIMEOUTS = {"context": "personalization", "knowledge": "knowledge_base", "agent": "agent"}
# Below twice the P99 a timeout cuts real turns as soon as latency drifts.
MIN_HEADROOM = 2.0

# A failed stage's time says how fast it failed, not how long it needs: left out. A timed
# out one is kept (its time is the timeout: a floor of what it needed) and counted.
STAGE_PERCENTILES = """
SELECT s.stage, count(*) AS samples,
       count(*) FILTER (WHERE s.stage = ANY(t.timeouts)) AS timed_out,
       percentile_cont(0.50) WITHIN GROUP (ORDER BY s.ms) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY s.ms) AS p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY s.ms) AS p99
  FROM turns t
 CROSS JOIN LATERAL (SELECT key AS stage, value::float8 AS ms FROM jsonb_each_text(t.stages)) s
 WHERE t.started_at >= now() - $1::interval
   AND s.stage = ANY($2::text[])
   AND NOT s.stage = ANY(t.failures)
 GROUP BY s.stage
"""


@dataclass(frozen=True)
class StageStats:
    stage: str
    samples: int
    timed_out: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None


@dataclass(frozen=True)
class Proposal:
    stage: str
    key: str  # timeouts.NAME
    current: float
    stats: StageStats
    proposed: float | None  # None: not enough samples
    note: str


def check_options(headroom: float, min_samples: int, burst_coverage: float = 0.98) -> None:
    if not (math.isfinite(headroom) and MIN_HEADROOM <= headroom <= 100):
        raise ConfigError(
            f"--headroom {headroom:g}: must be from {MIN_HEADROOM:g} to 100; below twice the P99 "
            "a timeout cuts real turns as soon as latency drifts"
        )
    if min_samples < 1:
        raise ConfigError(f"--min-samples {min_samples}: must be at least 1")
    if not (math.isfinite(burst_coverage) and COVERAGE_MIN <= burst_coverage <= COVERAGE_MAX):
        raise ConfigError(
            f"--burst-coverage {burst_coverage:g}: must be from {COVERAGE_MIN:g} to {COVERAGE_MAX:g}, "
            "the share of the pauses inside bursts that settle_window waits out (0.98: all but the "
            "longest 2 %)"
        )


async def stage_latencies(conn: asyncpg.Connection, since: timedelta) -> dict[str, StageStats]:
    """Per stage of STAGE_TIMEOUTS: sample count and P50/P95/P99 (ms), computed in SQL."""
    rows = await conn.fetch(STAGE_PERCENTILES, since, list(STAGE_TIMEOUTS))
    return {
        r["stage"]: StageStats(r["stage"], r["samples"], r["timed_out"], r["p50"], r["p95"], r["p99"]) for r in rows
    }


def _ceil_hundredth(seconds: float) -> float:
    # round() first, so 0.9 * 100 = 90.00000000000001 does not become 0.91
    return math.ceil(round(seconds * 100, 6)) / 100


def propose(profile: Profile, stats: dict[str, StageStats], headroom: float, min_samples: int) -> list[Proposal]:
    """timeout = P99 x headroom, rounded up to 0.01 s, clamped to the knob's range; no
    proposal for a stage with fewer than `min_samples` samples."""
    check_options(headroom, min_samples)
    fields = {f.name: f for f in dataclasses.fields(Timeouts)}
    out = []
    for stage, name in STAGE_TIMEOUTS.items():
        s = stats.get(stage, StageStats(stage, 0))
        current = getattr(profile.timeouts, name)
        key = f"timeouts.{name}"
        if s.samples < min_samples or s.p99_ms is None:
            out.append(Proposal(stage, key, current, s, None, f"not enough samples ({s.samples})"))
            continue
        lo, hi = fields[name].metadata["min"], fields[name].metadata["max"]
        value, note = _ceil_hundredth(s.p99_ms / 1000 * headroom), ""
        if value < lo:
            value, note = lo, f"raised to the knob's minimum {lo:g} s"
        elif value > hi:
            value, note = hi, f"cut to the knob's maximum {hi:g} s: the stage itself needs a look"
        out.append(Proposal(stage, key, current, s, value, note))
    return out


# --- recommending the buffer's windows from the pauses inside bursts -------------------
#
# A lead types a burst at human speed: a pause of seconds between its messages (the time to
# type the next one). An in-burst gap is the time between two consecutive inbound messages
# of a conversation with no outbound message between them (no reply, no follow-up), both
# received in the --since window, at most MAX_GAP apart (longer: a new conversation, not a
# pause). received_at is our clock, to the microsecond (provider_ts is the phone's, in whole
# seconds). A gap longer than settle_window lets the reply go before the next message: the
# burst is split (the lead gets a reply in the middle of it).

MAX_GAP = timedelta(seconds=120)
GAP_QUANTILES = (0.5, 0.9, 0.95, 0.98, 0.99)
SETTLE_CANDIDATES = (1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0)  # the trade-off table's rows (s)
COVERAGE_MIN, COVERAGE_MAX = 0.5, 0.999
GAPS_WORK_MEM = "64MB"  # as the report's: SET LOCAL, this query only

# Conversations by the turns that finished in the window (turns_finished_at_idx), their
# messages through messages (conversation_id, id): a lead's messages in order, reply or not.
# $1: --since; $2: MAX_GAP; $3: the quantiles; $4: the coverage; $5: thresholds (s) to
# count the gaps above. The gaps are numeric seconds (exact microseconds), so the covering
# gap is rounded up to 0.1 s exactly (ceil(covering * 10) / 10), and that value is counted
# too; the settle_window proposal is that value (within the knob's range).
BURST_GAPS = """
WITH conversations_read AS (
    SELECT DISTINCT conversation_id AS id FROM turns WHERE finished_at >= now() - $1::interval),
ordered AS (
    SELECT m.direction, lag(m.direction) OVER w AS previous, m.received_at - lag(m.received_at) OVER w AS gap
      FROM conversations_read c
      CROSS JOIN LATERAL (SELECT m.conversation_id, m.id, m.direction, m.received_at FROM messages m
                           WHERE m.conversation_id = c.id AND m.received_at >= now() - $1::interval) m
    WINDOW w AS (PARTITION BY m.conversation_id ORDER BY m.received_at, m.id)),
gaps AS MATERIALIZED (
    SELECT extract(epoch FROM gap) AS s FROM ordered
     WHERE direction = 'in' AND previous = 'in' AND gap <= $2::interval),
stats AS (
    SELECT count(*) AS samples,
           percentile_cont($3::float8[]) WITHIN GROUP (ORDER BY s::float8) AS quantiles,
           ceil(percentile_disc($4::float8) WITHIN GROUP (ORDER BY s) * 10) / 10 AS covering
      FROM gaps),
thresholds AS (
    SELECT unnest($5::numeric[]) AS c UNION SELECT covering FROM stats WHERE covering IS NOT NULL)
SELECT samples, quantiles, covering::float8 AS covering,
       (SELECT array_agg(c::float8 ORDER BY c) FROM thresholds) AS thresholds,
       (SELECT array_agg((SELECT count(*) FROM gaps WHERE s > c) ORDER BY c) FROM thresholds) AS over
  FROM stats
"""


@dataclass(frozen=True)
class GapStats:
    """The in-burst gaps of the window: how many, their quantiles (s), the gap that covers
    the asked share of them rounded up to 0.1 s, and how many are longer than each threshold."""

    samples: int
    quantiles: dict[float, float] = dataclasses.field(default_factory=dict)  # q -> seconds
    covering_s: float | None = None
    over: dict[float, int] = dataclasses.field(default_factory=dict)  # threshold (s) -> gaps longer

    def share_over(self, seconds: float) -> float | None:
        return self.over[seconds] / self.samples if self.samples else None


@dataclass(frozen=True)
class BufferChange:
    key: str  # buffer.NAME
    current: float
    proposed: float | None  # None: not enough gaps
    rule: str
    note: str = ""


@dataclass(frozen=True)
class CurvePoint:
    """One candidate settle_window: the in-burst gaps longer than it (bursts it would
    split, estimated) and what it adds to a reply's wait after the lead's last message."""

    settle_window_s: float
    gaps_over: int
    share_over: float | None
    added_wait_max_s: float  # settle - quiet_window: the reply goes no sooner than settle
    added_wait_p50_s: float | None  # minus the agent's P50 (it runs while the reply is held)
    marks: tuple[str, ...] = ()  # "current", "proposed"


@dataclass(frozen=True)
class BufferProposal:
    gaps: GapStats
    coverage: float
    changes: list[BufferChange]
    curve: list[CurvePoint]
    notes: list[str]


def _fields_of(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def gap_thresholds(profile: Profile) -> list[float]:
    """The settle windows the trade-off counts gaps over: the candidates, the current value
    and the knob's bounds (a proposal cut to them is shown with its own figures)."""
    meta = _fields_of(Buffer)["settle_window"].metadata
    return sorted({*SETTLE_CANDIDATES, profile.buffer.settle_window, float(meta["min"]), float(meta["max"])})


async def burst_gaps(conn: asyncpg.Connection, since: timedelta, coverage: float, thresholds: list[float]) -> GapStats:
    """The window's in-burst gaps, aggregated in SQL (see BURST_GAPS)."""
    async with conn.transaction(readonly=True):
        await conn.execute(f"SET LOCAL work_mem = '{GAPS_WORK_MEM}'")  # the sort by conversation, in memory
        row = await conn.fetchrow(
            BURST_GAPS, since, MAX_GAP, list(GAP_QUANTILES), coverage, [_numeric(t) for t in thresholds]
        )
    assert row is not None
    if not row["samples"]:
        return GapStats(0, over=dict.fromkeys(thresholds, 0))
    return GapStats(
        row["samples"],
        dict(zip(GAP_QUANTILES, row["quantiles"], strict=True)),
        row["covering"],
        dict(zip(row["thresholds"], row["over"], strict=True)),
    )


def _numeric(seconds: float) -> Decimal:
    """A threshold as PostgreSQL numeric, spelled as the knob is (0.3, not 0.299999...)."""
    return Decimal(repr(seconds))


def _floor_tenth(seconds: float) -> float:
    return math.floor(round(seconds * 10, 6)) / 10


def propose_buffer(
    profile: Profile, gaps: GapStats, coverage: float, min_samples: int, agent_p50_ms: float | None = None
) -> BufferProposal:
    """settle_window = the smallest observed in-burst gap with at least `coverage` of the
    gaps at or below it, rounded up to 0.1 s, within the knob's range; quiet_window =
    min(current, P50 gap) rounded down to 0.1 s, at least min_window, with speculate on
    (unchanged with it off: then the window alone joins a burst). No change with fewer
    than `min_samples` gaps."""
    b = profile.buffer
    notes: list[str] = []
    settle_rule = (
        f"the shortest in-burst gap with at least {coverage * 100:g} % of the gaps at or below it, rounded up to 0.1 s"
    )
    quiet_rule = (
        "min(current, P50 gap), rounded down to 0.1 s, at least min_window, with speculate on: "
        "the agent starts after the median pause; the reply still waits for settle_window"
    )
    speculating = b.speculate and b.coalesce
    settle: float | None = None
    quiet: float | None = None
    settle_note = quiet_note = ""
    if gaps.samples < min_samples or gaps.covering_s is None:
        settle_note = quiet_note = f"not enough in-burst gaps ({gaps.samples})"
        notes.append(f"not enough in-burst gaps ({gaps.samples} < --min-samples {min_samples}): no buffer change")
    else:
        meta = _fields_of(Buffer)["settle_window"].metadata
        lo, hi = float(meta["min"]), float(meta["max"])
        settle = gaps.covering_s
        if settle > hi:
            settle, settle_note = hi, f"cut to the knob's maximum {hi:g} s"
        elif settle < lo:
            settle, settle_note = lo, f"raised to the knob's minimum {lo:g} s"
        p50 = gaps.quantiles[0.5]
        quiet = b.quiet_window
        if not speculating:
            quiet_note = "unchanged: speculate is off, so the window alone joins a burst"
        elif p50 < b.quiet_window:
            quiet = max(_floor_tenth(p50), b.min_window)
            if quiet != _floor_tenth(p50):
                quiet_note = f"raised to min_window {b.min_window:g} s"
        else:
            quiet_note = "unchanged: the median pause is not shorter"
        if not speculating:
            notes.append("[buffer] speculate is off: settle_window takes effect only with speculate (and coalesce) on")
        if settle < b.presence_settle:
            notes.append(
                f"presence_settle ({b.presence_settle:g} s) is longer than the proposed settle_window: "
                "leads whose typing we see would wait longer than the others"
            )
    changes = [
        BufferChange("buffer.settle_window", b.settle_window, settle, settle_rule, settle_note),
        BufferChange("buffer.quiet_window", b.quiet_window, quiet, quiet_rule, quiet_note),
    ]
    window = quiet if quiet is not None else b.quiet_window
    agent_s = agent_p50_ms / 1000 if agent_p50_ms is not None else None
    marks: dict[float, list[str]] = {s: [] for s in SETTLE_CANDIDATES}
    marks.setdefault(b.settle_window, []).append("current")
    if settle is not None:
        marks.setdefault(settle, []).append("proposed")
    curve = [
        CurvePoint(
            s,
            gaps.over.get(s, 0),
            gaps.share_over(s) if s in gaps.over else None,
            round(max(0.0, s - window), 6),
            round(max(0.0, s - window - agent_s), 6) if agent_s is not None else None,
            tuple(m),
        )
        for s, m in sorted(marks.items())
    ]
    return BufferProposal(gaps, coverage, changes, curve, notes)
