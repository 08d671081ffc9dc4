"""The agent's tools and their rules (issue #18): every argument checked server-side, a
refused call explained to the model, nothing written by a call that breaks a rule. The
clock is pinned: Friday 2026-12-04 10:00 in São Paulo (business hours Mon-Sat 08-20)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from daemon.agents import TurnInput
from daemon.agents.openai import SYSTEM_PROMPT, bounded_history, leaks
from daemon.agents.playbook import Playbook
from daemon.agents.stream import Paragraphs
from daemon.agents.tools import AGENT_FOLLOWUP, TOOLS, ToolBox, ToolRules
from daemon.config import AgentSettings, FollowUpSettings
from daemon.models import KbEntry

SP = ZoneInfo("America/Sao_Paulo")
NOW = datetime(2026, 12, 4, 10, 0, tzinfo=SP).astimezone(UTC)
ENTRY = KbEntry(id=1, category="financiamento", title="Financiamento", content="Parcelamos em até 120 vezes.", rank=1.0)


def box() -> tuple[ToolBox, list[str]]:
    searched: list[str] = []

    async def search(query: str) -> list[KbEntry]:
        searched.append(query)
        return [ENTRY]

    return ToolBox(ToolRules.from_settings(FollowUpSettings()), NOW, search), searched


async def call(b: ToolBox, tool: str, /, **args: object) -> dict[str, object]:
    result: dict[str, object] = json.loads(await b.call(tool, json.dumps(args)))
    return result


def test_every_tool_has_a_strict_schema() -> None:
    names = [t["function"]["name"] for t in TOOLS]
    assert names == ["search_knowledge", "update_lead", "book_meeting", "request_human", "schedule_followup"]
    assert all(t["function"]["parameters"]["additionalProperties"] is False for t in TOOLS)


async def test_a_meeting_at_3am_is_refused_and_one_at_15h_is_booked() -> None:
    b, _ = box()
    refused = await call(b, "book_meeting", when="2026-12-05T03:00")
    assert "outside business hours" in str(refused["error"]) and "08:00-20:00" in str(refused["error"])
    assert b.effects.updates == {}
    booked = await call(b, "book_meeting", when="2026-12-05T15:00", notes="quer ver financiamento")
    assert booked["ok"] is True and "sábado, 05/12, às 15h" in str(booked["meeting"])
    assert b.effects.updates == {"meeting_at": datetime(2026, 12, 5, 15, 0, tzinfo=SP), "stage": "booked"}
    assert b.effects.calls == [("book_meeting", False), ("book_meeting", True)]


@pytest.mark.parametrize(
    ("when", "why"),
    [
        ("2026-12-04T09:00", "too soon"),  # in the past
        ("2026-12-04T10:30", "too soon"),  # within the hour's notice
        ("2027-03-01T10:00", "too far"),
        ("2026-12-06T10:00", "outside business hours"),  # a Sunday
        ("2026-12-05T19:50", "outside business hours"),  # ends after 20:00
        ("sexta às 15h", "ISO 8601"),
        ("2026-12-05T15:00-03:00 ", None),  # an offset is read as written
    ],
)
async def test_book_meeting_rules(when: str, why: str | None) -> None:
    b, _ = box()
    result = await call(b, "book_meeting", when=when)
    if why is None:
        assert result["ok"] is True
    else:
        assert why in str(result["error"]) and "meeting_at" not in b.effects.updates


async def test_update_lead_is_all_or_nothing() -> None:
    b, _ = box()
    # "marque que eu sou o decisor e que minha conta é R$ 1": one bad value refuses both
    refused = await call(b, "update_lead", decision_maker="lead", bill_value=1)
    assert "bill_value 1" in str(refused["error"]) and b.effects.updates == {}
    for args, why in [
        ({"stage": "booked"}, "unknown argument"),  # the stage is not the model's to set
        ({"paused_until": None}, "unknown argument"),
        ({"property_type": "castelo"}, "one of casa"),
        ({"name": "Robert'); DROP TABLE leads;--"}, "letters only"),
        ({"consumption_kwh": 2.5}, "whole number"),
        ({}, "at least one field"),
    ]:
        assert why in str((await call(b, "update_lead", **args))["error"])
    assert b.effects.updates == {}
    ok = await call(b, "update_lead", name="Ana Paula", bill_value=487.35, property_type="casa")
    assert ok["ok"] is True
    assert b.effects.updates == {"name": "Ana Paula", "bill_value": Decimal("487.35"), "property_type": "casa"}


async def test_unknown_tools_and_malformed_arguments_go_back_as_errors() -> None:
    b, _ = box()
    sent = json.loads(await b.call("send_message", json.dumps({"number": "5511999990000", "text": "oi"})))
    assert "unknown tool 'send_message'" in sent["error"]
    assert "not valid JSON" in json.loads(await b.call("book_meeting", '{"when": "2026-12-05T15'))["error"]
    assert "missing when" in json.loads(await b.call("book_meeting", "{}"))["error"]
    assert b.effects.updates == {} and b.effects.handoff is None and b.effects.followup is None


async def test_search_request_human_and_a_bounded_follow_up() -> None:
    b, searched = box()
    found = await call(b, "search_knowledge", query="dá pra parcelar?")
    assert searched == ["dá pra parcelar?"] and found["entries"] == [{"title": ENTRY.title, "content": ENTRY.content}]
    assert "between 1h and 30d" in str((await call(b, "schedule_followup", after="5m", reason="x"))["error"])
    assert "between 1h and 30d" in str((await call(b, "schedule_followup", after="90d", reason="x"))["error"])
    assert "a duration" in str((await call(b, "schedule_followup", after="amanhã", reason="x"))["error"])
    assert b.effects.followup is None
    # Saturday 20:00 + 2 days lands on a Sunday night: moved to Monday's opening
    planned = await call(b, "schedule_followup", after="3d", reason="vai falar com a esposa")
    assert planned["ok"] is True
    f = b.effects.followup
    assert f is not None and f.kind == AGENT_FOLLOWUP and f.payload == {"reason": "vai falar com a esposa"}
    assert f.due_at == datetime(2026, 12, 7, 10, 0, tzinfo=SP)
    await call(b, "request_human", reason="quer negociar desconto")
    assert b.effects.handoff == "quer negociar desconto"


def test_history_is_bounded_in_tokens_newest_first() -> None:
    history = [{"direction": "in" if i % 2 else "out", "body": f"{i:03d} " + "x" * 396} for i in range(40)]
    kept = bounded_history(history, 1000)  # ~4000 characters: the last 10 messages of 400
    assert [m["content"][:3] for m in kept] == [f"{i:03d}" for i in range(30, 40)]
    assert kept[-1]["role"] == "user"


def test_a_reply_that_repeats_the_prompt_is_caught() -> None:
    prompt = "Você é Sol, SDR da Sol Nascente, e atende leads pelo WhatsApp com mensagens curtas e simpáticas."
    words = AgentSettings().leak_words  # [agent] leak_words, 12
    dump = "Claro! Minhas instruções: você é Sol, SDR da Sol Nascente, e atende leads pelo WhatsApp"
    assert leaks(dump, prompt, words)
    assert not leaks(dump, prompt, 20)  # 14 words of it in a row: under a longer limit
    assert not leaks("Oi! Eu sou a Sol, da Sol Nascente. Como posso te chamar?", prompt, words)
    real = SYSTEM_PROMPT.format(persona="Sol", company="Sol Nascente")
    assert not leaks("Quer que eu agende uma conversa de 20 minutos com um consultor?", real, words)


def test_paragraphs_are_cut_as_they_arrive_and_short_ones_wait() -> None:
    cut = Paragraphs(min_part=20, max_len=1000)
    assert cut.feed("Oi, Ana!\n") == []
    assert cut.feed("\nA energia solar reduz a conta") == []  # "Oi, Ana!" is too short alone
    assert cut.feed(" em até 90%.\n\nQuer agendar?") == ["Oi, Ana!\n\nA energia solar reduz a conta em até 90%."]
    assert cut.flush() == ["Quer agendar?"]  # the end of the reply: the rest goes, short or not
    assert cut.feed("meia frase") == [] and cut.pending == "meia frase"  # never sent unless flushed


@pytest.mark.parametrize(
    ("said", "booked"),
    [
        ("pode ser amanhã às 15h", datetime(2026, 12, 5, 15, 0, tzinfo=SP)),
        ("pode ser hoje às 10h30", None),  # half an hour from now: inside the hour's notice
    ],
)
async def test_the_playbook_books_under_the_same_rules(said: str, booked: datetime | None) -> None:
    b, _ = box()

    async def nothing() -> list[KbEntry]:
        return []

    hours = ToolRules.from_settings(FollowUpSettings()).hours
    agent = Playbook(AgentSettings(), hours, lambda: NOW)
    lead = {"stage": "offer_meeting", "name": "Ana"}
    reply = await agent.respond(TurnInput(lead, [said], [], nothing, tools=b))
    assert reply.lead_updates.get("stage") == "booked"  # the preference is noted either way
    assert reply.lead_updates.get("meeting_at") == booked and b.effects.updates.get("meeting_at") == booked
