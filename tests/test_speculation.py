"""Whole bursts at human typing speed: the agent starts when a lead's window closes, but its
reply goes only once the lead has been quiet for the settle window and is not typing; a
reply a newer message overtook is thrown away (and counted), and the burst answered whole."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import redis.asyncio as aioredis

from daemon.agents import Agent, AgentReply, TurnInput
from daemon.buffer import DUE, MessageBuffer
from daemon.config import Config, load_config
from daemon.embedded import Endpoints
from daemon.evolution import presence_event
from daemon.models import Inbound
from tests.helpers import event, fetch, make_config, metric, run_daemon, wait_for

PHONE = "5511955554444"
OTHER = "5511955554445"


async def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as http:
        resp = await http.post("/webhook/evolution", json=body)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())


async def replies(endpoints: Endpoints) -> list[Any]:
    return await fetch(endpoints.database_url, "SELECT body FROM outbox ORDER BY id")


async def turns(endpoints: Endpoints) -> list[Any]:
    return await fetch(
        endpoints.database_url,
        """SELECT t.id, array_agg(m.body ORDER BY m.id) AS bodies FROM turns t
             JOIN messages m ON m.turn_id = t.id GROUP BY t.id ORDER BY t.id""",
    )


async def discarded(endpoints: Endpoints) -> list[Any]:
    return await fetch(endpoints.database_url, "SELECT * FROM discarded_replies ORDER BY id")


async def test_four_messages_three_seconds_apart_are_one_turn_and_one_reply(clean: Endpoints) -> None:
    """The recommended profile as shipped: a lead who needs 3 s to type each next message
    gets one reply that read all four; every reply started in a pause is thrown away."""
    base = {"SDR_DATABASE_URL": clean.database_url, "SDR_REDIS_URL": clean.redis_url}
    cfg = load_config(None, "recommended", base)
    assert cfg.profile.buffer.speculate and cfg.profile.buffer.settle_window > 3.0
    texts = ["Oi", "meu nome é Carla", "minha conta vem uns 600 reais", "vocês atendem em Campinas?"]
    async with run_daemon(cfg) as d:
        for i, text in enumerate(texts):
            if i:
                await asyncio.sleep(3.0)
            await post(d.url, event(PHONE, text))
        [turn] = await wait_for(lambda: turns(clean), timeout=30)
        await asyncio.sleep(cfg.profile.buffer.settle_window)  # nothing else may follow
        sent = await replies(clean)
        thrown = await discarded(clean)
        async with httpx.AsyncClient(base_url=d.url) as http:
            counted = metric((await http.get("/metrics")).text, "sdr_replies_discarded_total", reason="newer_message")
    assert turn["bodies"] == texts
    assert len(sent) == 1 and "Carla" in sent[0]["body"]
    # The window (1 s) closed in each 3 s pause, so the agent ran and its reply was thrown
    # away each time: three calls paid for and unread, recorded and counted.
    assert len(thrown) == 3 and counted == 3
    assert [len(t["message_ids"]) for t in thrown] == [1, 2, 3]
    assert {t["reason"] for t in thrown} == {"newer_message"}


class GatedAgent:
    """The daemon's own agent, held at `respond` until the test lets it go."""

    def __init__(self, inner: Agent) -> None:
        self.inner = inner
        self.started = asyncio.Event()
        self.go = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def respond(self, turn: TurnInput) -> AgentReply:
        self.started.set()
        await self.go.wait()
        return await self.inner.respond(turn)


async def test_a_reply_is_never_written_after_a_newer_message_was_stored(clean: Endpoints) -> None:
    """The last look is in the statement that writes the reply: a message stored after the
    hold looked at Redis (here: stored without arming the buffer at all) still stops it."""
    cfg = make_config(clean, SDR_BUFFER_SWEEP_INTERVAL="1")
    async with run_daemon(cfg) as d:
        agent = GatedAgent(d.runtime.runner.agent)
        d.runtime.runner.agent = agent  # type: ignore[assignment]
        await post(d.url, event(PHONE, "Oi"))
        await asyncio.wait_for(agent.started.wait(), 10)
        newer = Inbound(PHONE, None, "TESTNEWER1", "text", "quanto custa?", None, datetime.now(UTC))
        await d.runtime.store.ingest_many([newer])
        agent.go.set()
        [turn] = await wait_for(lambda: turns(clean), timeout=20)  # the sweep re-queues the lead
        sent = await replies(clean)
        thrown = await discarded(clean)
    assert turn["bodies"] == ["Oi", "quanto custa?"]  # one reply read both
    assert len(sent) == 1 and len(thrown) == 1


async def test_a_typing_lead_holds_its_reply_and_a_pause_lets_it_go(clean: Endpoints) -> None:
    """With presence: "composing" after a message holds the burst (and any reply already
    written) past the settle window; the next message joins it."""
    cfg = make_config(clean, SDR_BUFFER_TYPING_TTL="5", SDR_TIMEOUTS_REPLY_HOLD="5")
    b = cfg.profile.buffer
    async with run_daemon(cfg) as d:
        await post(d.url, presence_event(PHONE, "composing", instance="sdr"))
        await post(d.url, event(PHONE, "Oi, boa tarde"))
        await post(d.url, presence_event(PHONE, "composing", instance="sdr"))
        await asyncio.sleep(b.presence_settle + b.quiet_window + 0.3)  # long past both windows
        held = await replies(clean)
        await post(d.url, event(PHONE, "queria um orçamento"))
        await post(d.url, presence_event(PHONE, "paused", instance="sdr"))
        [turn] = await wait_for(lambda: turns(clean), timeout=20)
    assert held == []  # the lead was typing: nothing was sent in the middle
    assert turn["bodies"] == ["Oi, boa tarde", "queria um orçamento"]


