"""People beside the bot (issue #17), on the embedded stack with the fake Evolution API: a
person writing from the business's number pauses the lead (the bot's own sends do not), a
turn in flight then sends nothing, "PARAR" is one confirmation and no follow-up ever, an
ignored number is never answered, and a lead asking for a person is handed over."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from daemon.config import HandoverKnobs, HandoverSettings, SloSettings
from daemon.embedded import Endpoints
from daemon.handover import Intents
from daemon.models import Takeover
from daemon.testing.servers import background_server, quiet_server
from daemon.tools.report import Window, build_report
from tests.helpers import event, fetch, make_config, metric, run_daemon, run_fake_evolution, sdrctl, wait_for

PHONE = "5511944443333"
FIXTURES = Path(__file__).parent / "fixtures" / "evolution"
TEXTS = HandoverSettings()
_ids = itertools.count(1)


def from_me(text: str, message_id: str | None = None) -> dict[str, Any]:
    """What Evolution posts when a person writes to the lead from the business's phone."""
    body = event(PHONE, text, message_id=message_id or f"OPERATOR{next(_ids):04d}")
    body["data"]["key"]["fromMe"] = True
    body["data"]["pushName"] = "Loja Exemplo"
    return body


async def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as http:
        resp = await http.post("/webhook/evolution", json=body)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())


async def turns(clean: Endpoints) -> list[asyncpg.Record]:
    return await fetch(clean.database_url, "SELECT outcome, messages_joined FROM turns ORDER BY id")


async def until_turns(clean: Endpoints, n: int) -> list[asyncpg.Record]:
    async def enough() -> list[asyncpg.Record] | None:
        rows = await turns(clean)
        return rows if len(rows) >= n else None

    return await wait_for(enough)


async def lead(clean: Endpoints) -> asyncpg.Record:
    [row] = await fetch(clean.database_url, "SELECT * FROM leads WHERE phone_number = $1", PHONE)
    return row


async def pending_follow_ups(clean: Endpoints) -> int:
    rows = await fetch(clean.database_url, "SELECT count(*) AS n FROM follow_ups WHERE status = 'pending'")
    return int(rows[0]["n"])


def with_evolution(clean: Endpoints, url: str, **env: str) -> Any:
    return make_config(clean, SDR_EVOLUTION_BASE_URL=url, **env)


