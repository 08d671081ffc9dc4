"""The playbook's reading of what leads type, in Portuguese."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from daemon.agents import TurnInput
from daemon.agents.playbook import (
    Playbook,
    brl,
    extract_money,
    extract_name,
    extract_property,
    is_question,
    stated_decision,
)
from daemon.config import AgentSettings, FollowUpSettings
from daemon.followups.calendar import BusinessHours
from daemon.models import KbEntry
from tests.helpers import FixedClock

SP = ZoneInfo("America/Sao_Paulo")
HOURS = BusinessHours.from_settings(FollowUpSettings())  # mon-sat 08:00-20:00, São Paulo
WEDNESDAY = datetime(2026, 11, 25, 10, 0, tzinfo=SP)
FRIDAY_15H = datetime(2026, 11, 27, 15, 0, tzinfo=SP)  # "sexta às 15h", said on WEDNESDAY
DECISION_QUESTION = "a decisão sobre a energia"


@pytest.mark.parametrize(
    ("text", "loose", "name"),
    [
        ("Meu nome é Ana Paula", False, "Ana Paula"),
        ("oi, me chamo joão", False, "João"),
        ("aqui é o Marcos", False, "Marcos"),
        ("Carlos Souza", True, "Carlos Souza"),
        ("Carlos Souza", False, None),
        ("bom dia", True, None),
        ("quanto custa?", True, None),
        ("tenho 2 casas", True, None),
    ],
)
def test_extract_name(text: str, loose: bool, name: str | None) -> None:
    assert extract_name(text, loose=loose) == name


@pytest.mark.parametrize(
    ("text", "loose", "value"),
    [
        ("TOTAL A PAGAR R$ 487,35", False, Decimal("487.35")),
        ("uns 450 reais", False, Decimal("450.00")),
        ("R$1.200,00", False, Decimal("1200.00")),
        ("vem uns 2 mil", False, Decimal("2000.00")),
        ("acho que 380", True, Decimal("380.00")),
        ("acho que 380", False, None),
        ("consumo 350 kwh", True, None),
        ("não sei", True, None),
    ],
)
def test_extract_money(text: str, loose: bool, value: Decimal | None) -> None:
    assert extract_money(text, loose=loose) == value


def test_question_detection() -> None:
    assert is_question("Quanto custa a instalação")
    assert is_question("tem financiamento?")
    assert not is_question("pode ser amanhã às 15h")


@pytest.mark.parametrize(
    ("text", "asks"),
    [
        # A day or an hour offered answers "Qual dia e horário?", "?" or not: searched as a
        # question, "pode ser" found an unrelated entry ("o sistema pode ser desmontado...").
        ("pode ser sexta às 15h?", False),
        ("Pode ser sexta-feira às 15h30?", False),
        ("que tal amanhã de manhã?", False),
        ("o que acha de segunda às 10h?", False),
        ("sou eu que decido\npode ser sexta às 15h?", False),
        ("sou eu, pode ser sexta às 15h?", False),
        ("pode ser instalado na sexta?", True),
        ("vocês atendem sábado?", True),
        ("quanto custa? pode ser sexta às 15h", True),
        ("tudo bem?", False),
    ],
)
def test_a_meeting_time_is_not_a_question(text: str, asks: bool) -> None:
    assert is_question(text) == asks


def test_brl() -> None:
    assert brl(Decimal("4860")) == "R$ 4.860,00"


async def test_the_knowledge_base_is_awaited_only_for_questions() -> None:
    calls = 0

    async def knowledge() -> list[KbEntry]:
        nonlocal calls
        calls += 1
        return [KbEntry(1, "financiamento", "t", "Temos financiamento em até 120 meses.", 1.0)]

    agent = Playbook(AgentSettings())
    greeting = await agent.respond(TurnInput({"stage": "new"}, ["Oi"], [], knowledge))
    assert calls == 0 and greeting.lead_updates == {"stage": "ask_name"}
    question = await agent.respond(TurnInput({"stage": "ask_name"}, ["tem financiamento?"], [], knowledge))
    assert calls == 1
    assert question.text.startswith("Temos financiamento em até 120 meses.")
    assert question.lead_updates == {}  # still waiting for the name


async def nothing() -> list[KbEntry]:
    return []


@pytest.mark.parametrize(
    ("bill", "prop", "answer", "solution", "decision"),
    [
        (200, "casa", "sou eu mesmo", "assinatura", "lead"),
        (800, "casa", "eu e minha esposa", "residencial", "compartilhada"),
        (800, "apartamento", "sim, eu", "assinatura", "lead"),
        (900, "comercial", "eu e meu sócio", "projeto_sob_medida", "compartilhada"),
        (5000, "casa", "só eu", "projeto_sob_medida", "lead"),
    ],
)
async def test_the_solution_follows_the_bill_and_the_property(
    bill: int, prop: str, answer: str, solution: str, decision: str
) -> None:
    lead = {"stage": "ask_decision", "name": "Ana", "bill_value": bill, "property_type": prop}
    reply = await Playbook(AgentSettings()).respond(TurnInput(lead, [answer], [], nothing))
    assert reply.lead_updates == {"decision_maker": decision, "solution": solution, "stage": "offer_meeting"}
    assert "agendar" in reply.text
    assert ("quem decide com você" in reply.text) == (decision == "compartilhada")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("é uma casa térrea", "casa"),
        ("moro em apartamento", "apartamento"),
        ("tenho uma loja", "comercial"),
        ("é um sítio", "rural"),
        ("não sei", None),
    ],
)
def test_extract_property(text: str, kind: str | None) -> None:
    assert extract_property(text) == kind


async def test_the_qualification_stages_in_order() -> None:
    agent, lead = Playbook(AgentSettings()), {"stage": "new"}
    said = []
    for text in ["Oi", "Carlos", "uns 650 reais", "casa", "sou eu", "pode ser sexta de manhã"]:
        reply = await agent.respond(TurnInput(lead, [text], [], nothing))
        lead = {**lead, **reply.lead_updates}
        said.append((lead["stage"], reply.text))
    assert [stage for stage, _ in said] == [
        "ask_name",
        "ask_bill",
        "ask_property",
        "ask_decision",
        "offer_meeting",
        "booked",
    ]
    assert (lead["name"], lead["bill_value"], lead["property_type"], lead["decision_maker"], lead["solution"]) == (
        "Carlos",
        Decimal("650.00"),
        "casa",
        "lead",
        "residencial",
    )
    assert "R$ 585,00 por mês" in said[4][1]  # 90 % of the bill


async def talk(lead: dict[str, Any], *bursts: list[str]) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Plays bursts to the playbook (clock on WEDNESDAY): the lead after them, every reply,
    and the last turn's updates."""
    agent = Playbook(AgentSettings(), HOURS, FixedClock(WEDNESDAY))
    said, updates = [], {}
    for texts in bursts:
        reply = await agent.respond(TurnInput(lead, texts, [], nothing))
        lead, updates = {**lead, **reply.lead_updates}, reply.lead_updates
        said.append(reply.text)
    return lead, said, updates


