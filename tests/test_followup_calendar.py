"""Follow-ups' clock and words: business hours across weekends and DST, templates that
never show a hole, and meeting times read from what leads type."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from daemon.agents import TurnInput
from daemon.agents.playbook import Playbook
from daemon.config import AgentSettings, FollowUpSettings
from daemon.followups.calendar import BusinessHours, utc_now
from daemon.followups.meeting import parse_meeting
from daemon.followups.templates import meeting_phrase, render, values_for
from daemon.models import KbEntry
from tests.helpers import FixedClock

SP = ZoneInfo("America/Sao_Paulo")
NY = ZoneInfo("America/New_York")
SETTINGS = FollowUpSettings()
HOURS = BusinessHours.from_settings(SETTINGS)  # mon-sat 08:00-20:00, São Paulo
NY_HOURS = BusinessHours.from_settings(replace(SETTINGS, timezone="America/New_York"))
NOW = datetime(2026, 11, 25, 10, 0, tzinfo=SP)  # a Wednesday


def sp(year: int, month: int, day: int, hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=SP)


# --- business hours -------------------------------------------------------------------


def test_settings_become_business_hours() -> None:
    assert HOURS.tz == SP and HOURS.days == frozenset(range(6))
    assert (HOURS.opens, HOURS.closes) == (8 * 60, 20 * 60)


@pytest.mark.parametrize(
    ("when", "opening"),
    [
        (sp(2026, 11, 27, 22, 0), sp(2026, 11, 28, 8, 0)),  # Friday night -> Saturday
        (sp(2026, 11, 28, 21, 0), sp(2026, 11, 30, 8, 0)),  # Saturday night -> Monday
        (sp(2026, 11, 29, 12, 0), sp(2026, 11, 30, 8, 0)),  # Sunday -> Monday
        (sp(2026, 11, 25, 7, 0), sp(2026, 11, 25, 8, 0)),  # before opening -> same day
        (sp(2026, 11, 25, 20, 0), sp(2026, 11, 26, 8, 0)),  # closing time is closed
        (sp(2026, 11, 25, 8, 0), sp(2026, 11, 25, 8, 0)),  # opening time is open
        (sp(2026, 11, 25, 19, 59, 59), sp(2026, 11, 25, 19, 59, 59)),
        (sp(2026, 11, 25, 14, 30), sp(2026, 11, 25, 14, 30)),  # inside: unchanged
    ],
)
def test_next_opening_in_sao_paulo(when: datetime, opening: datetime) -> None:
    got = HOURS.next_opening(when)
    assert got == opening and got.tzinfo is UTC
    assert HOURS.is_open(got)


def test_any_zone_in_utc_out() -> None:
    # Friday 22:00 in São Paulo (UTC-3) given in UTC: Saturday 08:00 local = 11:00 UTC.
    assert HOURS.next_opening(datetime(2026, 11, 28, 1, 0, tzinfo=UTC)) == datetime(2026, 11, 28, 11, 0, tzinfo=UTC)
    assert HOURS.local(datetime(2026, 11, 28, 1, 0, tzinfo=UTC)) == sp(2026, 11, 27, 22, 0)
    assert not HOURS.is_open(datetime(2026, 11, 28, 1, 0, tzinfo=UTC))
    assert HOURS.is_open(datetime(2026, 11, 28, 11, 0, tzinfo=UTC))


def test_next_opening_across_dst_switches() -> None:
    # Spring forward on Sunday 2026-03-08: Monday 08:00 is EDT (UTC-4), not EST.
    spring = NY_HOURS.next_opening(datetime(2026, 3, 7, 21, 0, tzinfo=NY))
    assert spring == datetime(2026, 3, 9, 12, 0, tzinfo=UTC)
    # Fall back on Sunday 2026-11-01: Monday 08:00 is EST (UTC-5).
    fall = NY_HOURS.next_opening(datetime(2026, 10, 31, 21, 0, tzinfo=NY))
    assert fall == datetime(2026, 11, 2, 13, 0, tzinfo=UTC)
    assert NY_HOURS.local(fall).hour == 8 and NY_HOURS.local(spring).hour == 8


def test_an_opening_inside_the_spring_forward_gap_is_the_instant_after_it() -> None:
    # 02:30 never happens on 2026-03-08 in New York: clocks jump 02:00 EST -> 03:00 EDT.
    hours = BusinessHours(NY, frozenset({6}), 2 * 60 + 30, 20 * 60)
    got = hours.next_opening(datetime(2026, 3, 8, 1, 0, tzinfo=NY))
    assert got == datetime(2026, 3, 8, 7, 30, tzinfo=UTC)  # 03:30 EDT
    assert hours.is_open(got)


def test_sunday_only_business_waits_a_week() -> None:
    hours = replace(HOURS, days=frozenset({6}))
    assert hours.next_opening(sp(2026, 11, 29, 20, 0)) == sp(2026, 12, 6, 8, 0)
    closes_at_midnight = replace(HOURS, closes=24 * 60)
    assert closes_at_midnight.is_open(sp(2026, 11, 25, 23, 59))


def test_bad_hours_and_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="business days"):
        BusinessHours(SP, frozenset(), 480, 1200)
    with pytest.raises(ValueError, match="open before"):
        BusinessHours(SP, frozenset({0}), 1200, 480)
    with pytest.raises(ValueError, match="no time zone"):
        HOURS.next_opening(datetime(2026, 11, 25, 10, 0))


# --- templates ------------------------------------------------------------------------

ALL = {
    "name": "Ana",
    "name_comma": ", Ana",
    "bill_value": "R$ 500,00",
    "savings": "R$ 450,00",
    "meeting": "sexta-feira, 27/11, às 15h",
}


def test_render_fills_every_placeholder() -> None:
    assert render(SETTINGS.reengage_template, ALL) == (
        "Oi, Ana! Ficou alguma dúvida sobre a energia solar? Com uma conta de R$ 500,00, dá para "
        "economizar cerca de R$ 450,00 por mês. Posso te ajudar a continuar?"
    )
    assert render(SETTINGS.meeting_reminder_template, ALL) == (
        "Oi, Ana! Lembrete: sua conversa com um consultor é sexta-feira, 27/11, às 15h. Até lá! ☀️"
    )


def test_no_name_empties_name_comma_but_drops_sentences_with_name() -> None:
    values = {**ALL, "name": None, "name_comma": ""}
    assert render(SETTINGS.nurture_template, values) == (
        "Oi! Passando para lembrar que a energia solar pode reduzir sua conta de luz em até 90%. "
        "Quando quiser conversar, é só me chamar por aqui ☀️"
    )
    assert render("Olá, {name}! Tudo certo por aí com você?", values) == "Tudo certo por aí com você?"
    assert render("Oi{name_comma}! Tudo certo por aí com você?", {}) == "Oi! Tudo certo por aí com você?"


def test_a_missing_bill_drops_its_sentence_only() -> None:
    values = {**ALL, "bill_value": None, "savings": None}
    assert render(SETTINGS.reengage_template, values) == (
        "Oi, Ana! Ficou alguma dúvida sobre a energia solar? Posso te ajudar a continuar?"
    )


def test_unknown_placeholders_and_stray_braces_drop_their_sentence() -> None:
    assert render("Oi {nome}! Tudo bem com a sua conta?", ALL) == "Tudo bem com a sua conta?"
    assert render("Oi! Sua conta {bill_value:>10} chegou. Vamos conversar sobre ela?", ALL) == (
        "Oi! Vamos conversar sobre ela?"
    )
    assert render("Oi {nome! Vamos conversar sobre energia?", ALL) == "Vamos conversar sobre energia?"
    # Braces inside a value are the value's business, not a broken template.
    assert render("Olá, {name}! Tudo certo?", {"name": "{Ana}"}) == "Olá, {Ana}! Tudo certo?"


def test_line_breaks_between_sentences_survive() -> None:
    template = "Oi{name_comma}!\n\nSua conta de {bill_value} pode cair. Vamos conversar sobre isso?"
    assert render(template, ALL) == "Oi, Ana!\n\nSua conta de R$ 500,00 pode cair. Vamos conversar sobre isso?"
    assert render(template, {**ALL, "bill_value": None}) == "Oi, Ana!\n\nVamos conversar sobre isso?"


def test_nothing_worth_sending_is_none() -> None:
    assert render("Sua conta de {bill_value}. Economia de {savings}!", {}) is None
    # A greeting and a sign-off are not a message once the point of it was dropped...
    assert render(SETTINGS.meeting_reminder_template, {**ALL, "meeting": None}) is None
    assert render(SETTINGS.meeting_confirmation_template, {"name_comma": ", Ana"}) == (
        "Confirmado, Ana! Qualquer mudança, é só me avisar por aqui."
    )
    # ...but a short template rendered whole is sent as the operator wrote it.
    assert render("Oi{name_comma}! ☀️", ALL) == "Oi, Ana! ☀️"
    assert render("   ", ALL) is None
    assert render("{bill_value}", {}) is None


def test_values_for_a_known_lead() -> None:
    lead = {"name": "Ana Paula", "push_name": "Paulinha", "bill_value": Decimal("487.35")}
    meeting = sp(2026, 11, 27, 15, 0).astimezone(UTC)
    assert values_for(lead, SETTINGS, meeting, HOURS) == {
        "name": "Ana Paula",
        "name_comma": ", Ana Paula",
        "bill_value": "R$ 487,35",
        "savings": "R$ 438,62",
        "meeting": "sexta-feira, 27/11, às 15h",
    }


@pytest.mark.parametrize(
    ("lead", "name", "bill", "savings"),
    [
        ({"push_name": "joão pedro", "bill_value": "1200.50"}, "João", "R$ 1.200,50", "R$ 1.080,45"),
        ({"push_name": "🌻 ana 🌻", "bill_value": 500.0}, "Ana", "R$ 500,00", "R$ 450,00"),
        ({"push_name": "~MARIA", "bill_value": "R$ 1.234,56"}, "Maria", "R$ 1.234,56", "R$ 1.111,10"),
        ({"push_name": "☀️☀️", "bill_value": 0}, None, None, None),
        ({"name": "", "push_name": None, "bill_value": "não sei"}, None, None, None),
        ({}, None, None, None),
    ],
)
def test_values_for_partial_leads(
    lead: dict[str, object], name: str | None, bill: str | None, savings: str | None
) -> None:
    values = values_for(lead, SETTINGS, None, HOURS)
    assert values == {
        "name": name,
        "name_comma": f", {name}" if name else "",
        "bill_value": bill,
        "savings": savings,
        "meeting": None,
    }


def test_no_savings_promised_at_a_zero_rate() -> None:
    values = values_for({"bill_value": 300}, replace(SETTINGS, savings_rate=0.0), None, HOURS)
    assert values["bill_value"] == "R$ 300,00" and values["savings"] is None


def test_meeting_phrase_is_local_portuguese() -> None:
    assert meeting_phrase(datetime(2026, 11, 30, 12, 30, tzinfo=UTC), HOURS) == "segunda-feira, 30/11, às 9h30"
    assert meeting_phrase(sp(2026, 11, 28, 10, 5), HOURS) == "sábado, 28/11, às 10h05"
    assert meeting_phrase(sp(2026, 11, 24, 16, 0), HOURS) == "terça-feira, 24/11, às 16h"


# --- meeting times --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "local"),
    [
        ("amanhã às 15h", sp(2026, 11, 26, 15, 0)),
        ("amanha 10:30", sp(2026, 11, 26, 10, 30)),
        ("Amanhã, 15h30min", sp(2026, 11, 26, 15, 30)),
        ("hoje 16h", sp(2026, 11, 25, 16, 0)),
        ("hoje às 10:01", sp(2026, 11, 25, 10, 1)),
        ("sexta às 14h", sp(2026, 11, 27, 14, 0)),
        ("Pode ser na sexta-feira, às 14 horas", sp(2026, 11, 27, 14, 0)),
        ("segunda-feira 9h", sp(2026, 11, 30, 9, 0)),
        ("Terça 11hs", sp(2026, 12, 1, 11, 0)),
        ("quarta às 11h", sp(2026, 11, 25, 11, 0)),  # today, still ahead
        ("quarta às 9h", sp(2026, 12, 2, 9, 0)),  # today, already past: next week
        ("sábado 10h", sp(2026, 11, 28, 10, 0)),
        ("dia 27 às 15h", sp(2026, 11, 27, 15, 0)),
        ("dia 3 às 15h", sp(2026, 12, 3, 15, 0)),  # the 3rd is gone this month: next month's
        ("27/11 às 15h", sp(2026, 11, 27, 15, 0)),
        ("27/11/2026 15:00", sp(2026, 11, 27, 15, 0)),
        ("27/11/26 15:00", sp(2026, 11, 27, 15, 0)),
        ("10/01 às 9h", sp(2027, 1, 10, 9, 0)),  # January, said in November
        ("depois de amanhã às 11h", sp(2026, 11, 27, 11, 0)),
        ("amanhã às 3 da tarde", sp(2026, 11, 26, 15, 0)),
        ("amanhã às 3", sp(2026, 11, 26, 15, 0)),  # nobody books a call at 3 a.m.
        ("amanhã 8 da noite", sp(2026, 11, 26, 20, 0)),
        ("amanhã 10 da manhã", sp(2026, 11, 26, 10, 0)),
        ("amanhã ao meio-dia", sp(2026, 11, 26, 12, 0)),
        ("sexta, 27/11, às 15h", sp(2026, 11, 27, 15, 0)),  # two names for one day
        ("bom dia! amanhã 10h", sp(2026, 11, 26, 10, 0)),
    ],
)
def test_parse_meeting(text: str, local: datetime) -> None:
    got = parse_meeting(text, NOW, HOURS)
    assert got == local and got is not None and got.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "quinta de manhã",  # a period is not an hour
        "amanhã à tarde",
        "amanhã",
        "às 15h",
        "sim, pode ser",
        "hoje às 9h",  # already past
        "20/11 às 15h",  # past date
        "27/11/2025 15:00",
        "31/11 às 15h",  # no such day
        "amanhã às 25h",
        "amanhã não, sexta às 14h",  # two days: ask again rather than guess
        "amanhã às 10h ou 15h",
    ],
)
def test_parse_meeting_needs_one_future_day_and_hour(text: str) -> None:
    assert parse_meeting(text, NOW, HOURS) is None


def test_parse_meeting_reads_the_business_clock() -> None:
    # 02:00 UTC on Thursday is still Wednesday 23:00 in São Paulo: "amanhã" is Thursday.
    now = datetime(2026, 11, 26, 2, 0, tzinfo=UTC)
    assert parse_meeting("amanhã às 15h", now, HOURS) == sp(2026, 11, 26, 15, 0)
    # New York, the day after the spring-forward switch: 15h is EDT.
    ny_now = datetime(2026, 3, 7, 12, 0, tzinfo=NY)
    assert parse_meeting("segunda 15h", ny_now, NY_HOURS) == datetime(2026, 3, 9, 19, 0, tzinfo=UTC)
    assert parse_meeting("amanhã às 15h", NOW, HOURS) == NOW + timedelta(days=1, hours=5)


@pytest.mark.parametrize(
    "now",
    [
        sp(2027, 3, 5, 10, 0),  # a Friday
        sp(2027, 3, 6, 20, 30),  # a Saturday evening
        sp(2027, 3, 7, 11, 0),  # a Sunday
    ],
)
async def test_the_playbook_reads_meeting_days_on_its_clock(now: datetime) -> None:
    async def no_knowledge() -> list[KbEntry]:
        return []

    agent = Playbook(AgentSettings(), HOURS, FixedClock(now))
    lead = {"stage": "offer_meeting", "name": "Rita"}
    reply = await agent.respond(TurnInput(lead, ["Pode ser segunda às 15h"], [], no_knowledge))
    assert reply.lead_updates["stage"] == "booked"
    assert reply.lead_updates["meeting_at"] == sp(2027, 3, 8, 15, 0)  # the Monday after, each time


def test_the_real_clock_is_aware_and_in_utc() -> None:
    assert utc_now().tzinfo is UTC
