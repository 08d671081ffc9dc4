"""The daemon's lifecycle in one place: start (pools, migrations, recovery, the buffer's
flush loop), the intake's entry point, and stop (stop intake, let in-flight turns finish
within the grace period, cancel the rest, close pools). Every task it starts is in its
owned set; none is fire-and-forget."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from daemon import migrations
from daemon.agents import make_agent
from daemon.buffer import MessageBuffer, member, parse_member, window_for
from daemon.cache import CacheInvalidations, TwoTierCache
from daemon.config import Config
from daemon.connections import pg_options, redis_client
from daemon.embedded import Endpoints
from daemon.errors import MigrationError, UnavailableError
from daemon.evolution import Edit, EvolutionClient, SendFailed, Typing
from daemon.followups.executor import FollowUpExecutor
from daemon.followups.jobs import CrmPush, Jobs, KnowledgeRefresh
from daemon.followups.planner import Planner
from daemon.followups.store import FollowUpStore
from daemon.identity import Identities
from daemon.intake import IngestBatcher
from daemon.locks import LeadLocks
from daemon.media.processor import MediaProcessor
from daemon.metrics import Metrics
from daemon.models import Inbound, KbEntry
from daemon.outbox import UncertainSends
from daemon.store import Store, connect
from daemon.tasks import cancel_and_wait
from daemon.turn import StageFailed, TurnRunner

log = logging.getLogger("sdr.runtime")

# What an outage of Postgres or Redis looks like from here: the intake answers 503.
# (InternalClientError: asyncpg on a connection the server dropped mid-query.)
OUTAGE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, RedisError)


class Runtime:
    def __init__(self, config: Config, endpoints: Endpoints, *, auto_migrate: bool) -> None:
        self.config = config
        self.endpoints = endpoints
        self.auto_migrate = auto_migrate
        self.metrics = Metrics()
        self.accepting = False
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._sender: EvolutionClient | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        cfg, p = self.config, self.config.profile
        try:
            self.pool = await connect(self.endpoints.database_url, p, pooled=self.endpoints.pooled)
        except OUTAGE as exc:
            raise UnavailableError(f"PostgreSQL is unreachable: {exc}") from None
        try:
            # The intake's own connections: a webhook never waits behind turns' queries.
            self.intake_pool = await connect(
                self.endpoints.database_url, p, size=p.pools.ingest_flushes, pooled=self.endpoints.pooled
            )
        except OUTAGE as exc:
            await self.pool.close()
            raise UnavailableError(f"PostgreSQL is unreachable: {exc}") from None
        self.redis = redis_client(self.endpoints.redis_url, self.endpoints.redis_cluster, cfg)
        try:
            await self.redis.ping()
        except OUTAGE as exc:
            await self._close_pools()
            raise UnavailableError(f"Redis is unreachable: {exc}") from None
        try:
            await self._check_schema()
        except (MigrationError, *OUTAGE) as exc:
            await self._close_pools()
            if isinstance(exc, MigrationError):
                raise
            raise UnavailableError(f"PostgreSQL failed while checking the schema: {exc}") from None
        self.store = Store(self.pool, p)
        b = p.buffer
        self.buffer = MessageBuffer(
            self.redis,
            b.quiet_window,
            p.timeouts.message_buffer,
            b.claim_batch,
            presence_window=b.presence_settle if b.speculate else 0.0,
            typing_ttl=b.typing_ttl,
            presence_memory=b.presence_memory,
            typing_hold=p.timeouts.reply_hold if self._presence_aware() else 0.0,
            poll=b.hold_poll,
        )
        locks = LeadLocks(self.redis, p.timeouts.redis_lock_ttl, p.limits.lock_attempts, p.limits.lock_backoff)
        c = p.cache
        self.leads: TwoTierCache[dict[str, Any]] = TwoTierCache(
            "lead",
            self.redis,
            dict[str, Any],
            ttl=c.lead_ttl,
            local_ttl=c.local_ttl,
            size=c.lead_size,
            enabled=c.enabled,
            metrics=self.metrics,
        )
        self.knowledge: TwoTierCache[list[KbEntry]] = TwoTierCache(
            "knowledge",
            self.redis,
            list[KbEntry],
            ttl=c.kb_ttl,
            local_ttl=c.local_ttl,
            size=c.kb_size,
            enabled=c.enabled,
            metrics=self.metrics,
        )
        intake_store = Store(self.intake_pool, p)
        self.identities = Identities(intake_store, c.lead_size, self._leads_changed)
        self.intake = IngestBatcher(intake_store, self.buffer, p, self._lead_written, self.identities)
        self.uncertain: UncertainSends | None = None
        if cfg.evolution.base_url:
            self._sender = EvolutionClient(cfg)
            self.uncertain = UncertainSends(cfg, self._sender, self.store, self.metrics)
        self.agent = make_agent(cfg)
        media_cache: TwoTierCache[dict[str, Any]] = TwoTierCache(
            "media",
            self.redis,
            dict[str, Any],
            ttl=p.media.result_ttl,
            local_ttl=c.local_ttl,
            size=p.media.result_size,
            enabled=c.enabled,
            metrics=self.metrics,
        )
        self.media = MediaProcessor(cfg, self._sender, media_cache, self.metrics)
        self.planner = Planner(cfg.followups)
        self.followup_store = FollowUpStore(self.pool, p.timeouts.database)
        self.runner = TurnRunner(
            store=self.store,
            locks=locks,
            agent=self.agent,
            sender=self._sender,
            metrics=self.metrics,
            profile=p,
            leads=self.leads,
            knowledge=self.knowledge,
            media=self.media,
            after_turn=self._plan_follow_ups,
            on_send_failed=self._send_failed,
            buffer=self.buffer,
        )
        self.followups = FollowUpExecutor(
            cfg,
            self.followup_store,
            locks,
            self._sender,
            self.metrics,
            on_handoff=self._hand_back,
            settle=self._settle,
            unreachable=self.store.mark_unreachable,
        )
        self.jobs = self._schedule()
        # Bursts a previous run accepted but never answered are answered now.
        # Only those without a buffer entry: with several daemons, a burst still being
        # written has one (another daemon's intake armed it), and flushing it now would
        # split it in two turns.
        recovered = await self.store.unanswered()
        for phone, message_id in recovered:
            await self.buffer.add_if_absent(member(phone, message_id, p.buffer.coalesce), 0)
        if recovered:
            log.info("re-queued %d unanswered message(s)", len(recovered))
        invalidations = CacheInvalidations(self.redis, [self.leads, self.knowledge], retry_delay=p.timeouts.redis)
        self._background = [
            asyncio.create_task(self._flush_loop(), name="buffer-flush"),
            asyncio.create_task(invalidations.run(), name="cache-invalidations"),
        ]
        self.jobs.start()
        self.accepting = True

    async def _check_schema(self) -> None:
        # Over the direct connection: migrations hold a session advisory lock, which a
        # transaction pooler would not keep.
        ep = self.endpoints
        conn = await asyncpg.connect(
            ep.direct_url, timeout=self.config.profile.timeouts.database, **pg_options(ep.direct_pooled)
        )
        try:
            if self.auto_migrate:
                applied = await migrations.migrate(conn)
                for m in applied:
                    log.info("applied migration %04d_%s", m.version, m.name)
                return
            waiting = await migrations.pending(conn)
        finally:
            await conn.close()
        if waiting:
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in waiting)
            raise MigrationError(f"{len(waiting)} migration(s) pending ({names}); run `sdrctl migrate` first")

    async def stop(self) -> None:
        """Stop intake, drain turns within the grace period, cancel the rest, close pools."""
        p = self.config.profile
        # 1. Stop taking work: the webhook answers 503, the flush loop ends after its
        #    current claim. (A flag, not only a cancel: a library that swallows one
        #    CancelledError must not keep the loop alive.)
        self.accepting = False
        self._stopping = True
        flusher, *others = self._background or [None]
        if flusher is not None:
            done, _ = await asyncio.wait({flusher}, timeout=p.buffer.poll_interval + p.timeouts.redis)
            if not done:
                await cancel_and_wait(flusher, p.timeouts.redis, "shutdown")
        for task in others:
            await cancel_and_wait(task, p.timeouts.redis, "shutdown")
        await self.jobs.stop()  # scheduled jobs: no new runs; running ones cancelled
        # 2. Let in-flight turns finish within the grace period; cancel the rest (their
        #    messages stay unanswered in Postgres and are answered on the next start).
        if self._tasks:
            grace = p.timeouts.shutdown_grace
            log.info("waiting up to %.1fs for %d turn(s) in flight", grace, len(self._tasks))
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                await cancel_and_wait(task, p.timeouts.database, "shutdown grace period over")
            if late:
                log.warning("cancelled %d turn(s); their messages are answered on next start", len(late))
        await self.intake.close()
        await self.runner.locks.close(p.timeouts.redis)
        await self.runner.close()
        await self.buffer.close()
        # 3. Close clients and pools.
        if self._sender is not None:
            await self._sender.close()
        await self.agent.close()
        await self.media.close()
        if self.crm is not None:
            await self.crm.close()
        await self._close_pools()

    async def _close_pools(self) -> None:
        await self.redis.aclose()
        await self.pool.close()
        await self.intake_pool.close()

    # --- work -----------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def _flush_loop(self) -> None:
        p = self.config.profile
        interval = p.buffer.poll_interval
        failures, logged_at = 0, -math.inf
        while not self._stopping:
            try:
                due = await self.buffer.claim_due()
            except OUTAGE as exc:
                # One line per error_log_interval while it lasts, not one per poll.
                failures += 1
                if time.monotonic() - logged_at >= p.limits.error_log_interval:
                    logged_at = time.monotonic()
                    log.warning(
                        "cannot claim due bursts (%d failed polls): %s: %s", failures, exc.__class__.__name__, exc
                    )
                due = []
            else:
                if failures:
                    log.info("claiming due bursts again after %d failed polls", failures)
                    failures, logged_at = 0, -math.inf
            for value in due:
                self._spawn(self._answer(value), name=f"turn:{value[-4:]}")
            if len(due) < self.buffer.claim_batch:
                await asyncio.sleep(interval)

    def _schedule(self) -> Jobs:
        cfg, p = self.config, self.config.profile
        f = p.followups
        jobs = Jobs(self.metrics)
        if cfg.followups.enabled:
            jobs.every("followups", f.poll_interval, self.followups.run_due)
        jobs.every(
            "knowledge-refresh", f.kb_refresh_interval, KnowledgeRefresh(self.pool, self.knowledge.invalidate_all)
        )
        jobs.every("unanswered-sweep", p.buffer.sweep_interval, self._sweep)
        if self._sender is not None:
            jobs.every("outbox-redelivery", p.limits.redeliver_interval, self._redeliver)
        self.crm: CrmPush | None = None
        if cfg.followups.crm_url:
            self.crm = CrmPush(
                self.pool,
                cfg.followups.crm_url,
                batch=f.crm_batch,
                concurrency=f.crm_concurrency,
                attempts=f.crm_attempts,
                timeout=f.crm_timeout,
                backoff=f.crm_backoff,
            )
            jobs.every("crm-push", f.crm_interval, self.crm)
        return jobs

    async def _sweep(self) -> None:
        """The safety net behind the buffer: a message still unanswered after longer than a
        whole turn can take (window cap, agent, sends) lost its buffer entry somewhere (a
        Redis restart without persistence, a crash between steps); re-queue its lead."""
        p = self.config.profile
        t = p.timeouts
        # (A reply held for a typing lead, up to reply_hold, is not counted: re-queueing a
        # lead whose turn is running only leaves the hand-off flag for it.)
        age = (
            t.message_buffer
            + p.buffer.settle_window
            + t.redis_lock_ttl
            + t.agent
            + t.evolution_send * p.limits.send_attempts
        )
        stale = await self.store.stale_unanswered(age)
        for phone, message_id in stale:
            await self.buffer.add_if_absent(member(phone, message_id, p.buffer.coalesce), 0)
        if stale:
            log.warning("re-queued %d message(s) left unanswered past %.0fs", len(stale), age)

    async def _redeliver(self) -> None:
        """Replies that did not go out are sent again, in order, under each lead's lock
        (never interleaved with a live turn's replies). One that may have arrived (its send
        timed out, or its daemon died mid-send) is looked up first (daemon.outbox)."""
        p = self.config.profile
        assert self._sender is not None and self.uncertain is not None
        stale = p.timeouts.evolution_send * p.limits.send_attempts + p.timeouts.redis_lock_ttl
        rows = await self.store.undelivered(
            stale, p.limits.redeliver_attempts, p.limits.redeliver_within, p.buffer.claim_batch
        )
        by_lead: dict[str, list[tuple[int, str, str, datetime, str | None]]] = {}
        for outbox_id, phone, body, status, created, lid in rows:
            by_lead.setdefault(phone, []).append((outbox_id, body, status, created, lid))
        for phone, replies in by_lead.items():
            async with self.runner.locks.held(phone, lambda phone=phone: self._hand_back(phone)) as got:
                if not got:
                    continue  # a live turn is sending: next pass
                for outbox_id, body, status, created, lid in replies:
                    if status in ("sending", "uncertain"):  # did it arrive after all?
                        outcome, provider_id = await self.uncertain.settle(phone, lid, body, created)
                        if outcome == "arrived":
                            await self.store.record_delivery([outbox_id], status="sent", provider_id=provider_id)
                            continue
                        if outcome == "skip":
                            await self.store.record_delivery(
                                [outbox_id], status="failed", error="uncertain send skipped (on_uncertain_send = skip)"
                            )
                            continue
                    if not await self.store.claim_redelivery(outbox_id, status):
                        continue  # another daemon's job got it first
                    try:
                        provider_id = await self._sender.send_text(phone, body)
                    except SendFailed as exc:
                        await self._send_failed(outbox_id, phone, exc)
                        self.metrics.sends.labels("redelivery_failed").inc()
                        break  # keep the lead's replies in order
                    await self.store.record_delivery([outbox_id], status="sent", provider_id=provider_id)
                    self.metrics.sends.labels("redelivered").inc()

    async def _settle(self, phone: str, text: str, since: datetime) -> tuple[str, str | None]:
        assert self.uncertain is not None
        return await self.uncertain.settle(phone, None, text, since)

    async def _send_failed(self, outbox_id: int, phone: str, exc: SendFailed) -> None:
        """A reply's send failed: final ones are marked failed (an unreachable number on
        the lead too); the rest wait for the re-delivery job."""
        self.metrics.send_errors.labels(exc.kind).inc()
        if exc.final:
            await self.store.record_delivery([outbox_id], status="failed", error=str(exc)[:500])
            if exc.kind == "unreachable":
                await self.store.mark_unreachable(phone)
        else:
            await self.store.postpone(
                outbox_id, str(exc), self.config.profile.limits.redeliver_backoff, uncertain=exc.uncertain
            )

    async def _plan_follow_ups(self, lead: dict[str, Any], replied_at: datetime, updates: dict[str, Any]) -> None:
        """After a turn: the lead's next follow-ups replace its pending silence ones."""
        planned = self.planner.after_turn(lead, replied_at, meeting_changed="meeting_at" in updates)
        await self.followup_store.plan(int(lead["id"]), planned, replied_at, "the lead wrote again")

    async def _hand_back(self, phone: str) -> None:
        """Messages arrived while a follow-up held the lead: answer them now."""
        await self.buffer.add(phone, window=0)

    async def _answer(self, value: str) -> None:
        phone, only = parse_member(value)
        start = time.perf_counter()

        async def handoff() -> None:  # messages came in during our turn: answer them now
            await self.buffer.add(phone, window=0)

        try:
            done = await self.runner.run(phone, only, handoff)
        except Exception as exc:
            # Nothing is lost: a turn commits all it writes in one statement, so its
            # messages are still unanswered in Postgres. Try again after a window.
            log.warning(
                "turn failed (%s: %s); re-queued",
                exc.__class__.__name__,
                exc,
                exc_info=not isinstance(exc, (*OUTAGE, StageFailed)),
            )
            try:
                await self.buffer.add(value)
            except OUTAGE:  # Redis is down too: the next start re-queues it from Postgres
                log.warning("could not re-queue a failed turn; it is answered on next start")
            return
        if done is False:
            # The holder hands the lead back when it is done; this only covers a holder
            # that dies first (its lock expires within the TTL).
            await self.buffer.add_if_absent(value, self.config.profile.timeouts.redis_lock_ttl)
            return
        if done and not self.config.profile.buffer.coalesce and only is None:
            await self.buffer.add(value, window=0)  # recovered lead: its next message
        if done:
            log.info("%6.3fs turn done for ...%s", time.perf_counter() - start, phone[-4:])

    async def ingest(self, msg: Inbound) -> str:
        """Stores a lead message and arms its buffer; returns 'stored' or 'duplicate'."""
        return await self.intake.ingest(msg)

    async def _lead_written(self, phone: str, lead: dict[str, Any]) -> None:
        """The intake created or changed a lead: write the cache through, drop copies elsewhere."""
        await self.leads.invalidate(phone)
        await self.leads.set(phone, lead)

    async def _leads_changed(self, identities: list[str]) -> None:
        """Leads renamed or merged when their LID met their phone: cached copies are stale."""
        for identity in identities:
            await self.leads.invalidate(identity)

    def _presence_aware(self) -> bool:
        b = self.config.profile.buffer
        return b.coalesce and (b.adaptive or b.speculate)

    async def typing(self, event: Typing) -> str:
        """The lead's presence. "composing" holds its pending burst (and a finished reply)
        while it types, for typing_ttl unless refreshed; "paused" lets them go. Returns
        "extended" or "paused" for a pending burst, "idle" without one, "ignored" when the
        profile does not use presence."""
        b = self.config.profile.buffer
        if not self._presence_aware():
            return "ignored"
        phone = await self.identities.of(event.phone, event.lid)
        left = await self.buffer.presence(phone, event.state)
        if left is None:
            return "idle"
        if event.state != "composing":
            return "paused"
        if b.adaptive:
            await self.buffer.extend(phone, b.extended_window)
        return "extended"

    async def edit(self, event: Edit) -> str:
        """A lead edited a message: in a burst still waiting, its text is replaced; already
        answered, the new text is a message of its own, answered by a turn of its own."""
        found = await self.intake.store.apply_edit(event.provider_id, event.text, event.edit_id)
        if found is None:
            return "unknown"
        outcome, phone, message_id = found
        if outcome == "correction":
            b = self.config.profile.buffer
            await self.buffer.add(member(phone, message_id, b.coalesce), window_for("text", event.text, b))
        return outcome

    async def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        timeout = self.config.profile.timeouts.redis
        # Redis can answer PING and still refuse the buffer's keys (a cluster's MOVED to a
        # plain client, a read-only replica): the buffer is probed on its own key.
        probes = (("database", self.store.ping), ("redis", self.redis.ping), ("buffer", self.buffer.pending))
        for name, probe in probes:
            try:
                async with asyncio.timeout(timeout):
                    await probe()
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"down: {exc.__class__.__name__}: {str(exc)[:120]}"
        return checks