@pytest.mark.parametrize(
    ("text", "decision"),
    [
        ("eu que decido", "lead"),
        ("uns 600 reais, e sou eu quem decide", "lead"),
        ("casa, a decisão é só minha", "lead"),
        ("quem decide aqui sou eu", "lead"),
        ("decido com minha esposa", "compartilhada"),
        ("a gente decide junto, eu e meu marido", "compartilhada"),
        ("preciso ver com meu sócio", "compartilhada"),
        ("não sou eu que decido", "compartilhada"),
        ("ainda não decidi", None),
        ("minha casa tem 3 quartos", None),
        ("sou eu", None),  # an answer only to the question itself (read in its stage)
    ],
)
def test_stated_decision(text: str, decision: str | None) -> None:
    assert stated_decision(text) == decision


@pytest.mark.parametrize(
    ("bursts", "decision"),
    [
        ([["uns 600 reais, e eu que decido"], ["casa"]], "lead"),
        ([["uns 600 reais"], ["é casa", "a decisão é minha"]], "lead"),
        ([["uns 600 reais"], ["casa, sou eu quem decide"]], "lead"),
        ([["uns 600 reais, decido com minha esposa"], ["casa"]], "compartilhada"),
    ],
)
async def test_a_decision_already_said_is_not_asked_again(bursts: list[list[str]], decision: str) -> None:
    lead, said, _ = await talk({"stage": "ask_bill", "name": "Rita"}, *bursts)
    assert not any(DECISION_QUESTION in text for text in said)
    assert (lead["stage"], lead["decision_maker"], lead["solution"]) == ("offer_meeting", decision, "residencial")
    assert "R$ 540,00 por mês" in said[-1] and "Qual dia e horário" in said[-1]
    assert ("quem decide com você" in said[-1]) == (decision == "compartilhada")


