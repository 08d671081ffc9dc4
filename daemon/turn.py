"""One turn: a lead's burst in, one reply out.

Under the lead's lock: read the unanswered burst, load the lead (cached) with its history
while the knowledge-base search (cached) runs alongside, let the agent write the reply (it
awaits the search only if it needs it), then store everything in one statement and deliver.
Every stage has its timeout from the profile; a stage that times out or fails is recorded,
and the lead still gets an answer."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from daemon import logs, telemetry, unguarded
from daemon.agents import Agent, AgentReply, TurnInput, Usage
from daemon.agents.tools import Effects, ToolBox, ToolRules
from daemon.buffer import MessageBuffer, window_for
from daemon.cache import TwoTierCache
from daemon.config import HandoverSettings, Profile, parse_phones
from daemon.errors import StageFailed
from daemon.evolution import PRESENCE_MAX_MS, split_message
from daemon.followups.calendar import Clock, utc_now
from daemon.followups.planner import Planned, Planner
from daemon.followups.store import FollowUpStore
from daemon.handover import Intent, Intents, Notifier
from daemon.knowledge.search import Degraded, KnowledgeSearch
from daemon.locks import LeadLocks, Lease
from daemon.media.processor import MediaProcessor
from daemon.media.result import MediaResult
from daemon.metrics import Metrics
from daemon.models import ANALYSED_KINDS, FinishedTurn, KbEntry, PendingMessage, TurnRecord
from daemon.outbox import Outbox, Status
from daemon.stages import StageClock
from daemon.store import LEAD_COLUMNS, Store, tsquery_any
from daemon.streaming import StreamedReply, StreamRows, StreamStopped
from daemon.tasks import Children, cancel_and_wait

log = logging.getLogger("sdr.turn")
Tokens = tuple[int | None, int | None, float | None]  # prompt, completion, cost

FALLBACK = "Oi! Recebi sua mensagem 😊 Estou verificando algumas informações e já te respondo por aqui."


class TurnRunner:
    def __init__(
        self,
        *,
        store: Store,
        locks: LeadLocks,
        agent: Agent,
        outbox: Outbox,
        metrics: Metrics,
        profile: Profile,
        leads: TwoTierCache[dict[str, Any]],
        knowledge: TwoTierCache[list[KbEntry]],
        media: MediaProcessor | None = None,
        planner: Planner | None = None,
        followup_store: FollowUpStore | None = None,
        clock: Clock = utc_now,
        buffer: MessageBuffer | None = None,
        handover: HandoverSettings | None = None,
        notifier: Notifier | None = None,
        prices: tuple[float, float] = (0.0, 0.0),
        tools: ToolRules | None = None,
        stream_rows: StreamRows | None = None,
        kb_search: KnowledgeSearch,
    ) -> None:
        self.store = store
        # With [buffer] speculate, where a finished reply learns whether the lead wrote again
        # or is typing (daemon.buffer keeps both).
        self.buffer = buffer
        self._stragglers: set[asyncio.Task[Any]] = set()  # children that outlived their cancel
        self.locks = locks
        self.agent = agent
        self.outbox = outbox  # local (no Evolution API): replies stay in the table (`sdrctl chat`)
        self.sender = outbox.sender  # for "typing..."
        self.metrics = metrics
        self.profile = profile
        self.leads = leads
        self.knowledge = knowledge
        self.media = media
        # After each reply, the lead's next follow-ups replace its pending silence ones.
        self.planner = planner
        self.followup_store = followup_store
        self.clock = clock  # dates the turn: its reply is what follow-ups are planned from
        self.agent_slots = asyncio.Semaphore(profile.pools.agent_pool_size)
        self.handover = handover or HandoverSettings()  # what the bot says when it steps back
        self.ignored = frozenset(parse_phones(self.handover.ignore))  # sdr.toml's; the table has the rest
        self.intents = Intents.from_knobs(profile.handover)
        self.notifier = notifier  # hand-off notices, sent in the background
        self.prices = prices  # [agent] price_in, price_out: per million tokens
        self.tools = tools  # the agent's tools and their rules (None: an agent without tools)
        self.stream_rows = stream_rows  # None: replies are never streamed
        self.kb_search = kb_search  # full-text and, with an embeddings endpoint, by meaning (one query for both)

    async def run(self, phone: str, only: int | None) -> bool | None:
        """Answers the lead's unanswered messages (or just message `only`). Returns False
        when another turn holds the lead (it hands the lead back when done), None when
        nothing was pending or the reply was overtaken by a newer message (thrown away: the
        newer message's own window answers the whole burst), True after a turn."""
        async with self.locks.held(phone) as lease:
            if lease is None:
                return False
            self.metrics.turns_in_flight.inc()
            try:
                return await self._turn(phone, only, lease)
            finally:
                self.metrics.turns_in_flight.dec()

    async def _turn(self, phone: str, only: int | None, lease: Lease) -> bool | None:
        fence = None if unguarded.off("fence") else lease.fence
        if lease.lapsed and fence is not None:
            await self._fenced(phone, "lapsed")
            return None
        begun = await self.store.begin_turn(phone, fence, only)
        if begun is None:
            await self._fenced(phone, "fenced")
            return None
        burst, silenced = begun
        if not burst:  # another daemon answered it already
            return None
        if not self.profile.buffer.coalesce:
            burst = burst[:1]
        if telemetry.enabled():  # the webhooks that fed the turn, and how long it waited for it
            telemetry.link_to([m.trace for m in burst])
            telemetry.waited("buffer wait", max(m.received_at for m in burst))
            telemetry.annotate(**{"sdr.turn.messages": len(burst)})
        if phone in self.ignored:
            silenced = "ignored"
        if silenced is not None:  # a person has the lead, or the bot never answers it
            return await self._silent(phone, burst, silenced, fence)
        # The turn's children ("typing...", the knowledge search) end with it, on any path.
        async with Children(self.profile.timeouts.evolution_send, self._stragglers) as children:
            return await self._answer(phone, burst, children, lease, fence)

    async def _answer(
        self, phone: str, burst: list[PendingMessage], children: Children, lease: Lease, fence: int | None
    ) -> bool | None:
        p = self.profile
        t = p.timeouts
        started = self.clock()
        clock = StageClock(self.metrics)
        first, last = burst[0], burst[-1]
        # First: a voice note's transcript is part of what the knowledge search and the
        # agent read. Never raises: a failed photo still leaves the burst's text.
        analysed = self.media is not None and any(m.kind in ANALYSED_KINDS for m in burst)
        media = await self._media(burst, clock) if analysed else []
        texts = _texts(burst, media)

        speculative = p.buffer.speculate and p.buffer.coalesce and self.buffer is not None
        # Speculating, the lead may still be typing: "typing..." from us then would talk over
        # it (and hold a connection for nothing). It shows once the lead has been quiet for
        # the settle window, if the reply is not out by then.
        quiet = (datetime.now(UTC) - max(m.received_at for m in burst)).total_seconds()
        presence = self._show_typing(phone, p.buffer.settle_window - quiet if speculative else 0.0, children)
        kb_task: asyncio.Task[list[KbEntry]] | None = None
        intent = self.intents.of(texts)  # opt-out, opt-in, asking for a person: no agent
        query = None if intent else self.agent.knowledge_query(texts)
        if not p.features.parallel_context and not intent:  # legacy: always the search first, then the rest
            kb_task = children.start(self._search(query or " ".join(texts), clock), f"kb:{phone[-4:]}")
            await asyncio.wait({kb_task})
        elif query:  # started now, awaited only when needed
            kb_task = children.start(self._search(query, clock), f"kb:{phone[-4:]}")

        async def knowledge() -> list[KbEntry]:
            return [] if kb_task is None else await kb_task

        outcome: str = "ok"
        event: tuple[str, str] | None = None
        updates: dict[str, Any] = {}
        tokens: Tokens = (None, None, None)  # what the model billed, if one was asked
        box = ToolBox(self.tools, started, lambda q: self._search(q, clock)) if self.tools else None
        stream: StreamedReply | None = None
        try:
            lead, history = await clock.run("context", self._context(phone, first, clock), t.personalization)
            if intent == "opt_in" and not lead.get("opted_out_at"):
                intent = None  # "voltar" from a lead who never left: a normal message
            if intent is not None:
                text, updates, event = self._step_back(intent, started)
            else:
                stream = self._stream(phone, burst, started, clock, children, presence, lease, fence, speculative)
                turn = TurnInput(lead, texts, history, knowledge, media, box, stream.put if stream else None)
                async with self.agent_slots:
                    reply: AgentReply = await clock.run(
                        "agent", self.agent.respond(turn), t.agent, passthrough=(StreamStopped,)
                    )
                tokens = self._billed(reply.usage)
                # What a bill photo showed goes on the lead, unless the agent learnt better.
                # Only the qualification fields: an agent never pauses or opts out a lead.
                agent_updates = {k: v for k, v in reply.lead_updates.items() if k in LEAD_COLUMNS}
                text, updates = reply.text, {**bill_updates(media), **agent_updates}
                if box is not None:
                    updates, event = self._effects(box.effects, updates, started)
                if not text.strip():
                    clock.failures.append("agent")
                    raise StageFailed("agent")
        except StageFailed:
            text, outcome = FALLBACK, "fallback"
        except StreamStopped as stop:  # the reply may not be written (or go on): nothing was sent
            if kb_task is not None:
                await children.stop(kb_task)
            return await self._stream_stopped(phone, burst, clock, presence, children, stop.reason, started, stream)
        if kb_task is not None:
            await children.stop(kb_task)  # unused if the agent did not need it
        for name, accepted in box.effects.calls if box is not None else []:  # whatever came of the reply
            self.metrics.agent_tools.labels(name, "accepted" if accepted else "refused").inc()
        followup = box.effects.followup if box is not None and outcome == "ok" else None
        if stream is not None and stream.started:
            return await self._streamed(phone, stream, burst, clock, outcome, tokens, updates, event, texts, followup)

        if speculative and await clock.run("hold", self._overtaken(phone, burst), None):
            # A turn that lost its lease meanwhile says so, whatever else stopped it.
            lapsed = fence is not None and lease.lapsed
            await self._discard(
                phone, burst, clock, presence, children, "lapsed" if lapsed else "newer_message", started, tokens
            )
            if lapsed:
                await self._fenced(phone, "lapsed")
            return None

        local = self.outbox.local
        finished = self.clock()
        record = TurnRecord.of(
            burst,
            phone,
            started,
            finished,
            Status.LOCAL if local else Status.PENDING,
            buffer_wait_ms=(started - last.received_at).total_seconds() * 1000,
            window_ms=self._window(first, last) * 1000,
            stages=clock.times,
            timeouts=clock.timeouts,
            failures=clock.failures,
            agent_backend=self.agent.name,
            outcome=outcome,
            reply=text,
            parts=split_message(text, p.limits.max_message_length),
            response_ms=(finished - last.received_at).total_seconds() * 1000 if local else None,
            lead_updates=updates,
            cache_hits=clock.cache_hits,
            cache_misses=clock.cache_misses,
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
            cost=tokens[2],
        )
        if fence is not None and lease.lapsed:  # paused past the lock's TTL: another turn may answer
            await self._discard(phone, burst, clock, presence, children, "lapsed", started, tokens)
            await self._fenced(phone, "lapsed")
            return None
        done = await clock.run(
            "store", self.store.finish_turn(record, fence, unless_newer=speculative, event=event), t.database
        )
        if done == "paused":  # a person wrote to the lead meanwhile: they have it now
            if presence is not None:
                await children.stop(presence)
            return await self._silent(phone, burst, "paused", fence)
        if done == "fenced":  # a newer turn holds the lead, or answered these messages
            await self._discard(phone, burst, clock, presence, children, "fenced", started, tokens)
            await self._fenced(phone, "fenced")
            return None
        if done == "newer_message":  # stored after the last look: it is answered with the rest
            await self._discard(phone, burst, clock, presence, children, done, started, tokens)
            return None
        _note(turn=done.turn_id)
        await self._after(phone, done.lead, first.lead_id, finished, updates, event, texts, outcome, followup)
        if presence is not None:  # never "typing..." after the reply
            await children.stop(presence)
        if local:
            self.metrics.sends.labels("local").inc(len(record.parts))
            self.metrics.response_time.observe((finished - last.received_at).total_seconds())
        else:
            parts = list(zip(done.outbox_ids, record.parts, strict=True))
            await self.outbox.send_reply(phone, parts, done.turn_id, last.received_at, clock, lease)
        return True

    async def _after(
        self,
        phone: str,
        lead: dict[str, Any],
        lead_id: int,
        finished: datetime,
        updates: dict[str, Any],
        event: tuple[str, str] | None,
        texts: list[str],
        outcome: str,
        followup: Planned | None,
    ) -> None:
        """Once the reply is on record: the lead's next follow-ups, the hand-off notice,
        the lead's cached copies, the counters."""
        if self.planner is not None and self.followup_store is not None:
            try:
                if why := self.planner.silenced(lead, finished):  # opted out, paused: none at all
                    await self.followup_store.cancel_all(lead_id, finished, why)
                else:
                    planned = self.planner.after_turn(lead, finished, meeting_changed="meeting_at" in updates)
                    planned += [followup] if followup is not None else []  # the agent's schedule_followup
                    await self.followup_store.plan(lead_id, planned, finished, "the lead wrote again")
            except Exception as exc:  # the reply matters more; the next turn plans them again
                log.warning("could not plan follow-ups: %s: %s", exc.__class__.__name__, exc)
        if event is not None:
            self.metrics.handover.labels(event[0]).inc()
            if event[0] == "handoff" and self.notifier is not None:
                self.notifier.notify(handoff_notice(lead, texts, finished))
        if updates:  # write through, and drop stale copies in other daemons
            await self.leads.replace(phone, lead)
        self.metrics.turns.labels(outcome).inc()
        _note(outcome=outcome)

    def _effects(
        self, effects: Effects, updates: dict[str, Any], now: datetime
    ) -> tuple[dict[str, Any], tuple[str, str] | None]:
        """The lead updates and event of the agent's accepted tool calls (validated by the
        tools): request_human pauses the bot for the lead, as a hand-off phrase does."""
        updates = {**updates, **effects.updates}
        if effects.handoff is None:
            return updates, None
        _, pause, event = self._step_back("handoff", now)
        return {**updates, **pause}, event

    def _stream(
        self,
        phone: str,
        burst: list[PendingMessage],
        started: datetime,
        clock: StageClock,
        children: Children,
        presence: asyncio.Task[None] | None,
        lease: Lease,
        fence: int | None,
        speculative: bool,
    ) -> StreamedReply | None:
        """Where a streamed reply's parts go (None: this runner never streams). The first
        part writes the turn, as a whole reply would, after the same last look."""
        if self.stream_rows is None:
            return None
        p = self.profile
        status = Status.LOCAL if self.outbox.local else Status.PENDING
        last = burst[-1]
        base = TurnRecord.of(burst, phone, started, started, status, agent_backend=self.agent.name)

        async def open_turn(text: str) -> FinishedTurn:
            if speculative and await clock.run("hold", self._overtaken(phone, burst), None):
                raise StreamStopped("newer_message")
            if presence is not None:  # the parts show their own "typing..." from here on
                await children.stop(presence)
            now = self.clock()
            record = replace(
                base,
                finished_at=now,
                buffer_wait_ms=(started - last.received_at).total_seconds() * 1000,
                window_ms=self._window(burst[0], last) * 1000,
                stages=dict(clock.times),
                reply=text,
                parts=[text],
                response_ms=(now - last.received_at).total_seconds() * 1000 if self.outbox.local else None,
            )
            done = await self.store.finish_turn(record, fence, unless_newer=speculative)
            if isinstance(done, str):
                raise StreamStopped(done)
            _note(turn=done.turn_id)
            return done

        return StreamedReply(
            rows=self.stream_rows,
            outbox=self.outbox,
            open_turn=open_turn,
            phone=phone,
            burst=burst,
            record=base,
            lease=lease,
            fence=fence,
            clock=clock,
            children=children,
            presence_ms=int(p.timeouts.agent * 1000),
            presence_timeout=p.timeouts.evolution_send,
        )

    async def _streamed(
        self,
        phone: str,
        stream: StreamedReply,
        burst: list[PendingMessage],
        clock: StageClock,
        outcome: str,
        tokens: Tokens,
        updates: dict[str, Any],
        event: tuple[str, str] | None,
        texts: list[str],
        followup: Planned | None,
    ) -> bool | None:
        """A streamed reply whose first part is on record: its last part (the fallback, when
        the stream was cut or ran out of time) goes, then what the reply came to is written."""
        if outcome == "fallback":
            try:
                await stream.put(FALLBACK)
            except StreamStopped:
                pass  # the lead has the parts on record; whoever holds the lead now goes on
        await stream.end()
        finished = self.clock()
        record = replace(
            stream.record,
            finished_at=finished,
            stages=clock.times,
            timeouts=clock.timeouts,
            failures=clock.failures,
            outcome=outcome,
            reply="\n\n".join(stream.texts),
            lead_updates=updates,
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
            cost=tokens[2],
        )
        lead = await clock.run("store", stream.finish(record, event), self.profile.timeouts.database)
        if lead is None:  # the lead went to another turn meanwhile: what was sent stands
            await self._fenced(phone, "fenced")
            return True
        if self.outbox.local:
            self.metrics.sends.labels("local").inc(len(stream.texts))
            self.metrics.response_time.observe((finished - burst[-1].received_at).total_seconds())
        await self._after(phone, lead, burst[0].lead_id, finished, updates, event, texts, outcome, followup)
        return True

    async def _stream_stopped(
        self,
        phone: str,
        burst: list[PendingMessage],
        clock: StageClock,
        presence: asyncio.Task[None] | None,
        children: Children,
        reason: str,
        started: datetime,
        stream: StreamedReply | None,
    ) -> bool | None:
        """A streamed reply its turn may not write (or go on with): refused at its first
        part, like a whole reply (paused, fenced, overtaken); or refused later (the turn
        lost the lead), when the parts on record still go."""
        if stream is not None and stream.started:
            await stream.end()
            await self._fenced(phone, reason)
            return True
        if reason == "paused":
            if presence is not None:
                await children.stop(presence)
            return await self._silent(phone, burst, "paused", stream.fence if stream is not None else None)
        await self._discard(phone, burst, clock, presence, children, reason, started)
        if reason != "newer_message":
            await self._fenced(phone, reason)
        return None

    def _billed(self, usage: Usage | None) -> Tokens:
        """An agent call's tokens and cost, counted in /metrics as it is paid for (whether
        its reply is sent or thrown away)."""
        if usage is None:
            return (None, None, None)
        cost = usage.cost(*self.prices)
        self.metrics.agent_tokens.labels("prompt").inc(usage.prompt)
        self.metrics.agent_tokens.labels("completion").inc(usage.completion)
        if cost is not None:
            self.metrics.agent_cost.inc(cost)
        return (usage.prompt, usage.completion, cost)

    def _step_back(self, intent: Intent, now: datetime) -> tuple[str, dict[str, Any], tuple[str, str]]:
        """The reply, lead updates and event of a whole-message intent: the lead's opt-out
        (or opt-in), or its asking for a person (the bot pauses for the lead and says a
        consultant will answer)."""
        h = self.handover
        if intent == "opt_out":
            return h.opt_out_reply, {"opted_out_at": now}, ("opt_out", "lead")
        if intent == "opt_in":
            return h.opt_in_reply, {"opted_out_at": None}, ("opt_in", "lead")
        until = now + timedelta(seconds=self.profile.handover.pause)
        return h.handoff_reply, {"paused_until": until, "paused_by": "handoff", "paused_at": now}, ("handoff", "bot")

    async def _silent(self, phone: str, burst: list[PendingMessage], why: str, fence: int | None) -> bool | None:
        """A burst the bot does not answer (the lead is paused, or ignored): stored, shown
        in `sdrctl leads show`, and marked handled by a turn without a reply."""
        now = self.clock()
        record = TurnRecord.of(burst, phone, now, now, Status.SUPPRESSED, outcome=why)
        if not await self.store.silent_turn(record, fence):
            await self._fenced(phone, "fenced")
            return None
        self.metrics.handover.labels("suppressed").inc()
        self.metrics.turns.labels(why).inc()
        _note(outcome=why)
        log.info("a burst of ...%s not answered: the lead is %s", phone[-4:], why)
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
        children: Children,
        reason: str,
        started: datetime,
        tokens: Tokens = (None, None, None),
    ) -> None:
        """A reply not sent: overtaken by a newer message ('newer_message'), or written by a
        turn that no longer holds the lead ('lapsed', 'fenced'). Thrown away, and counted
        (an agent call paid for). The newer message armed the lead's buffer; if that entry
        was lost (or already claimed by a turn that found us holding the lead), the lead is
        armed again."""
        if presence is not None:
            await children.stop(presence)
        self.metrics.discarded.labels(reason).inc()
        _note(outcome=f"discarded: {reason}")
        await self.store.discard_reply(
            burst[0].lead_id, [m.id for m in burst], reason, clock.times.get("agent"), started, tokens
        )
        if self.buffer is not None:
            await self.buffer.add_if_absent(phone, self.profile.buffer.quiet_window)
        log.info("reply for ...%s thrown away: %s", phone[-4:], reason)

    async def _fenced(self, phone: str, reason: str) -> None:
        """A turn that lost the lead to another (its lock lapsed: a pause past the TTL): it
        stopped before writing or sending anything, and is counted. Whoever holds the lead
        now answers its messages; if nobody does, the buffer's entry brings them back."""
        self.metrics.fenced.labels(reason).inc()
        log.warning("a turn of ...%s stopped: %s (its lock lapsed; another turn answers)", phone[-4:], reason)
        if self.buffer is not None:
            await self.buffer.add_if_absent(phone, self.profile.buffer.quiet_window)

    async def _media(self, burst: list[PendingMessage], clock: StageClock) -> list[MediaResult]:
        """Every photo and voice note of the burst, concurrently, within the multimodal
        budget; a timeout or failure is recorded on the turn and answered gracefully."""
        assert self.media is not None
        items = [m for m in burst if m.kind in ANALYSED_KINDS]
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
        search = self.kb_search

        async def load() -> list[KbEntry]:
            nonlocal loaded
            loaded = True
            return [r.entry for r in await search.search(text, limit)]

        # Keyed by the normalised query, so "Quanto custa?" and "quanto custa" share an
        # entry; by meaning, the whole question counts (word order, short words).
        if search.embedder is None:
            key = f"{limit}:{tsquery_any(text)}"
        else:
            key = f"{limit}:h:{' '.join(text.lower().split())}"
        try:
            entries = await clock.run(
                "knowledge",
                self.knowledge.get_or_load(key, load),
                self.profile.timeouts.knowledge_base,
                passthrough=(Degraded,),
            )
        except Degraded as d:  # the question's embedding failed: full-text, and not cached
            entries = [r.entry for r in d.results]
        except StageFailed:  # recorded; the agent answers without the knowledge base
            return []
        clock.cache_use(not loaded)
        return entries

    def _show_typing(self, phone: str, not_before: float, children: Children) -> asyncio.Task[None] | None:
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

        return children.start(show(), f"typing:{phone[-4:]}")

    async def close(self) -> None:
        """Shutdown: cancels the turns' children that did not end with their turn."""
        for task in list(self._stragglers):
            await cancel_and_wait(task, self.profile.timeouts.evolution_send)


def _note(**fields: str | int) -> None:
    """What the turn came to, on its log lines from here on and on its span."""
    logs.annotate(**fields)
    telemetry.annotate(**{f"sdr.turn.{'id' if key == 'turn' else key}": value for key, value in fields.items()})


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


def handoff_notice(lead: dict[str, Any], texts: list[str], at: datetime) -> dict[str, Any]:
    """What `[handover] notify_url` gets: who asked for a person, and what they wrote."""
    return {
        "event": "handoff",
        "lead": {k: lead.get(k) for k in ("id", "phone_number", "name", "stage", "bill_value", "meeting_at")},
        "messages": texts,
        "paused_until": lead.get("paused_until"),
        "at": at.isoformat(),
    }


def bill_updates(media: list[MediaResult]) -> dict[str, Any]:
    """The lead's bill value and consumption, from the last bill photo that showed them."""
    updates: dict[str, Any] = {}
    for r in media:
        if r.bill and r.bill.get("amount"):
            updates["bill_value"] = Decimal(r.bill["amount"])
        if r.bill and r.bill.get("kwh"):
            updates["consumption_kwh"] = int(r.bill["kwh"])
    return updates
