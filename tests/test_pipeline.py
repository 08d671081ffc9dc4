"""Intake -> buffer -> turn -> reply, on the real Postgres and Redis."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from daemon.embedded import Endpoints
from daemon.errors import StageFailed
from daemon.metrics import Metrics
from daemon.models import Inbound
from daemon.store import Store, connect
from daemon.turn import StageClock
from tests.helpers import event, fetch, make_config, metric, run_daemon, run_fake_evolution, wait_for

PHONE = "5511912345678"


async def outbox(endpoints: Endpoints) -> list:
    return await fetch(endpoints.database_url, "SELECT * FROM outbox ORDER BY id")


async def send_burst(url: str, texts: list[str], *, order: list[int] | None = None, phone: str = PHONE) -> None:
    base = datetime.now(UTC).timestamp()
    events = [event(phone, t, timestamp=base + i) for i, t in enumerate(texts)]
    async with httpx.AsyncClient(base_url=url) as http:
        for i in order or range(len(events)):
            resp = await http.post("/webhook/evolution", json=events[i])
            assert resp.status_code == 200


async def test_a_burst_of_three_gets_exactly_one_reply(clean: Endpoints) -> None:
    async with run_daemon(make_config(clean)) as d:
        await send_burst(d.url, ["Oi", "meu nome é Carla", "minha conta vem uns R$ 600"], order=[2, 0, 1])
        rows = await wait_for(lambda: outbox(clean))
        await asyncio.sleep(0.5)  # longer than the quiet window: no second reply may follow
        rows = await outbox(clean)
    assert len(rows) == 1
    assert rows[0]["status"] == "local"
    assert "Carla" in rows[0]["body"] and "R$ 600,00" in rows[0]["body"]
    turns = await fetch(clean.database_url, "SELECT * FROM turns")
    assert len(turns) == 1 and turns[0]["messages_joined"] == 3 and turns[0]["outcome"] == "ok"
    assert set(turns[0]["stages"]) == {"context", "agent", "hold"}
    assert "knowledge" not in turns[0]["stages"]  # no question: no search run in vain
    assert 0 < turns[0]["window_ms"] <= 600
    assert turns[0]["response_ms"] is not None
    lead = (await fetch(clean.database_url, "SELECT * FROM leads"))[0]
    assert (lead["name"], lead["bill_value"], lead["stage"]) == ("Carla", 600, "ask_property")


async def test_a_burst_is_ordered_by_the_leads_timestamps(clean: Endpoints) -> None:
    pool = await connect(clean.database_url, make_config(clean).profile)
    store = Store(pool, make_config(clean).profile)
    t0 = datetime.now(UTC)
    try:
        await store.ingest_many(
            [
                Inbound(PHONE, None, pid, "text", text, None, t0 + timedelta(seconds=offset))
                for pid, text, offset in (("C", "terceira", 2), ("A", "primeira", 0), ("B", "segunda", 1))
            ]
        )
        pending = await store.pending_messages(PHONE)
    finally:
        await pool.close()
    assert [m.body for m in pending] == ["primeira", "segunda", "terceira"]


async def test_replies_go_to_the_evolution_api_when_configured(clean: Endpoints) -> None:
    async with run_fake_evolution() as evo:
        cfg = make_config(
            clean,
            SDR_EVOLUTION_BASE_URL=evo.url,
            SDR_EVOLUTION_INSTANCE="vendas",
            EVOLUTION_API_KEY="evo-key",
        )
        async with run_daemon(cfg) as d:
            await send_burst(d.url, ["Olá!"])
            await wait_for(lambda: asyncio.sleep(0, evo.sent))
    assert len(evo.sent) == 1
    sent = evo.sent[0]
    assert (sent["instance"], sent["apikey"], sent["number"]) == ("vendas", "evo-key", PHONE)
    assert "como posso te chamar" in sent["text"]
    assert evo.presences == []  # a quick reply shows no "typing..." (typing_after)
    [row] = await outbox(clean)
    assert row["status"] == "sent" and row["attempts"] == 1 and row["provider_id"] == sent["id"]
    assert sent["id"].startswith("3EB0") and len(sent["id"]) == 22  # Baileys' ids, as the real API answers
    [turn] = await fetch(clean.database_url, "SELECT response_ms FROM turns")
    assert turn["response_ms"] > 0


EXISTS_FALSE = {
    "status": 400,
    "error": "Bad Request",
    "response": {"message": [{"jid": "5511999990000@s.whatsapp.net", "exists": False, "number": "5511999990000"}]},
}
INTERNAL = {
    "status": 500,
    "error": "Internal Server Error",
    "response": {"message": "Cannot read properties of undefined"},
}
INVALID = {"status": 400, "error": "Bad Request", "response": {"message": [['instance requires property "text"']]}}


# The bodies are Evolution 2.3.6's own (tests/fixtures/evolution/SOURCES.md, Q6).
@pytest.mark.parametrize(
    ("answers", "status", "attempts", "delivered"),
    [
        ([503, 400], "sent", 3, 1),  # 503, then 400 "Connection Closed": not delivered, retried at once
        ([(500, INTERNAL)], "sent", 2, 1),  # uncertain: looked up, then re-sent by the outbox job
        ([504], "sent", 2, 1),  # uncertain (a gateway timeout) likewise
        ([(400, EXISTS_FALSE)], "failed", 1, 0),  # not on WhatsApp: final, never re-sent
        ([(400, INVALID)], "failed", 1, 0),  # refused: final
    ],
)
async def test_sends_are_retried_only_when_they_certainly_did_not_arrive(
    clean: Endpoints, answers: list[Any], status: str, attempts: int, delivered: int
) -> None:
    async with run_fake_evolution() as evo:
        evo.answers.extend(answers)
        cfg = make_config(
            clean, SDR_EVOLUTION_BASE_URL=evo.url, SDR_LIMITS_REDELIVER_INTERVAL="0.2", SDR_LIMITS_REDELIVER_BACKOFF="0"
        )
        async with run_daemon(cfg) as d:
            await send_burst(d.url, ["Olá!"])

            async def settled() -> list:
                rows = await outbox(clean)
                return [r for r in rows if r["status"] in ("sent", "failed")]

            [row] = await wait_for(settled)
    assert row["status"] == status
    assert row["attempts"] == attempts
    assert len(evo.sent) == delivered
    assert evo.answers == []  # every queued failure was consumed: the retries happened


async def test_unreachable_evolution_api_is_re_sent_then_recorded_as_failed(clean: Endpoints) -> None:
    cfg = make_config(
        clean,
        SDR_EVOLUTION_BASE_URL="http://127.0.0.1:9",  # nothing listens there
        SDR_LIMITS_REDELIVER_INTERVAL="0.1",
        SDR_LIMITS_REDELIVER_ATTEMPTS="5",
        SDR_LIMITS_REDELIVER_BACKOFF="0",
    )
    async with run_daemon(cfg) as d:
        await send_burst(d.url, ["Olá!"])
        [row] = await wait_for(lambda: fetch(clean.database_url, "SELECT * FROM outbox WHERE status = 'failed'"))
    assert "connect" in row["last_error"] and "(gave up)" in row["last_error"] and row["attempts"] == 5


async def test_the_outbox_backlog_is_exported_while_replies_wait_for_re_delivery(clean: Endpoints) -> None:
    """sdr_outbox_backlog and its oldest age (SdrOutboxBacklogGrowing reads them): a reply
    Evolution refused with 503s waits for re-delivery, counted; delivered, it is 0 again."""
    async with run_fake_evolution() as evo:
        evo.answers.extend([503] * 100)  # every try fails until the queue is cleared
        cfg = make_config(
            clean, SDR_EVOLUTION_BASE_URL=evo.url, SDR_LIMITS_REDELIVER_INTERVAL="0.1", SDR_LIMITS_REDELIVER_BACKOFF="0"
        )
        async with run_daemon(cfg) as d, httpx.AsyncClient(base_url=d.url) as http:

            async def backlog() -> tuple[float, float]:
                text = (await http.get("/metrics")).text
                return metric(text, "sdr_outbox_backlog"), metric(text, "sdr_outbox_backlog_oldest_seconds")

            async def waiting() -> float:
                count, oldest = await backlog()
                return oldest if count == 1 else 0.0

            async def emptied() -> bool:
                return await backlog() == (0, 0) and bool(await outbox(clean))

            assert await backlog() == (0, 0)
            await send_burst(d.url, ["Olá!"])
            assert await wait_for(waiting) > 0  # counted, and how long it has waited
            evo.answers.clear()
            await wait_for(emptied)
            [row] = await outbox(clean)
    assert row["status"] == "sent" and len(evo.sent) == 1


async def test_a_question_is_answered_from_the_knowledge_base(clean: Endpoints) -> None:
    async with run_daemon(make_config(clean)) as d:
        await send_burst(d.url, ["Vocês têm financiamento?"])
        [row] = await wait_for(lambda: outbox(clean))
    assert "financ" in row["body"].lower()
    assert "como posso te chamar" in row["body"]  # and the flow goes on


async def test_messages_accepted_before_a_restart_are_answered_after_it(clean: Endpoints) -> None:
    cfg = make_config(clean, SDR_BUFFER_QUIET_WINDOW="0.5")
    async with run_daemon(cfg) as d:
        await send_burst(d.url, ["Oi, quero saber de energia solar"])
    assert await outbox(clean) == []  # stopped before the window closed
    async with run_daemon(cfg):
        rows = await wait_for(lambda: outbox(clean))
        await asyncio.sleep(0.6)
        rows = await outbox(clean)
    assert len(rows) == 1


async def test_the_qualification_flow_end_to_end(clean: Endpoints) -> None:
    async with run_daemon(make_config(clean)) as d:
        for texts, expect in [
            (["Boa tarde"], "como posso te chamar"),
            (["Roberto"], "Prazer, Roberto"),
            (["acho que uns 1.200 por mês"], "Anotado: conta de R$ 1.200,00"),
            (["é casa"], "mais alguém envolvido"),
            (["eu e minha esposa"], "chame também quem decide com você"),
            (["pode ser quinta às 10h"], "Combinado, Roberto"),
        ]:
            before = len(await outbox(clean))
            await send_burst(d.url, texts)
            rows = await wait_for(lambda before=before: _more(clean, before))
            assert expect in rows[-1]["body"], rows[-1]["body"]
    lead = (await fetch(clean.database_url, "SELECT * FROM leads"))[0]
    assert (lead["name"], lead["bill_value"], lead["property_type"], lead["decision_maker"]) == (
        "Roberto",
        1200,
        "casa",
        "compartilhada",
    )
    assert (lead["solution"], lead["stage"]) == ("residencial", "booked")


async def _more(endpoints: Endpoints, before: int) -> list:
    rows = await outbox(endpoints)
    return rows if len(rows) > before else []


async def test_a_stage_over_its_timeout_is_recorded_and_counted() -> None:
    metrics = Metrics()
    clock = StageClock(metrics)
    with pytest.raises(StageFailed):
        await clock.run("agent", asyncio.sleep(1), 0.01)
    assert clock.timeouts == ["agent"]
    assert metrics.timeouts.labels("agent")._value.get() == 1
