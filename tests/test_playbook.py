"""The playbook's reading of what leads type, in Portuguese."""

from __future__ import annotations

from decimal import Decimal

import pytest

from daemon.agents import TurnInput
from daemon.agents.playbook import Playbook, brl, extract_money, extract_name, is_question
from daemon.config import AgentSettings
from daemon.store import KbEntry


@pytest.mark.parametrize(("text", "loose", "name"), [
    ("Meu nome é Ana Paula", False, "Ana Paula"),
    ("oi, me chamo joão", False, "João"),
    ("aqui é o Marcos", False, "Marcos"),
    ("Carlos Souza", True, "Carlos Souza"),
    ("Carlos Souza", False, None),
    ("bom dia", True, None),
    ("quanto custa?", True, None),
    ("tenho 2 casas", True, None),
])  # fmt: skip
def test_extract_name(text: str, loose: bool, name: str | None) -> None:
    assert extract_name(text, loose=loose) == name


@pytest.mark.parametrize(("text", "loose", "value"), [
    ("TOTAL A PAGAR R$ 487,35", False, Decimal("487.35")),
    ("uns 450 reais", False, Decimal("450.00")),
    ("R$1.200,00", False, Decimal("1200.00")),
    ("vem uns 2 mil", False, Decimal("2000.00")),
    ("acho que 380", True, Decimal("380.00")),
    ("acho que 380", False, None),
    ("consumo 350 kwh", True, None),
    ("não sei", True, None),
])  # fmt: skip
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


@pytest.mark.parametrize(("bill", "solution"), [("R$ 200", "assinatura"), ("R$ 800", "residencial"), ("R$ 5.000", "projeto_sob_medida")])
async def test_the_solution_follows_the_bill_value(bill: str, solution: str) -> None:
    async def knowledge() -> list[KbEntry]:
        return []

    reply = await Playbook(AgentSettings()).respond(
        TurnInput({"stage": "ask_bill", "name": "Ana"}, [f"minha conta é {bill}"], [], knowledge)
    )
    assert reply.lead_updates["solution"] == solution
    assert reply.lead_updates["stage"] == "offer_meeting"
    assert "agendar" in reply.text