async def test_a_person_writing_from_the_business_phone_pauses_the_lead(clean: Endpoints) -> None:
    start = datetime.now(UTC)
    async with run_fake_evolution() as evo, run_daemon(with_evolution(clean, evo.url)) as d:
        await post(d.url, event(PHONE, "Oi"))
        await wait_for(lambda: asyncio.sleep(0, len(evo.sent) == 1 or None))
        assert await pending_follow_ups(clean) == 1  # a re-engagement, planned after the reply
        # The bot's own sends change nothing: the id of a sendText, and `send.message`.
        assert await post(d.url, from_me(evo.sent[0]["text"], evo.sent[0]["id"])) == {"status": "echo"}
        send_message = json.loads((FIXTURES / "send_message.json").read_text())
        assert await post(d.url, send_message) == {"status": "ignored", "reason": "own_send"}
        await post(d.url, event(PHONE, "meu nome é Ana"))
        await wait_for(lambda: asyncio.sleep(0, len(evo.sent) == 2 or None))

        took = await post(d.url, from_me("Oi Ana, aqui é o Rafael. Te ligo em 5 minutos.", "PERSON1"))
        again = await post(d.url, from_me("Oi Ana, aqui é o Rafael. Te ligo em 5 minutos.", "PERSON1"))
        await post(d.url, event(PHONE, "Rafael, pode me ligar depois das 18h?"))
        silent = await until_turns(clean, 3)
        await asyncio.sleep(0.5)  # no reply may follow
        paused = await lead(clean)
        sends_while_paused = len(evo.sent)
        follow_ups_while_paused = await pending_follow_ups(clean)  # cancelled, none planned since
        async with httpx.AsyncClient(base_url=d.url) as http:
            scraped = (await http.get("/metrics")).text

        # The pause ends (here: it expired): the bot answers again.
        await fetch(clean.database_url, "UPDATE leads SET paused_until = now() - interval '1 second'")
        await post(d.url, event(PHONE, "oi? alguém aí?"))
        await wait_for(lambda: asyncio.sleep(0, len(evo.sent) == 3 or None))
    assert took == {"status": "takeover"} and again == {"status": "duplicate"}
    assert sends_while_paused == 2 and silent[-1]["outcome"] == "paused"
    assert paused["paused_by"] == "operator" and paused["paused_until"] > start + timedelta(hours=11)
    assert follow_ups_while_paused == 0
    messages = await fetch(clean.database_url, "SELECT direction, kind, body, turn_id FROM messages ORDER BY id")
    operator = [m for m in messages if m["kind"] == "operator"]
    assert [m["body"] for m in operator] == ["Oi Ana, aqui é o Rafael. Te ligo em 5 minutos."]  # in the history
    stored = [m for m in messages if m["body"] == "Rafael, pode me ligar depois das 18h?"]
    assert stored and stored[0]["turn_id"] is not None  # stored, and handled without a reply
    assert metric(scraped, "sdr_handover_total", kind="takeover") == 1
    assert metric(scraped, "sdr_handover_total", kind="suppressed") == 1
    conn = await asyncpg.connect(clean.database_url)
    try:
        report = await build_report(conn, Window(start, datetime.now(UTC) + timedelta(minutes=1)), SloSettings())
    finally:
        await conn.close()
    assert report.to_dict()["handover"]["takeover"] == 1 and report.handover["suppressed"] == 1


