"""Business hours in the business's time zone: follow-ups wait for them, so nobody gets a
sales message at 22:00 or on a Sunday. And the clock they are read on.

Instants stay aware datetimes; wall-clock arithmetic is done on local naive datetimes that
get the zone attached afterwards, which is what keeps DST switches right."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from daemon.config import FollowUpSettings, parse_clock, parse_days

# What time it is, for decisions that depend on the day and hour (which Friday "sexta às
# 15h" means, when a reply was sent, what is due): taken as a parameter, never read from
# the system directly, so tests run them on any date and at any hour.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The real clock, aware, in UTC: the default Clock."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class BusinessHours:
    """Open on `days` (Monday=0) from `opens` to `closes`, minutes after local midnight
    (minutes, not `time`, because "24:00" is a valid closing time)."""

    tz: ZoneInfo
    days: frozenset[int]
    opens: int
    closes: int

    def __post_init__(self) -> None:
        if not self.days or not self.days <= set(range(7)):
            raise ValueError(f"business days must be weekdays 0-6, got {sorted(self.days)}")
        if not 0 <= self.opens < self.closes <= 24 * 60:
            raise ValueError(f"business hours must open before they close ({self.opens}-{self.closes} min)")

    @classmethod
    def from_settings(cls, s: FollowUpSettings) -> BusinessHours:
        (oh, om), (ch, cm) = parse_clock(s.business_start), parse_clock(s.business_end)
        return cls(ZoneInfo(s.timezone), frozenset(parse_days(s.business_days)), oh * 60 + om, ch * 60 + cm)

    def local(self, when: datetime) -> datetime:
        """`when` on the business's wall clock."""
        return _aware(when).astimezone(self.tz)

    def is_open(self, when: datetime) -> bool:
        here = self.local(when)
        minute = here.hour * 60 + here.minute  # boundaries are whole minutes: seconds can't cross one
        return here.weekday() in self.days and self.opens <= minute < self.closes

    def next_opening(self, when: datetime) -> datetime:
        """`when` if open, else the next opening instant; in UTC either way."""
        when = _aware(when).astimezone(UTC)
        if self.is_open(when):
            return when
        today = self.local(when).date()
        opening = time(self.opens // 60, self.opens % 60)
        for offset in range(8):  # a week and a day: today's opening may already be past
            day = today + timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            # A start inside a spring-forward gap (02:30 that never happens) resolves to
            # the instant just after it (fold=0 uses the pre-switch offset).
            start = datetime.combine(day, opening, tzinfo=self.tz).astimezone(UTC)
            if start > when:  # compared in UTC: same-zone comparisons ignore DST folds
                return start
        raise ValueError("no business day is open")  # unreachable: __post_init__ refuses it


def _aware(when: datetime) -> datetime:
    # A naive datetime would silently be read in the server's own zone.
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{when!r} has no time zone")
    return when
