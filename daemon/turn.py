"""One turn: a lead's burst in, one reply out.

Under the lead's lock: read the unanswered burst, load the lead with its history while the
knowledge-base search runs alongside, let the agent write the reply (it awaits the search
only if it needs it), then store everything in one transaction and deliver. Every stage has
its timeout from the profile; a stage that times out or fails is recorded, and the lead
still gets an answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, TypeVar

from daemon.agents import Agent, AgentReply, TurnInput
from daemon.config import Profile
from daemon.evolution import EvolutionClient
from daemon.locks import LeadLocks
from daemon.metrics import Metrics
from daemon.store import KbEntry, Store, TurnRecord
from daemon.tasks import cancel_and_wait

log = logging.getLogger("sdr.turn")
T = TypeVar("T")

FALLBACK = (
    "Oi! Recebi sua mensagem 😊 Estou verificando algumas informações e já te respondo "
    "por aqui."
)


class StageFailed(Exception):
    """A stage timed out or raised; already recorded."""


class StageClock:
    """Times each stage, and records which timed out or failed."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.times: dict[str, float] = {}
        self.timeouts: list[str] = []
        self.failures: list[str] = []

    async def run(self, stage: str, work: Awaitable[T], timeout: float | None) -> T:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout or None):
                return await work
        except TimeoutError:
            self.timeouts.append(stage)
            self.metrics.timeouts.labels(stage).inc()
            log.warning("stage %s timed out after %.2fs", stage, timeout)
            raise StageFailed(stage) from None
        except Exception as exc:
            self.failures.append(stage)
            self.metrics.failures.labels(stage).inc()
            log.warning("stage %s failed: %s: %s", stage, exc.__class__.__name__, exc)
            raise StageFailed(stage) from exc
        finally:
            elapsed = time.perf_counter() - start
            self.times[stage] = round(elapsed * 1000, 3)
            self.metrics.stage_time.labels(stage).observe(elapsed)


class TurnRunner:
    def __init__(
        self,
        *,
        store: Store,
        locks: LeadLocks,
        agent: Agent,
        sender: EvolutionClient | None,
        metrics: Metrics,
        profile: Profile,
    ) -> None:
        self.store = store
        self.locks = locks
        self.agent = agent
        self.sender = sender
        self.metrics = metrics
        self.profile = profile
        self.agent_slots = asyncio.Semaphore(profile.pools.agent_pool_size)

    async def run(self, phone: str) -> bool:
        """Answers the lead's unanswered messages; False when its lock stayed busy (the
        caller re-queues the lead)."""
        async with self.locks.held(phone) as got:
            if not got:
                return False
            self.metrics.turns_in_flight.inc()
            try:
                await self._turn(phone)
            finally:
                self.metrics.turns_in_flight.dec()
            return True

    async def _turn(self, phone: str) -> None:
        t = self.profile.timeouts
        started = datetime.now(UTC)
        clock = StageClock(self.metrics)
        burst = await self.store.pending_messages(phone)
        if not burst:  # another daemon answered it already
            return
        first, last = burst[0], burst[-1]
        texts = [m.body for m in burst if m.body.strip()]

        kb_task = asyncio.create_task(
            clock.run(
                "knowledge",
                self.store.search_knowledge(" ".join(texts), self.profile.limits.kb_results),
                t.knowledge_base,
            ),
            name=f"kb:{phone}",
        )

        async def knowledge() -> list[KbEntry]:
            try:
                return await kb_task
            except StageFailed:
                return []

        outcome = "ok"
        updates: dict[str, Any] = {}
        try:
            lead, history = await clock.run(
                "context",
                self.store.lead_with_history(
                    first.lead_id, first.conversation_id, self.profile.limits.history_limit
                ),
                t.personalization,
            )
            async with self.agent_slots:
                reply: AgentReply = await clock.run(
                    "agent",
                    self.agent.respond(TurnInput(lead, texts, history, knowledge)),
                    t.agent,
                )
            text, updates = reply.text, reply.lead_updates
            if not text.strip():
                raise StageFailed("agent")
        except StageFailed:
            text, outcome = FALLBACK, "fallback"
        finally:
            await cancel_and_wait(kb_task)  # unused if the agent did not need it

        local = self.sender is None
        finished = datetime.now(UTC)
        record = TurnRecord(
            lead_id=first.lead_id,
            conversation_id=first.conversation_id,
            message_ids=[m.id for m in burst],
            first_message_at=first.received_at,
            last_message_at=last.received_at,
            started_at=started,
            finished_at=finished,
            buffer_wait_ms=(started - last.received_at).total_seconds() * 1000,
            stages=clock.times,
            timeouts=clock.timeouts,
            failures=clock.failures,
            agent_backend=self.agent.name,
            outcome=outcome,
            reply=text,
            phone=phone,
            outbox_status="local" if local else "pending",
            response_ms=(finished - last.received_at).total_seconds() * 1000 if local else None,
            lead_updates=updates,
        )
        turn_id, outbox_id = await clock.run(
            "store", self.store.finish_turn(record), t.database
        )
        self.metrics.turns.labels(outcome).inc()
        if local:
            self.metrics.sends.labels("local").inc()
            self.metrics.response_time.observe(record.response_ms / 1000)  # type: ignore[operator]
            return
        await self._deliver(phone, text, turn_id, outbox_id, last.received_at, clock)

    async def _deliver(
        self, phone: str, text: str, turn_id: int, outbox_id: int, last_at: datetime,
        clock: StageClock,
    ) -> None:  # fmt: skip
        assert self.sender is not None

        async def record_attempt() -> None:
            await self.store.record_send_attempt(outbox_id)

        try:
            provider_id = await clock.run(
                # the client has its own timeouts, per attempt
                "send", self.sender.send_text(phone, text, record_attempt), None
            )
        except StageFailed as exc:
            cause = exc.__cause__ or exc
            await self.store.record_delivery(
                outbox_id, turn_id, status="failed", error=str(cause)[:500]
            )
            self.metrics.sends.labels("failed").inc()
            return
        response = datetime.now(UTC) - last_at
        await self.store.record_delivery(
            outbox_id, turn_id, status="sent", provider_id=provider_id,
            response_ms=response.total_seconds() * 1000,
        )  # fmt: skip
        self.metrics.sends.labels("sent").inc()
        self.metrics.response_time.observe(response.total_seconds())