@pytest.mark.parametrize("when", ["before the reply is written", "after it is written, before it is sent"])
async def test_a_turn_in_flight_when_a_person_writes_sends_nothing(
    clean: Endpoints, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    takeover = Takeover(PHONE, None, "PERSON2", "Deixa comigo, Ana!", datetime.now(UTC))
    async with run_fake_evolution() as evo, run_daemon(with_evolution(clean, evo.url)) as d:
        rt = d.runtime
        if when.startswith("before"):
            respond = rt.runner.agent.respond

            async def person_writes_meanwhile(turn: Any) -> Any:
                reply = await respond(turn)
                assert await rt.takeover(takeover) == "takeover"
                return reply

            monkeypatch.setattr(rt.runner.agent, "respond", person_writes_meanwhile)
        else:
            finish = rt.runner.store.finish_turn

            async def person_writes_after_the_write(*args: Any, **kw: Any) -> Any:
                done = await finish(*args, **kw)
                assert await rt.takeover(takeover) == "takeover"
                return done

            monkeypatch.setattr(rt.runner.store, "finish_turn", person_writes_after_the_write)
        await post(d.url, event(PHONE, "Oi, quero saber de energia solar"))
        [turn] = await until_turns(clean, 1)
        await asyncio.sleep(0.5)
    outbox = await fetch(clean.database_url, "SELECT status FROM outbox")
    assert evo.sent == []
    if when.startswith("before"):  # refused at the write: a turn without a reply
        assert turn["outcome"] == "paused" and outbox == []
    else:  # written, then checked under the lock right before the send
        assert [r["status"] for r in outbox] == ["suppressed"]


async def test_parar_is_one_confirmation_and_no_follow_up_ever(clean: Endpoints) -> None:
    async with run_fake_evolution() as evo, run_daemon(with_evolution(clean, evo.url)) as d:
        await post(d.url, event(PHONE, "Oi, minha conta vem uns R$ 500"))
        await wait_for(lambda: asyncio.sleep(0, len(evo.sent) == 1 or None))
        assert await pending_follow_ups(clean) == 1
        await post(d.url, event(PHONE, "PARAR"))
        await wait_for(lambda: asyncio.sleep(0, len(evo.sent) == 2 or None))
        opted = await lead(clean)
        pending_after_opt_out = await pending_follow_ups(clean)
        # Writing again later: answered as usual, and still no follow-up planned.
        await post(d.url, event(PHONE, "oi, quanto custa a instalação?"))
        await wait_for(lambda: asyncio.sleep(0, len(evo.sent) == 3 or None))
        await asyncio.sleep(0.3)
    confirmations = [s for s in evo.sent if s["text"] == TEXTS.opt_out_reply]
    assert len(confirmations) == 1 and evo.sent[1]["text"] == TEXTS.opt_out_reply
    assert opted["opted_out_at"] is not None and pending_after_opt_out == 0
    assert evo.sent[2]["text"] != TEXTS.opt_out_reply
    assert await pending_follow_ups(clean) == 0
    events = await fetch(clean.database_url, "SELECT kind, actor FROM lead_events")
    assert [(e["kind"], e["actor"]) for e in events] == [("opt_out", "lead")]


async def test_a_sentence_that_mentions_stopping_is_not_an_opt_out(clean: Endpoints) -> None:
    async with run_fake_evolution() as evo, run_daemon(with_evolution(clean, evo.url)) as d:
        await post(d.url, event(PHONE, "não pare de me mandar ofertas"))
        await wait_for(lambda: asyncio.sleep(0, len(evo.sent) == 1 or None))
    assert evo.sent[0]["text"] != TEXTS.opt_out_reply
    assert (await lead(clean))["opted_out_at"] is None


OPT_OUTS = [
    "PARAR",
    "parar!!!",
    "Parar, por favor",
    "SAIR",
    "sair.",
    "Stop",
    "não quero mais receber",
    "Não quero mais receber mensagens",
    "nao quero mais",
    "remover meu número",
    "Remova meu numero por favor",
    "me tira da lista!",
    "Para de me mandar mensagens 😡",
    "descadastrar",
]
NOT_OPT_OUTS = [
    "não pare de me mandar ofertas",
    "quero parar de pagar caro na conta de luz",
    "posso sair mais cedo do trabalho pra instalação?",
    "não quero mais pagar R$ 800 de luz",
    "como faço pra remover o relógio antigo?",
    "para",  # "para" alone is a preposition more often than "stop" (para quando?)
    "pare de enrolar e me passa o preço",
    "stop motion",
]


@pytest.mark.parametrize("text", OPT_OUTS)
def test_opt_out_phrases_are_whole_message_intents(text: str) -> None:
    assert Intents.from_knobs(HandoverKnobs()).of([text]) == "opt_out"


@pytest.mark.parametrize("text", NOT_OPT_OUTS)
def test_a_phrase_inside_a_sentence_is_not_an_opt_out(text: str) -> None:
    assert Intents.from_knobs(HandoverKnobs()).of([text]) != "opt_out"


def test_asking_for_a_person_and_coming_back() -> None:
    intents = Intents.from_knobs(HandoverKnobs())
    assert intents.of(["Quero falar com um atendente"]) == "handoff"
    assert intents.of(["oi", "ATENDENTE!"]) == "handoff"  # one message of the burst, whole
    assert intents.of(["o atendente de ontem foi ótimo"]) is None
    assert intents.of(["Que palhaçada!!"]) == "handoff"  # angry, as a whole message
    assert intents.of(["minha conta de luz está um absurdo"]) is None  # the bill, not us
    assert intents.of(["voltar"]) == "opt_in"
    assert intents.of(["PARAR", "atendente"]) == "opt_out"  # the lead's right first


@pytest.mark.parametrize("how", ["sdr.toml", "sdrctl leads ignore"])
async def test_an_ignored_number_is_never_answered(clean: Endpoints, how: str) -> None:
    env = {"SDR_HANDOVER_IGNORE": PHONE} if how == "sdr.toml" else {}
    if how.startswith("sdrctl"):  # a number that never wrote: its lead row is created
        db = {"SDR_DATABASE_URL": clean.database_url, "SDR_REDIS_URL": clean.redis_url}
        code, out, err = await sdrctl("leads", "ignore", PHONE, env=db)
        assert code == 0, (out, err)
    async with run_fake_evolution() as evo, run_daemon(with_evolution(clean, evo.url, **env)) as d:
        await post(d.url, event(PHONE, "Oi, é o João do estoque"))
        [turn] = await until_turns(clean, 1)
        await asyncio.sleep(0.5)
    assert evo.sent == [] and turn["outcome"] == "ignored"
    assert await fetch(clean.database_url, "SELECT id FROM outbox") == []


async def test_a_lead_asking_for_a_person_is_handed_over_and_the_team_is_told(clean: Endpoints) -> None:
    notices: list[dict[str, Any]] = []
    answers = [503, 200]  # the team's webhook fails once: the notice is retried

    async def receive(request: Request) -> JSONResponse:
        notices.append(await request.json())
        return JSONResponse({}, status_code=answers.pop(0) if answers else 200)

    notify = Starlette(routes=[Route("/notify", receive, methods=["POST"])])
    async with background_server(quiet_server(notify)) as notify_url, run_fake_evolution() as evo:
        cfg = with_evolution(
            clean, evo.url, SDR_HANDOVER_NOTIFY_URL=f"{notify_url}/notify", SDR_HANDOVER_NOTIFY_BACKOFF="0.05"
        )
        async with run_daemon(cfg) as d:
            await post(d.url, event(PHONE, "Oi, sou a Carla"))
            await wait_for(lambda: asyncio.sleep(0, len(evo.sent) == 1 or None))
            await post(d.url, event(PHONE, "quero falar com um atendente"))
            await wait_for(lambda: asyncio.sleep(0, len(evo.sent) == 2 or None))
            await wait_for(lambda: asyncio.sleep(0, len(notices) == 2 or None))
            await post(d.url, event(PHONE, "oi?"))
            await until_turns(clean, 3)
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(base_url=d.url) as http:
                scraped = (await http.get("/metrics")).text
    assert evo.sent[1]["text"] == TEXTS.handoff_reply and len(evo.sent) == 2  # then silent
    handed = await lead(clean)
    assert handed["paused_by"] == "handoff" and handed["paused_until"] is not None
    assert notices[0] == notices[1] and notices[1]["event"] == "handoff"
    assert notices[1]["lead"]["phone_number"] == PHONE and notices[1]["messages"] == ["quero falar com um atendente"]
    assert metric(scraped, "sdr_handover_total", kind="handoff") == 1
    assert metric(scraped, "sdr_handover_notices_total", outcome="sent") == 1


async def test_leads_resume_brings_the_bot_back_to_a_running_daemon(clean: Endpoints) -> None:
    env = {"SDR_DATABASE_URL": clean.database_url, "SDR_REDIS_URL": clean.redis_url}
    async with run_fake_evolution() as evo, run_daemon(with_evolution(clean, evo.url)) as d:
        await post(d.url, event(PHONE, "Oi"))
        await wait_for(lambda: asyncio.sleep(0, len(evo.sent) == 1 or None))
        assert await post(d.url, from_me("Oi! Aqui é a Júlia, vou te atender.")) == {"status": "takeover"}
        await post(d.url, event(PHONE, "oi Júlia"))
        await until_turns(clean, 2)
        code, out, err = await sdrctl("leads", "resume", PHONE, env=env)
        assert code == 0 and "it was paused by operator" in out, (out, err)
        await post(d.url, event(PHONE, "voltou o robô?"))
        await wait_for(lambda: asyncio.sleep(0, len(evo.sent) == 2 or None))
    assert (await lead(clean))["paused_until"] is None
    events = await fetch(clean.database_url, "SELECT kind, actor FROM lead_events ORDER BY id")
    assert [(e["kind"], e["actor"]) for e in events] == [
        ("takeover", "operator"),
        ("suppressed", "bot"),
        ("resumed", "cli"),
    ]
