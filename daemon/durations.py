"""Durations as people write them: a number and a unit, such as 90s, 30m, 1.5h, 7d or 2w.

One parser for the profile's delays (follow-ups) and every command's duration option
(`--since`, `--soak`). A unit is always required: a bare "30" could mean seconds, minutes
or days, and a guess would silently read the wrong window."""

from __future__ import annotations

import re

from daemon.errors import ConfigError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
ALLOWED = "a number and a unit (s, m, h, d or w), such as 30m, 24h, 7d, 1.5h or 2w"
# Far beyond any window or delay, and well inside what datetime arithmetic can hold.
LONGEST_WEEKS = 5200
LONGEST = LONGEST_WEEKS * UNITS["w"]

_DURATION = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)\s*([a-z]+)")  # 2, 1.5, 5. or .5


def parse_duration(text: str) -> float:
    """ "90s", "30m", "1.5h", "7d", "2w" -> seconds (case and spaces around are ignored).
    ValueError, saying what is allowed, for anything else: no unit, an unknown unit, a
    negative number, or longer than 5200 weeks (about 100 years)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or match[2] not in UNITS:
        raise ValueError(f"{text!r}: use {ALLOWED}")
    seconds = float(match[1]) * UNITS[match[2]]
    if seconds > LONGEST:
        raise ValueError(f"{text!r}: must be at most {LONGEST_WEEKS}w (about 100 years)")
    return seconds


def duration_option(option: str, text: str) -> float:
    """A command's duration option (`--since 7d`) in seconds, longer than zero. Bad input is a
    ConfigError naming the option: the CLI prints it as one line and exits 2."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"{option} {exc}") from None
    if seconds <= 0:
        raise ConfigError(f"{option} {text!r}: must be longer than zero")
    return seconds