async def test_a_decision_said_in_the_first_message_is_kept() -> None:
    lead, said, _ = await talk(
        {"stage": "new"}, ["Oi, me chamo Rita e eu que decido aqui em casa"], ["uns 600"], ["casa"]
    )
    assert lead["decision_maker"] == "lead" and lead["stage"] == "offer_meeting"
    assert not any(DECISION_QUESTION in text for text in said)


@pytest.mark.parametrize(
    ("stage", "texts", "decision", "quoted"),
    [
        ("offer_meeting", ["pode ser sexta às 15h"], None, "pode ser sexta às 15h"),
        ("offer_meeting", ["Pode ser sexta-feira, às 15h"], None, "Pode ser sexta-feira, às 15h"),
        ("offer_meeting", ["pode ser sexta às 15h?"], None, "pode ser sexta às 15h"),  # not a question
        ("ask_decision", ["sou eu que decido", "pode ser sexta às 15h"], "lead", "pode ser sexta às 15h"),
        ("ask_decision", ["sou eu que decido, pode ser sexta às 15h"], "lead", "pode ser sexta às 15h"),
        ("ask_decision", ["eu e minha esposa", "pode ser sexta às 15h"], "compartilhada", "pode ser sexta às 15h"),
        ("ask_decision", ["pode ser sexta às 15h"], None, "pode ser sexta às 15h"),  # the day, not who decides
    ],
)
async def test_a_day_and_hour_after_the_solution_is_the_meeting(
    stage: str, texts: list[str], decision: str | None, quoted: str
) -> None:
    lead = {"stage": stage, "name": "Rita", "bill_value": 600, "property_type": "casa"}
    _, [text], updates = await talk(lead, texts)
    assert (updates["stage"], updates["meeting_at"]) == ("booked", FRIDAY_15H)
    assert updates.get("decision_maker") == decision
    assert "Qual dia e horário" not in text
    assert text.endswith(
        f"Combinado, Rita! Anotei sua preferência ({quoted}). Um consultor da Sol Nascente Energia Solar "
        "vai te chamar aqui no WhatsApp para confirmar o horário. Obrigada! ☀️"
    )
    # Answered with the decision, the solution still comes first; else the booking is all.
    assert ("R$ 540,00 por mês" in text) == (stage == "ask_decision")
    assert text.startswith("Combinado") == (stage == "offer_meeting")


async def test_a_day_and_hour_with_the_property_books_when_the_decision_is_known() -> None:
    lead = {"stage": "ask_property", "name": "Rita", "bill_value": 600, "decision_maker": "lead"}
    _, [text], updates = await talk(lead, ["casa", "pode ser sexta às 15h"])
    assert (updates["stage"], updates["meeting_at"]) == ("booked", FRIDAY_15H)
    assert DECISION_QUESTION not in text and "R$ 540,00 por mês" in text


@pytest.mark.parametrize(
    "texts", [["boa tarde! sou eu"], ["sou eu, à noite falo com você"], ["sou eu", "mas hoje não dá"]]
)
async def test_no_time_with_the_decision_is_not_a_meeting(texts: list[str]) -> None:
    lead = {"stage": "ask_decision", "name": "Rita", "bill_value": 600, "property_type": "casa"}
    _, [text], updates = await talk(lead, texts)
    assert updates["stage"] == "offer_meeting" and "meeting_at" not in updates
    assert "Qual dia e horário" in text


async def test_a_nurtured_lead_back_with_a_day_and_hour_is_booked() -> None:
    _, [text], updates = await talk({"stage": "nurture", "name": "Rita"}, ["pode ser sexta às 15h"])
    assert (updates["stage"], updates["meeting_at"]) == ("booked", FRIDAY_15H)
    assert text.startswith("Combinado, Rita! Anotei sua preferência (pode ser sexta às 15h).")
