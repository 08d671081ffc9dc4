"""One turn: a lead's burst in, one reply out.

Under the lead's lock: read the unanswered burst, load the lead (cached) with its history
while the knowledge-base search (cached) runs alongside, let the agent write the reply (it
awaits the search only if it needs it), then store everything in one statement and deliver.
Every stage has its timeout from the profile; a stage that times out or fails is recorded,
and the lead still gets an answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from daemon.agents import Agent, AgentReply, TurnInput
from daemon.buffer import MessageBuffer, window_for
from daemon.cache import TwoTierCache
from daemon.config import Profile
from daemon.evolution import PRESENCE_MAX_MS, EvolutionClient, SendFailed, split_message
from daemon.followups.calendar import Clock, utc_now
from daemon.locks import LeadLocks
from daemon.media.processor import MediaProcessor
from daemon.media.result import MediaResult
from daemon.metrics import Metrics
from daemon.models import KbEntry, PendingMessage, TurnRecord
from daemon.store import Store, tsquery_any
from daemon.tasks import cancel_and_wait

log = logging.getLogger("sdr.turn")
T = TypeVar("T")

FALLBACK = "Oi! Recebi sua mensagem 😊 Estou verificando algumas informações e já te respondo por aqui."


class StageFailed(Exception):
    """A stage timed out or raised; already recorded."""


@dataclass
class StageClock:
    """Times each stage of one turn; records which timed out or failed, and cache use."""

    metrics: Metrics
    times: dict[str, float] = field(default_factory=dict)
    timeouts: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0

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

    def cache_use(self, hit: bool) -> None:
        if hit:
            self.cache_hits += 1
        else:
            self.cache_misses += 1


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
        leads: TwoTierCache[dict[str, Any]],
        knowledge: TwoTierCache[list[KbEntry]],
        media: MediaProcessor | None = None,
        after_turn: Callable[[dict[str, Any], datetime, dict[str, Any]], Awaitable[None]] | None = None,
        clock: Clock = utc_now,
        on_send_failed: Callable[[int, str, SendFailed], Awaitable[None]] | None = None,
        buffer: MessageBuffer | None = None,
    ) -> None:
        self.store = store
        # With [buffer] speculate, where a finished reply learns whether the lead wrote again
        # or is typing (daemon.buffer keeps both).
        self.buffer = buffer
        self._stragglers: set[asyncio.Task[None]] = set()
        self.locks = locks
        self.agent = agent
        self.sender = sender
        self.metrics = metrics
        self.profile = profile
        self.leads = leads
        self.knowledge = knowledge
        self.media = media
        self.after_turn = after_turn  # plans the lead's follow-ups
        self.clock = clock  # dates the turn: its reply is what follow-ups are planned from
        self.on_send_failed = on_send_failed or self._postpone  # the runtime's: one policy for every send
        self.agent_slots = asyncio.Semaphore(profile.pools.agent_pool_size)

    async def run(self, phone: str, only: int | None, on_handoff: Callable[[], Awaitable[None]]) -> bool | None:
        """Answers the lead's unanswered messages (or just message `only`). Returns False
        when another turn holds the lead (it hands the lead back when done), None when
        nothing was pending or the reply was overtaken by a newer message (thrown away: the
        newer message's own window answers the whole burst), True after a turn."""
        async with self.locks.held(phone, on_handoff) as got:
            if not got:
                return False
            self.metrics.turns_in_flight.inc()
            try:
                return await self._turn(phone, only)
            finally:
                self.metrics.turns_in_flight.dec()

    async def _turn(self, phone: str, only: int | None) -> bool | None:
        p = self.profile
        t = p.timeouts
        started = self.clock()
        clock = StageClock(self.metrics)
        burst = await self.store.pending_messages(phone, only)
        if not burst:  # another daemon answered it already
            return None
        if not p.buffer.coalesce:
            burst = burst[:1]
        first, last = burst[0], burst[-1]
        media_task: asyncio.Task[list[MediaResult]] | None = None
        if self.media is not None and any(m.kind in MEDIA_KINDS for m in burst):
            # First: a voice note's transcript is part of what the knowledge search and the
            # agent read. Never raises: a failed photo still leaves the burst's text.
            media_task = asyncio.create_task(self._media(burst, clock), name=f"media:{phone[-4:]}")
            await asyncio.wait({media_task})
        media = media_task.result() if media_task is not None else []
        texts = _texts(burst, media)

        speculative = p.buffer.speculate and p.buffer.coalesce and self.buffer is not None
        # Speculating, the lead may still be typing: "typing..." from us then would talk over
        # it (and hold a connection for nothing). It shows once the lead has been quiet for
        # the settle window, if the reply is not out by then.
        quiet = (datetime.now(UTC) - max(m.received_at for m in burst)).total_seconds()
        presence = self._show_typing(phone, p.buffer.settle_window - quiet if speculative else 0.0)
        kb_task: asyncio.Task[list[KbEntry]] | None = None
        query = self.agent.knowledge_query(texts)
        if not p.features.parallel_context:  # legacy: always the search first, then the rest
            kb_task = asyncio.create_task(self._search(query or " ".join(texts), clock))
            await asyncio.wait({kb_task})
        elif query:  # started now, awaited only when needed
            kb_task = asyncio.create_task(self._search(query, clock), name=f"kb:{phone[-4:]}")

        async def knowledge() -> list[KbEntry]:
            if kb_task is None:
                return []
            try:
                return await kb_task
            except StageFailed:
                return []

        outcome, updates = "ok", {}
        try:
            lead, history = await clock.run("context", self._context(phone, first, clock), t.personalization)
            async with self.agent_slots:
                reply: AgentReply = await clock.run(
                    "agent", self.agent.respond(TurnInput(lead, texts, history, knowledge, media)), t.agent
                )
            # What a bill photo showed goes on the lead, unless the agent learnt better.
            text, updates = reply.text, {**bill_updates(media), **reply.lead_updates}
            if not text.strip():
                clock.failures.append("agent")
                raise StageFailed("agent")
        except StageFailed:
            text, outcome = FALLBACK, "fallback"
        finally:
            if kb_task is not None:
                await cancel_and_wait(kb_task)  # unused if the agent did not need it

        if speculative and await clock.run("hold", self._overtaken(phone, burst), None):
            return await self._discard(phone, burst, clock, presence)

        local = self.sender is None
        finished = self.clock()
        record = TurnRecord(
            lead_id=first.lead_id,
            conversation_id=first.conversation_id,
            message_ids=[m.id for m in burst],
            first_message_at=first.received_at,
            last_message_at=last.received_at,
            started_at=started,
            finished_at=finished,
            buffer_wait_ms=(started - last.received_at).total_seconds() * 1000,
            window_ms=self._window(first, last) * 1000,
            stages=clock.times,
            timeouts=clock.timeouts,
            failures=clock.failures,
            agent_backend=self.agent.name,
            outcome=outcome,
            reply=text,
            parts=split_message(text, p.limits.max_message_length),
            phone=phone,
            outbox_status="local" if local else "pending",
            response_ms=(finished - last.received_at).total_seconds() * 1000 if local else None,
            lead_updates=updates,
            cache_hits=clock.cache_hits,
            cache_misses=clock.cache_misses,
        )
        done = await clock.run("store", self.store.finish_turn(record, unless_newer=speculative), t.database)
        if done is None:  # a newer message was stored after the last look: it is answered with the rest
            return await self._discard(phone, burst, clock, presence)
        if self.after_turn is not None:
            try:
                await self.after_turn(done.lead, finished, updates)
            except Exception as exc:  # the reply matters more; the next turn plans them again
                log.warning("could not plan follow-ups: %s: %s", exc.__class__.__name__, exc)
        if updates:  # write through, and drop stale copies in other daemons
            await self.leads.invalidate(phone)
            await self.leads.set(phone, done.lead)
        self.metrics.turns.labels(outcome).inc()
        if presence is not None:  # never "typing..." after the reply: no request outlives the turn
            await self._stop_typing(presence)
        if local:
            self.metrics.sends.labels("local").inc(len(record.parts))
            self.metrics.response_time.observe(record.response_ms / 1000)  # type: ignore[operator]
        else:
            await self._deliver(phone, record.parts, done.turn_id, done.outbox_ids, last.received_at, clock)
        return True

    async def _overtaken(self, phone: str, burst: list[PendingMessage]) -> bool:
        """Holds a finished reply until the lead has been quiet settle_window (presence_settle
        for a lead whose presence we see) and is not typing (for at most reply_hold).
        True when a newer message arrived meanwhile: the reply answers a burst that is
        not over, and must not be sent."""
        assert self.buffer is not None
        b, loop = self.profile.buffer, asyncio.get_running_loop()
        give_up = loop.time() + self.profile.timeouts.reply_hold
        benign = ""  # an arming already found to be a re-delivered copy of the burst's own message
        last_id, last_at = max(m.id for m in burst), max(m.received_at for m in burst)
        while True:
            state = await self.buffer.state(phone)
            if state.pending and state.pending != benign:
                if await self.store.newer_message(burst[0].lead_id, last_id):
                    return True
                benign = state.pending
            quiet = (datetime.now(UTC) - last_at).total_seconds()  # the database's clock and ours (NTP)
            left = (b.presence_settle if state.present else b.settle_window) - quiet
            if state.typing and loop.time() < give_up:
                left = max(left, b.hold_poll)
            if left <= 0:
                return False
            if left > b.hold_poll:  # the next state comes one poll later anyway
                continue
            await asyncio.sleep(left)

    async def _discard(
        self,
        phone: str,
        burst: list[PendingMessage],
        clock: StageClock,
        presence: asyncio.Task[None] | None,
    ) -> None:
        """A reply overtaken by a newer message: thrown away, and counted (an agent call paid
        for). The newer message armed the lead's buffer; if that entry was lost (or already
        claimed by a turn that found us holding the lead), the lead is armed again."""
        assert self.buffer is not None
        if presence is not None:
            await self._stop_typing(presence)
        reason = "newer_message"
        self.metrics.discarded.labels(reason).inc()
        await self.store.discard_reply(burst[0].lead_id, [m.id for m in burst], reason, clock.times.get("agent"))
        await self.buffer.add_if_absent(phone, self.profile.buffer.quiet_window)
        log.info("reply for ...%s thrown away: the lead wrote again", phone[-4:])
        return None

    async def _media(self, burst: list[PendingMessage], clock: StageClock) -> list[MediaResult]:
        """Every photo and voice note of the burst, concurrently, within the multimodal
        budget; a timeout or failure is recorded on the turn and answered gracefully."""
        assert self.media is not None
        items = [m for m in burst if m.kind in MEDIA_KINDS]
        work = asyncio.gather(*(self.media.analyse(m) for m in items))
        try:
            results: list[MediaResult] = await clock.run("media", work, self.profile.timeouts.multimodal)
        except StageFailed:  # over the whole budget: clock.run recorded the timeout
            return [MediaResult(m.id, m.kind, "timeout", "timeout") for m in items]
        if any(r.outcome in ("failed", "timeout") for r in results):
            clock.failures.append("media")
            self.metrics.failures.labels("media").inc()
        for r in results:
            clock.cache_use(r.cached)
        return results

    def _window(self, first: PendingMessage, last: PendingMessage) -> float:
        """The window the buffer gave the burst's last message, within the cap."""
        spent = (last.received_at - first.received_at).total_seconds()
        cap = self.profile.timeouts.message_buffer - spent if self.profile.buffer.coalesce else None
        wanted = window_for(last.kind, last.body, self.profile.buffer)
        return max(0.0, wanted if cap is None else min(wanted, cap))

    async def _context(
        self, phone: str, first: PendingMessage, clock: StageClock
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The lead (from cache when it can) and its recent history."""
        limit = self.profile.limits.history_limit
        lead = await self.leads.get(phone)
        clock.cache_use(lead is not None)
        if lead is not None:
            return lead, await self.store.history(first.conversation_id, limit)
        lead, history = await self.store.lead_with_history(first.lead_id, first.conversation_id, limit)
        await self.leads.set(phone, lead)
        return lead, history

    async def _search(self, text: str, clock: StageClock) -> list[KbEntry]:
        limit = self.profile.limits.kb_results
        loaded = False

        async def load() -> list[KbEntry]:
            nonlocal loaded
            loaded = True
            return await self.store.search_knowledge(text, limit)

        # Keyed by the normalised query, so "Quanto custa?" and "quanto custa" share an entry.
        key = f"{limit}:{tsquery_any(text)}"
        entries = await clock.run(
            "knowledge", self.knowledge.get_or_load(key, load), self.profile.timeouts.knowledge_base
        )
        clock.cache_use(not loaded)
        return entries

    def _show_typing(self, phone: str, not_before: float) -> asyncio.Task[None] | None:
        """ "typing..." once the turn has run `typing_after`, for at most the agent's budget;
        best effort, owned by the turn. Evolution holds each request for its delay and,
        past 20 s, loops composing -> paused -> composing on its own (which would show
        "typing..." after the reply): so each request asks for one slice of at most 20 s,
        and the next is asked only while the turn still runs."""
        if self.sender is None or not self.profile.features.typing_presence:
            return None
        sender, t = self.sender, self.profile.timeouts
        loop = asyncio.get_running_loop()

        async def show() -> None:
            await asyncio.sleep(max(self.profile.features.typing_after, not_before))
            until = loop.time() + t.agent
            try:
                while (left := until - loop.time()) > 0.05:
                    await sender.send_presence(phone, int(min(left, PRESENCE_MAX_MS / 1000) * 1000), t.evolution_send)
            except Exception as exc:  # never worth failing a turn over
                log.info("typing presence not shown: %s", exc.__class__.__name__)

        return asyncio.create_task(show(), name=f"typing:{phone[-4:]}")

    async def _stop_typing(self, presence: asyncio.Task[None]) -> None:
        """Cancels "typing...": bounded, so a library that swallows a cancellation cannot
        hold the turn (and the lead's lock) forever."""
        if not await cancel_and_wait(presence, self.profile.timeouts.evolution_send):
            log.warning("the typing-presence task did not end when cancelled")
            self._stragglers.add(presence)  # owned until it ends; cancelled again at shutdown
            presence.add_done_callback(self._stragglers.discard)

    async def close(self) -> None:
        """Shutdown: cancels the typing tasks that did not end with their turn."""
        for task in list(self._stragglers):
            await cancel_and_wait(task, self.profile.timeouts.evolution_send)

    async def _postpone(self, outbox_id: int, phone: str, exc: SendFailed) -> None:
        await self.store.postpone(outbox_id, str(exc), self.profile.limits.redeliver_backoff, uncertain=exc.uncertain)

    async def _deliver(
        self,
        phone: str,
        parts: list[str],
        turn_id: int,
        outbox_ids: list[int],
        last_at: datetime,
        clock: StageClock,
    ) -> None:
        """Sends the parts in order; a part that fails stops the rest (recorded failed)."""
        assert self.sender is not None
        sender = self.sender
        for i, (outbox_id, part) in enumerate(zip(outbox_ids, parts, strict=True)):
            tries = 0

            async def record_attempt(outbox_id: int = outbox_id, first_part: bool = i == 0) -> None:
                nonlocal tries
                tries += 1
                if not (first_part and tries == 1):  # that one was recorded with the turn
                    await self.store.record_send_attempt(outbox_id)

            try:
                # the client has its own timeouts, per attempt
                provider_id = await clock.run("send", sender.send_text(phone, part, record_attempt), None)
            except StageFailed as exc:
                cause = exc.__cause__
                if not isinstance(cause, SendFailed):  # the send stage's own time budget: unknown
                    cause = SendFailed(str(cause or exc), "uncertain")
                await self.on_send_failed(outbox_id, phone, cause)
                # The parts after it certainly did not go: re-delivered in order, or with an
                # unreachable number, failed with it.
                for later in outbox_ids[i + 1 :]:
                    if cause.final:
                        await self.store.record_delivery([later], status="failed", error=str(cause)[:500])
                    else:
                        await self.store.postpone(
                            later, "an earlier part did not go out", self.profile.limits.redeliver_backoff
                        )
                self.metrics.sends.labels("failed").inc(len(outbox_ids) - i)
                return
            self.metrics.sends.labels("sent").inc()
            if i == 0:  # the lead sees an answer from the first message on
                response = (datetime.now(UTC) - last_at).total_seconds()
                await self.store.record_delivery(
                    [outbox_id],
                    status="sent",
                    provider_id=provider_id,
                    turn_id=turn_id,
                    response_ms=response * 1000,
                )
                self.metrics.response_time.observe(response)
            else:
                await self.store.record_delivery([outbox_id], status="sent", provider_id=provider_id)


MEDIA_KINDS = ("image", "audio")


def _texts(burst: list[PendingMessage], media: list[MediaResult]) -> list[str]:
    """The burst as the agent reads it, in order: texts, captions and transcripts."""
    transcripts = {r.message_id: r.transcript for r in media if r.transcript}
    texts = []
    for m in burst:
        if m.body.strip():
            texts.append(m.body)
        if m.id in transcripts:
            texts.append(transcripts[m.id] or "")
    return texts


def bill_updates(media: list[MediaResult]) -> dict[str, Any]:
    """The lead's bill value and consumption, from the last bill photo that showed them."""
    updates: dict[str, Any] = {}
    for r in media:
        if r.bill and r.bill.get("amount"):
            updates["bill_value"] = Decimal(r.bill["amount"])
        if r.bill and r.bill.get("kwh"):
            updates["consumption_kwh"] = int(r.bill["kwh"])
    return updates
