"""daemon/durations.py: the one parser of durations, for the profile's delays and every
command's duration option, and what its callers make of it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from daemon.config import parse_durations
from daemon.durations import ALLOWED, duration_option, parse_duration
from daemon.errors import ConfigError
from daemon.tools.replay import parse_since
from daemon.tools.soak import soak_seconds


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("1.5h", 5400),
        ("24h", 86400),
        ("2d", 172800),
        ("2w", 1209600),
        ("0.5m", 30),
        (".5m", 30),
        ("5.m", 300),
        ("0s", 0),
        ("30M", 1800),  # minutes, whatever the case: there is no month
        (" 7 d ", 604800),
        ("5200w", 5200 * 604800),
    ],
)
def test_a_number_and_a_unit_is_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["90", "", "h", "-5m", "+5m", "1e3s", "5x", "5ms", "1h30m", "1,5h", "inf s", "nan h", "1..5h", "5 minutes"],
)
def test_anything_else_is_a_value_error_saying_what_is_allowed(text: str) -> None:
    with pytest.raises(ValueError, match=r"use a number and a unit \(s, m, h, d or w\), such as 30m"):
        parse_duration(text)


def test_a_duration_is_at_most_about_a_century() -> None:
    with pytest.raises(ValueError, match="at most 5200w"):
        parse_duration("5201w")
    with pytest.raises(ValueError, match="at most 5200w"):
        parse_duration("99999999999999999999d")


def test_an_option_is_a_config_error_naming_it_and_longer_than_zero() -> None:
    assert duration_option("--since", "1.5h") == 5400
    with pytest.raises(ConfigError) as bad:
        duration_option("--since", "3x")
    assert str(bad.value) == f"--since '3x': use {ALLOWED}"
    with pytest.raises(ConfigError, match="--since '0h': must be longer than zero"):
        duration_option("--since", "0h")


def test_the_profiles_delays_take_lists_of_durations() -> None:
    assert parse_durations("30m, 24h") == [1800, 86400]
    assert parse_durations("2w,1.5h,") == [1209600, 5400]
    assert parse_durations("") == []
    with pytest.raises(ValueError):
        parse_durations("30m, soon")


def test_replay_since_is_a_duration_a_date_or_all() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert parse_since("1.5h", now) == now - timedelta(minutes=90)
    assert parse_since("2w", now) == now - timedelta(weeks=2)
    assert parse_since("2026-02-01T00:00:00+00:00", now) == datetime(2026, 2, 1, tzinfo=UTC)
    assert parse_since("ALL", now) is None
    with pytest.raises(ConfigError, match="--since 'last week': use a number and a unit .*, a date .*, or all"):
        parse_since("last week", now)


def test_a_soak_takes_any_duration_from_a_minute_to_a_day() -> None:
    assert soak_seconds("1d") == soak_seconds("24h") == 86400
    for bad in ("59s", "2d", "30", "5x"):
        with pytest.raises(ConfigError, match="from 1m to 24h"):
            soak_seconds(bad)
