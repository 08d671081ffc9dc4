"""Fencing (issue #16): a turn's writes are accepted only with the lead's newest token and
only for messages no turn answered, and a turn whose lock lapsed (a process frozen past
the TTL) stops before it writes or sends. On the real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from daemon.buffer import MessageBuffer
from daemon.embedded import Endpoints
from daemon.locks import LeadLocks
from daemon.models import FinishedTurn, Inbound, TurnRecord
from daemon.outbox import OutboxStore, Status
from daemon.store import Store, connect
from tests.helpers import event, fetch, make_config, metric, run_daemon, run_fake_evolution, wait_for

PHONE = "5511955554444"


def record(burst: list[Any], reply: str, **updates: Any) -> TurnRecord:
    now = datetime.now(UTC)
    return TurnRecord.of(burst, PHONE, now, now, Status.PENDING, reply=reply, parts=[reply], lead_updates=updates)


async def test_only_the_newest_token_writes_and_only_unanswered_messages(clean: Endpoints) -> None:
    profile = make_config(clean).profile
    pool = await connect(clean.database_url, profile)
    store = Store(pool, profile)
    try:
        await store.ingest_many([Inbound(PHONE, None, "F1", "text", "oi", None, datetime.now(UTC))])
        old, _ = await store.begin_turn(PHONE, 100, None) or ([], None)  # a turn frozen later, past its lock
        new, _ = await store.begin_turn(PHONE, 200, None) or ([], None)  # the lock's next holder
        assert old and new and [m.id for m in old] == [m.id for m in new]
        stale = await store.finish_turn(record(old, "resposta velha", name="Velho"), 100)
        after_stale = await fetch(clean.database_url, "SELECT count(*) AS n FROM outbox")
        cannot_begin = await store.begin_turn(PHONE, 150, None)
        fresh = await store.finish_turn(record(new, "resposta nova"), 200)
        # A newer token still cannot answer what a turn answered (read before it was written).
        newest = await store.begin_turn(PHONE, 300, None)
        twice = await store.finish_turn(record(new, "outra vez"), 300)
        lead = (await fetch(clean.database_url, "SELECT name, fence FROM leads"))[0]
        turns = await fetch(clean.database_url, "SELECT fence, messages_joined, written_at FROM turns")
        outbox = await fetch(clean.database_url, "SELECT body FROM outbox")
    finally:
        await pool.close()
    assert stale == "fenced" and after_stale[0]["n"] == 0  # nothing written, not even in part
    assert cannot_begin is None  # an older token cannot even start
    assert isinstance(fresh, FinishedTurn)
    assert newest == ([], None) and twice == "fenced"
    assert lead["name"] is None and lead["fence"] == 300  # the stale turn's lead update was refused
    assert [(t["fence"], t["messages_joined"]) for t in turns] == [(200, 1)] and turns[0]["written_at"] is not None
    assert [o["body"] for o in outbox] == ["resposta nova"]


async def test_a_follow_up_row_is_refused_to_an_older_token(clean: Endpoints) -> None:
    profile = make_config(clean).profile
    pool = await connect(clean.database_url, profile)
    store, rows = Store(pool, profile), OutboxStore(pool, profile.timeouts.database)
    try:
        await store.ingest_many([Inbound(PHONE, None, "F1", "text", "oi", None, datetime.now(UTC))])
        [lead] = await fetch(clean.database_url, "SELECT id FROM leads")
        assert await rows.take_fence(PHONE, 500)
        behind = await rows.take_fence(PHONE, 400)  # a follow-up whose lock lapsed before it began
        refused = await rows.open_follow_up(1, lead["id"], PHONE, "Oi de novo!", datetime.now(UTC), 400, local=True)
        outbox = await fetch(clean.database_url, "SELECT count(*) AS n FROM outbox")
    finally:
        await pool.close()
    assert not behind and refused is None and outbox[0]["n"] == 0


async def test_tokens_keep_increasing_when_redis_loses_its_data(clean: Endpoints) -> None:
    """A plain INCR would start again at 1 after Redis lost its data, below the tokens
    PostgreSQL holds, and refuse every later turn of the lead."""
    r = aioredis.Redis.from_url(clean.redis_url)
    locks = LeadLocks(r, ttl=5, attempts=1, backoff=0.01, buffer=MessageBuffer(r, 0.05, 1, 10))
    fences = []
    try:
        for i in range(20):
            lease = await locks.try_acquire(PHONE)
            assert lease is not None
            fences.append(lease.fence)
            await locks.release(PHONE, lease.token)
            if i == 10:
                await r.flushall()
    finally:
        await r.aclose()
    assert fences == sorted(set(fences))  # strictly increasing, across the loss too


def freeze(seconds: float) -> None:
    """The whole process stops (as under SIGSTOP or a long GC pause): no renewal runs."""
    time.sleep(seconds)


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "fence-off"])
async def test_a_turn_frozen_past_its_lock_stops_before_writing(
    clean: Endpoints, monkeypatch: pytest.MonkeyPatch, guarded: bool
) -> None:
    if not guarded:  # the mutant: what the lapse check prevents
        monkeypatch.setenv("SDRCTL_TEST_UNGUARDED", "fence")
    cfg = make_config(clean, SDR_TIMEOUTS_REDIS_LOCK_TTL="0.3")
    async with run_daemon(cfg) as d:
        agent = d.runtime.runner.agent
        respond, frozen = agent.respond, []

        async def frozen_once(turn: Any) -> Any:
            reply = await respond(turn)
            if not frozen:
                frozen.append(True)
                freeze(0.6)
            return reply

        monkeypatch.setattr(agent, "respond", frozen_once)
        async with httpx.AsyncClient(base_url=d.url) as http:
            assert (await http.post("/webhook/evolution", json=event(PHONE, "Oi"))).status_code == 200
            await wait_for(lambda: fetch(clean.database_url, "SELECT 1 FROM outbox"))
            await asyncio.sleep(0.5)  # no second reply may follow
            stopped = metric((await http.get("/metrics")).text, "sdr_turns_fenced_total", reason="lapsed")
    discarded = await fetch(clean.database_url, "SELECT reason FROM discarded_replies")
    outbox = await fetch(clean.database_url, "SELECT body FROM outbox")
    assert len(outbox) == 1  # answered once either way: one daemon, nobody else answered
    if guarded:  # stopped, recorded, and answered by a fresh turn
        assert [r["reason"] for r in discarded] == ["lapsed"] and stopped == 1
    else:
        assert discarded == [] and stopped == 0


async def test_a_reply_whose_lock_lapsed_before_its_send_is_left_to_re_delivery(
    clean: Endpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with run_fake_evolution() as evo:
        cfg = make_config(
            clean,
            SDR_EVOLUTION_BASE_URL=evo.url,
            SDR_TIMEOUTS_REDIS_LOCK_TTL="0.3",
            SDR_LIMITS_REDELIVER_INTERVAL="0.2",
        )
        async with run_daemon(cfg) as d:
            store = d.runtime.runner.store
            finish = store.finish_turn

            async def frozen_after_writing(*args: Any, **kw: Any) -> Any:
                done = await finish(*args, **kw)
                freeze(0.6)  # written; frozen before the send
                return done

            monkeypatch.setattr(store, "finish_turn", frozen_after_writing)
            async with httpx.AsyncClient(base_url=d.url) as http:
                assert (await http.post("/webhook/evolution", json=event(PHONE, "Oi"))).status_code == 200
                await wait_for(lambda: asyncio.sleep(0, evo.sent))
                await asyncio.sleep(0.5)  # no second send may follow
                text = (await http.get("/metrics")).text
    [row] = await fetch(clean.database_url, "SELECT status, last_error, attempts FROM outbox")
    assert len(evo.sent) == 1 and row["status"] == "sent"
    assert row["attempts"] == 2  # put on record with the turn, then re-delivery's (the one that went)
    assert metric(text, "sdr_turns_fenced_total", reason="lapsed") == 1
