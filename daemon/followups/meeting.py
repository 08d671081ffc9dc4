"""The meeting time in a lead's answer to "Qual dia e horário ficam melhores para você?".

Only a day *and* an hour make a meeting: "quinta de manhã" returns None, because a
confirmation and reminders at a time the lead never said (10h for "manhã"?) would be worse
than none; the consultor settles the time in the chat. Ambiguous answers (two different
days or hours: "amanhã não, sexta às 14h") return None for the same reason."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

from daemon.followups.calendar import BusinessHours
from daemon.text import fold

WEEKDAYS = ("segunda", "terca", "quarta", "quinta", "sexta", "sabado", "domingo")
DAY = re.compile(
    r"\b(?:(?P<after>depois\s+de\s+amanha)|(?P<tomorrow>amanha)|(?P<today>hoje)"
    r"|(?P<d>\d{1,2})/(?P<m>\d{1,2})(?:/(?P<y>\d{4}|\d{2}))?"
    r"|dia\s+(?P<dom>\d{1,2})(?![\d/:h])"  # "dia 27", not "dia 27/11"
    rf"|(?P<weekday>{'|'.join(WEEKDAYS)})(?:\s*-?\s*feira)?)\b"
)
HOUR = re.compile(
    r"\b(?:(?P<h>\d{1,2}):(?P<m>\d{2})"
    r"|(?P<hh>\d{1,2})\s*(?:horas|hora|hrs|hr|hs|h)(?:\s?(?P<mm>\d{2}))?(?:\s*min)?"
    r"|(?:as|das|pelas)\s+(?P<bare>\d{1,2})(?![\d/:h])"  # "às 3"
    r"|(?P<bp>\d{1,2})(?=\s+(?:da|de)\s+(?:manha|tarde|noite))"  # "3 da tarde"
    r"|(?P<noon>meio\s*-?\s*dia))\b"
    r"(?:\s*(?:da|de)\s+(?P<period>manha|tarde|noite))?"
)
# Nobody books a sales call at 3 a.m.: "às 3" and "3h" mean 15h, as people say them.
AFTERNOON_BELOW = 7
# A dd/mm this many days gone is next year's (in December "10/01" means January).
NEXT_YEAR_AFTER = 180


def parse_meeting(text: str, now: datetime, hours: BusinessHours) -> datetime | None:
    """The meeting instant (aware, UTC), or None unless the text names one future day and
    one hour. Days and hours are read on the business's clock."""
    f = fold(text)
    today = hours.local(now).date()
    days: set[date] = set()
    clocks: set[time] = set()
    by_weekday = False
    for match in DAY.finditer(f):
        day = _day(match, today)
        if day is None:
            return None
        days.add(day)
        by_weekday = by_weekday or bool(match["weekday"])
    # Dates are blanked out first, so "27/11/2026 15:00" doesn't read 27 or 11 as hours.
    for match in HOUR.finditer(DAY.sub(lambda m: " " * len(m.group(0)), f)):
        clock = _clock(match)
        if clock is None:
            return None
        clocks.add(clock)
    if len(days) != 1 or len(clocks) != 1:
        return None
    day, clock = days.pop(), clocks.pop()
    at = _instant(day, clock, hours)
    if at <= now and by_weekday:  # "sexta às 14h" said on a Friday at 16h: next Friday
        at = _instant(day + timedelta(days=7), clock, hours)
    return at if at > now else None


def _day(match: re.Match[str], today: date) -> date | None:
    if match["after"]:
        return today + timedelta(days=2)
    if match["tomorrow"]:
        return today + timedelta(days=1)
    if match["today"]:
        return today
    if match["weekday"]:
        return today + timedelta(days=(WEEKDAYS.index(match["weekday"]) - today.weekday()) % 7)
    if match["dom"]:  # this month's, else next month's
        for month_start in (today.replace(day=1), (today.replace(day=28) + timedelta(days=4)).replace(day=1)):
            day = _date(month_start.year, month_start.month, int(match["dom"]))
            if day is not None and day >= today:
                return day
        return None
    year = int(match["y"]) if match["y"] else today.year
    year += 2000 if year < 100 else 0
    day = _date(year, int(match["m"]), int(match["d"]))
    if day is not None and not match["y"] and (today - day).days > NEXT_YEAR_AFTER:
        day = _date(year + 1, day.month, day.day)
    return day


def _clock(match: re.Match[str]) -> time | None:
    if match["noon"]:
        return time(12)
    hour = int(match["h"] or match["hh"] or match["bare"] or match["bp"])
    minute = int(match["m"] or match["mm"] or 0)
    period = match["period"]
    if (period in ("tarde", "noite") and hour < 12) or (period is None and 0 < hour < AFTERNOON_BELOW):
        hour += 12
    return time(hour, minute) if hour < 24 and minute < 60 else None


def _date(year: int, month: int, day: int) -> date | None:
    try:
        return date(year, month, day)
    except ValueError:
        return None


def _instant(day: date, clock: time, hours: BusinessHours) -> datetime:
    # The wall clock the lead means, in the business's zone, then UTC.
    return datetime.combine(day, clock, tzinfo=hours.tz).astimezone(UTC)
