"""The playbook's reading of what leads type, in Portuguese."""

from __future__ import annotations

from decimal import Decimal

import pytest

from daemon.agents import TurnInput
from daemon.agents.playbook import Playbook, brl, extract_money, extract_name, extract_property, is_question
from daemon.config import AgentSettings
from daemon.models import KbEntry


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


def test_question_detection_and_brl() -> None:
    assert is_question("Quanto custa a instalação")
    assert is_question("tem financiamento?")
    assert not is_question("pode ser amanhã às 15h")
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