async def test_claims_wait_for_a_typing_lead_but_not_forever(endpoints: Endpoints) -> None:
    r = aioredis.Redis.from_url(endpoints.redis_url)
    await r.flushdb()
    try:
        buffer = MessageBuffer(r, 0.01, cap=0.05, claim_batch=10, typing_ttl=30, typing_hold=0.3)
        await buffer.add_many([(PHONE, 0.01)])
        await buffer.presence(PHONE, "composing")
        await asyncio.sleep(0.1)
        assert await buffer.claim_due() == []  # due, but typing: re-armed, not claimed
        assert (await buffer.state(PHONE)).typing and (await buffer.state(PHONE)).pending
        await asyncio.sleep(0.35)  # past the first message + cap + typing_hold
        while not (claimed := await buffer.claim_due()):
            await asyncio.sleep(0.02)
        assert claimed == [PHONE]
        # "paused" ends the wait at once.
        await buffer.add_many([(PHONE, 0.01)])
        await buffer.presence(PHONE, "composing")
        await asyncio.sleep(0.05)
        assert await buffer.claim_due() == []
        assert await buffer.presence(PHONE, "paused") is not None  # a burst is pending
        assert not (await buffer.state(PHONE)).typing
        assert await buffer.claim_due() == [PHONE]
        # A message ends "composing"; a lead seen typing is "present" from then on.
        await buffer.presence(PHONE, "composing")
        await buffer.add_many([(PHONE, 0.01)])
        state = await buffer.state(PHONE)
        assert not state.typing and state.present and state.pending
    finally:
        await r.flushdb()
        await r.aclose()


async def test_a_lead_known_to_send_presence_gets_the_presence_window(endpoints: Endpoints) -> None:
    """Its "composing", not a guess, says whether more is coming: the turn waits only for
    the pause before typing starts (presence_window), even after a question."""
    r = aioredis.Redis.from_url(endpoints.redis_url)
    await r.flushdb()
    try:
        buffer = MessageBuffer(r, 1.0, cap=60, claim_batch=10, presence_window=20)
        other = "5511900001111"
        await buffer.presence(PHONE, "paused")
        await buffer.add_many([(PHONE, 0.5), (other, 0.5)])
        now = (await r.time())[0]
        due = dict(await r.zrange(DUE, 0, -1, withscores=True))
        assert due[PHONE.encode()] - now > 15  # the presence window
        assert due[other.encode()] - now < 2  # its own window
    finally:
        await r.flushdb()
        await r.aclose()


async def test_a_copy_of_the_bursts_own_message_does_not_throw_the_reply_away(clean: Endpoints) -> None:
    """Evolution delivers some webhooks twice: the copy re-arms the lead, but it is not a
    newer message, so the held reply still goes (no agent call wasted)."""
    cfg = make_config(clean, SDR_BUFFER_SETTLE_WINDOW="1.5")
    first = event(PHONE, "Oi, quanto custa?")
    async with run_daemon(cfg) as d:
        await post(d.url, first)
        await asyncio.sleep(cfg.profile.buffer.quiet_window + 0.5)  # the reply is written and held
        assert await d.runtime.redis.zscore(DUE, PHONE) is None
        await post(d.url, first)  # the same message id, again
        await wait_for(lambda: replies(clean), timeout=20)
        await asyncio.sleep(cfg.profile.buffer.quiet_window + 0.3)
        sent = await replies(clean)
        thrown = await discarded(clean)
    assert len(sent) == 1 and thrown == []


async def test_the_claim_loop_sleeps_until_the_soonest_window_closes(endpoints: Endpoints) -> None:
    """No claim every poll_interval while nothing is due: a claim reports when the soonest
    window closes (`next_due`), and a burst armed here sooner wakes the sleeping loop."""
    r = aioredis.Redis.from_url(endpoints.redis_url)
    await r.flushdb()
    try:
        buffer = MessageBuffer(r, 1.0, cap=60, claim_batch=10)
        assert await buffer.claim_due() == [] and buffer.next_due is None  # nothing pending
        await buffer.add_many([(PHONE, 20.0)])
        assert await buffer.claim_due() == [] and buffer.next_due is not None and 19 < buffer.next_due <= 20
        # Asleep until then (at most 60 s): a burst armed here due in 0.05 s wakes it, and
        # the next claim takes that one.
        sleeping = asyncio.create_task(buffer.sleep_until_due(0.01, 60))
        await asyncio.sleep(0.05)
        assert not sleeping.done()
        await buffer.add(OTHER, 0.05)
        await asyncio.wait_for(sleeping, 10)
        assert await buffer.claim_due() == [OTHER]
        # Shutdown ends the sleep at once.
        sleeping = asyncio.create_task(buffer.sleep_until_due(0.01, 60))
        await asyncio.sleep(0.05)
        buffer.wake()
        await asyncio.wait_for(sleeping, 10)
    finally:
        await r.aclose()


async def test_an_idle_daemon_does_not_poll_redis(config: Config) -> None:
    """Idle, the claim loop runs about once per [buffer] claim_idle, not per poll_interval."""
    async with run_daemon(config) as d:
        buffer = d.runtime.buffer
        claims = 0
        claim = buffer._claim

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal claims
            claims += 1
            return await claim(*args, **kwargs)

        buffer._claim = counted  # type: ignore[method-assign]
        b = d.runtime.config.profile.buffer
        await asyncio.sleep(20 * b.poll_interval + b.claim_idle)
    assert 1 <= claims <= 3, claims
