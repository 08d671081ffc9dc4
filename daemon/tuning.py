"""Tuning a profile: its knobs as data, validated edits written atomically, comparisons,
and stage timeouts recommended from the latencies the `turns` table recorded.

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
from pathlib import Path
from typing import Any

import asyncpg
import tomli_w

# The loader's own coercion and wording, so `tune set` accepts exactly what loading accepts.
from daemon.config import (
    PROFILE_SECTIONS,
    Profile,
    Timeouts,
    _coerce,
    _describe,
    available_profiles,
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
            out.append(Knob(
                f"{section}.{name}", getattr(values, name), str(f.type), meta["unit"],
                meta["min"], meta["max"], meta["choices"], _allowed(f), meta["help"],
            ))  # fmt: skip
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
            out[key] = _coerce(f, raw, from_env=True)  # text in, as from SDR_ variables
        except (ValueError, TypeError):
            raise ConfigError(f"{key}={raw}: must be {_describe(f)}") from None
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
    doc = {
        section: {n: getattr(getattr(src, section), n) for n in _fields(section)}
        for section in PROFILE_SECTIONS
    }
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
SINCE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

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


def parse_duration(text: str, option: str = "--since") -> timedelta:
    match = SINCE.match(text.strip().lower())
    if not match:
        raise ConfigError(f"{option} {text!r}: use a number and a unit (s, m, h or d), e.g. 30m, 24h or 7d")
    delta = timedelta(**{UNITS[match.group(2)]: float(match.group(1))})
    if not delta:
        raise ConfigError(f"{option} {text!r}: must be longer than zero")
    return delta


def check_options(headroom: float, min_samples: int) -> None:
    if not (math.isfinite(headroom) and MIN_HEADROOM <= headroom <= 100):
        raise ConfigError(
            f"--headroom {headroom:g}: must be from {MIN_HEADROOM:g} to 100; below twice the P99 "
            "a timeout cuts real turns as soon as latency drifts"
        )
    if min_samples < 1:
        raise ConfigError(f"--min-samples {min_samples}: must be at least 1")


async def stage_latencies(conn: asyncpg.Connection, since: timedelta) -> dict[str, StageStats]:
    """Per stage of STAGE_TIMEOUTS: sample count and P50/P95/P99 (ms), computed in SQL."""
    rows = await conn.fetch(STAGE_PERCENTILES, since, list(STAGE_TIMEOUTS))
    return {
        r["stage"]: StageStats(r["stage"], r["samples"], r["timed_out"], r["p50"], r["p95"], r["p99"])
        for r in rows
    }


def _ceil_hundredth(seconds: float) -> float:
    # round() first, so 0.9 * 100 = 90.00000000000001 does not become 0.91
    return math.ceil(round(seconds * 100, 6)) / 100


def propose(
    profile: Profile, stats: dict[str, StageStats], headroom: float, min_samples: int
) -> list[Proposal]:
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
