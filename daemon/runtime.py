"""The daemon's lifecycle in one place: start (pools, migrations, recovery, the buffer's
flush loop, jobs), the intake's entry point, and stop (stop intake, let in-flight turns
finish within the grace period, cancel the rest, close everything start opened). Every
task it starts is owned: turns in `_tasks`, loops and clients on the exit stack."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import asyncpg

from daemon import logs, migrations, telemetry
from daemon.agents import Agent, make_agent
from daemon.agents.tools import ToolRules
from daemon.buffer import MessageBuffer, member, parse_member, window_for
from daemon.cache import CacheInvalidations, TwoTierCache
from daemon.config import Config
from daemon.connections import DRIVER_ERRORS, OUTAGE, Redis, pg_options, redis_client
from daemon.embedded import Endpoints
from daemon.errors import MigrationError, SdrError, StageFailed, UnavailableError
from daemon.evolution import Edit, EvolutionClient, Typing
from daemon.followups.executor import FollowUpExecutor
from daemon.followups.jobs import CrmPush, Jobs, KnowledgeRefresh
from daemon.followups.planner import Planner
from daemon.followups.store import FollowUpStore
from daemon.handover import Notifier
from daemon.identity import Identities
from daemon.intake import IngestBatcher
from daemon.knowledge.embeddings import ensure_embeddings, make_embedder
from daemon.knowledge.search import KnowledgeSearch
from daemon.knowledge.sync import import_shipped
from daemon.locks import LeadLocks
from daemon.media.processor import MediaProcessor
from daemon.metrics import Metrics
from daemon.models import Inbound, KbEntry, Takeover
from daemon.outbox import Outbox
from daemon.store import Store, connect
from daemon.streaming import StreamRows
from daemon.tasks import cancel_and_wait
from daemon.turn import TurnRunner

log = logging.getLogger("sdr.runtime")
T = TypeVar("T")


async def _step(failure: str, work: Awaitable[T]) -> T:
    """One step of start(): an outage becomes one line that says which step failed."""
    try:
        return await work
    except SdrError:
        raise
    except (*OUTAGE, *DRIVER_ERRORS) as exc:
        raise UnavailableError(f"{failure}: {exc.__class__.__name__}: {exc}") from None


class Runtime:
    """The daemon: `start()` opens everything on one exit stack (any step that fails closes
    what was opened and raises one clear SdrError), the front door (`ingest`, `typing`,
    `edit`, `takeover`, `readiness`), the buffer's flush loop that spawns turns, and `stop()`."""

    # Built by start(), in this order, each closed by stop() in the reverse order.
    pool: asyncpg.Pool  # the turns', jobs' and follow-ups' PostgreSQL connections
    intake_pool: asyncpg.Pool  # the intake's own: a webhook never waits behind a turn
    redis: Redis
    store: Store
    buffer: MessageBuffer
    locks: LeadLocks
    leads: TwoTierCache[dict[str, Any]]
    knowledge: TwoTierCache[list[KbEntry]]
    identities: Identities
    intake: IngestBatcher
    outbox: Outbox  # local without an Evolution API: replies stay in the table
    agent: Agent
    media: MediaProcessor
    followup_store: FollowUpStore
    notifier: Notifier  # hand-off notices to [handover] notify_url, in the background
    runner: TurnRunner
    followups: FollowUpExecutor
    jobs: Jobs

    def __init__(self, config: Config, endpoints: Endpoints, *, auto_migrate: bool) -> None:
        self.config = config
        self.endpoints = endpoints
        self.auto_migrate = auto_migrate
        self.metrics = Metrics()
        self.accepting = False
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()  # turns in flight
        self._stack = AsyncExitStack()  # what start() opened, closed by stop()
        self._flusher: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Opens and starts everything, or nothing: a step that fails closes what the
        steps before it opened, and raises one SdrError that names the step."""
        try:
            await self._open(self._stack)
        except BaseException as exc:
            await self._stack.aclose()
            if isinstance(exc, SdrError) or not isinstance(exc, (*OUTAGE, *DRIVER_ERRORS)):
                raise
            raise UnavailableError(f"the daemon could not start: {exc.__class__.__name__}: {exc}") from None
        self.accepting = True

    async def _open(self, stack: AsyncExitStack) -> None:
        cfg, p = self.config, self.config.profile
        ep = self.endpoints
        # Traces ([telemetry] otlp_endpoint): closed last, once every turn's spans ended.
        if (traces := telemetry.setup(cfg)) is not None:
            stack.push_async_callback(traces.shutdown)
        self.pool = await _step("PostgreSQL is unreachable", connect(ep.database_url, p, pooled=ep.pooled))
        stack.push_async_callback(self.pool.close)
        size = p.pools.ingest_flushes
        self.intake_pool = await _step(
            "PostgreSQL is unreachable", connect(ep.database_url, p, size=size, pooled=ep.pooled)
        )
        stack.push_async_callback(self.intake_pool.close)
        self.redis = redis_client(ep.redis_url, ep.redis_cluster, cfg)
        stack.push_async_callback(self.redis.aclose)
        await _step("Redis is unreachable", self.redis.ping())
        await _step("PostgreSQL failed while checking the schema", self._check_schema())
        # The shipped knowledge base, on a new database's first start (the files in knowledge/).
        await _step("cannot import the shipped knowledge base", import_shipped(self.pool, self.redis))

        self.store = Store(self.pool, p)
        b, c = p.buffer, p.cache
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
        stack.push_async_callback(self.buffer.close)
        self.locks = LeadLocks(
            self.redis, p.timeouts.redis_lock_ttl, p.limits.lock_attempts, p.limits.lock_backoff, self.buffer
        )
        stack.push_async_callback(self.locks.close, p.timeouts.redis)
        self.leads = self._cache("lead", dict[str, Any], c.lead_ttl, c.lead_size)
        self.knowledge = self._cache("knowledge", list[KbEntry], c.kb_ttl, c.kb_size)
        self.embedder = make_embedder(cfg)
        if self.embedder is not None:
            stack.push_async_callback(self.embedder.close)
        self.kb_search = KnowledgeSearch(
            self.pool,
            embedder=self.embedder,
            vectors=self._cache("embeddings", list[float], c.embedding_ttl, c.embedding_size),
            candidates=cfg.knowledge.candidates,
            rrf_k=cfg.knowledge.rrf_k,
            embeddings_timeout=min(p.timeouts.embeddings, p.timeouts.knowledge_base),
            timeout=p.timeouts.database,
            on_degraded=lambda why: self.metrics.kb_degraded.inc(),
        )
        intake_store = Store(self.intake_pool, p)
        self.identities = Identities(intake_store, c.lead_size, self.leads)
        self.intake = IngestBatcher(intake_store, self.buffer, p, self.leads, self.identities)
        stack.push_async_callback(self.intake.close)
        sender = EvolutionClient(cfg) if cfg.evolution.base_url else None
        if sender is not None:
            stack.push_async_callback(sender.close)
        self.outbox = Outbox(cfg, self.pool, sender, self.locks, self.metrics)
        self.agent = make_agent(cfg)
        stack.push_async_callback(self.agent.close)
        media_cache = self._cache("media", dict[str, Any], p.media.result_ttl, p.media.result_size)
        self.media = MediaProcessor(cfg, sender, media_cache, self.metrics)
        stack.push_async_callback(self.media.close)
        self.followup_store = FollowUpStore(self.pool, p.timeouts.database)
        self.notifier = Notifier(cfg.handover.notify_url, p.handover, self.metrics)
        stack.push_async_callback(self.notifier.close)
        self._own(stack, self.notifier.run(), "handover-notices")
        self.runner = TurnRunner(
            store=self.store,
            locks=self.locks,
            agent=self.agent,
            outbox=self.outbox,
            metrics=self.metrics,
            profile=p,
            leads=self.leads,
            knowledge=self.knowledge,
            media=self.media,
            planner=Planner(cfg.followups),
            followup_store=self.followup_store,
            buffer=self.buffer,
            handover=cfg.handover,
            notifier=self.notifier,
            prices=(cfg.agent.price_in, cfg.agent.price_out),
            tools=ToolRules.from_settings(cfg.followups),
            stream_rows=StreamRows(self.pool, p.timeouts.database),
            kb_search=self.kb_search,
        )
        stack.push_async_callback(self.runner.close)
        self.followups = FollowUpExecutor(
            cfg,
            self.followup_store,
            self.outbox,
            self.locks,
            self.metrics,
        )
        self.jobs = self._schedule(stack)

        # Bursts a previous run accepted but never answered are answered now.
        await _step("cannot re-queue unanswered messages", self._requeue_unanswered())
        invalidations = CacheInvalidations(self.redis, [self.leads, self.knowledge], retry_delay=p.timeouts.redis)
        self._own(stack, invalidations.run(), "cache-invalidations")
        if self.embedder is not None:  # in the background: full-text answers meanwhile
            self._own(stack, self._embed_at_start(), "kb-embeddings")
        self._flusher = self._own(stack, self._flush_loop(), "buffer-flush")
        self.jobs.start()
        stack.push_async_callback(self.jobs.stop)

    async def _embed_entries(self) -> int:
        """Vectors for entries that have none for the model (none without an endpoint): at
        start and whenever the knowledge base changed (the refresh job)."""
        if self.embedder is None:
            return 0
        return await ensure_embeddings(self.pool, self.embedder)

    async def _embed_at_start(self) -> None:
        try:
            await self._embed_entries()
        except Exception as exc:  # the refresh job tries again; search stays full-text meanwhile
            log.warning("could not embed the knowledge base: %s: %s", type(exc).__name__, exc)

    async def _requeue_unanswered(self) -> None:
        """Re-arms every unanswered message (at start, and when Redis is back after an
        outage that may have lost buffer entries: without this their leads waited for the
        sweep, longer than a lead waits). Only those without a buffer entry: with several
        daemons, a burst still being written has one, and flushing it now would split it."""
        coalesce = self.config.profile.buffer.coalesce
        recovered = await self.store.unanswered()
        for phone, message_id in recovered:
            await self.buffer.add_if_absent(member(phone, message_id, coalesce), 0)
        if recovered:
            log.info("re-queued %d unanswered message(s)", len(recovered))

    async def _requeue_after_outage(self) -> None:
        try:
            await self._requeue_unanswered()
        except Exception as exc:  # the sweep does it later
            log.warning("could not re-queue unanswered messages after the outage: %s: %s", type(exc).__name__, exc)

    def _cache(self, name: str, kind: Any, ttl: float, size: int) -> TwoTierCache[Any]:
        c = self.config.profile.cache
        return TwoTierCache(
            name, self.redis, kind, ttl=ttl, local_ttl=c.local_ttl, size=size, enabled=c.enabled, metrics=self.metrics
        )

    def _own(self, stack: AsyncExitStack, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A background task that lives as long as the runtime; cancelled at stop."""
        task = asyncio.create_task(coro, name=name)
        stack.push_async_callback(cancel_and_wait, task, self.config.profile.timeouts.redis, "shutdown")
        return task

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
        """Stop intake, drain turns within the grace period, cancel the rest, close."""
        p = self.config.profile
        # 1. Stop taking work: the webhook answers 503, the flush loop ends after its
        #    current claim. (A flag, not only a cancel: a library that swallows one
        #    CancelledError must not keep the loop alive.)
        self.accepting = False
        self._stopping = True
        if self._flusher is not None:
            self.buffer.wake()
            done, _ = await asyncio.wait({self._flusher}, timeout=p.buffer.poll_interval + p.timeouts.redis)
            if not done:
                await cancel_and_wait(self._flusher, p.timeouts.redis, "shutdown")
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
        # 3. Everything start() opened, in reverse: jobs, background loops, the turns'
        #    stragglers, clients, caches, pools.
        await self._stack.aclose()

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
                    self._spawn(self._requeue_after_outage(), name="requeue-unanswered")
            for value in due:
                self._spawn(self._answer(value), name=f"turn:{value[-4:]}")
            if len(due) < self.buffer.claim_batch:
                await self.buffer.sleep_until_due(interval, p.buffer.claim_idle)

    def _schedule(self, stack: AsyncExitStack) -> Jobs:
        cfg, p = self.config, self.config.profile
        f = p.followups
        jobs = Jobs(self.metrics)
        if cfg.followups.enabled:
            jobs.every("followups", f.poll_interval, self.followups.run_due)
        jobs.every(
            "knowledge-refresh",
            f.kb_refresh_interval,
            KnowledgeRefresh(self.pool, self.knowledge.invalidate_all, self._embed_entries),
        )
        jobs.every("unanswered-sweep", p.buffer.sweep_interval, self._sweep)
        if not self.outbox.local:
            jobs.every("outbox-redelivery", p.limits.redeliver_interval, self.outbox.redeliver)
        if cfg.followups.crm_url:
            crm = CrmPush(
                self.pool,
                cfg.followups.crm_url,
                batch=f.crm_batch,
                concurrency=f.crm_concurrency,
                attempts=f.crm_attempts,
                timeout=f.crm_timeout,
                backoff=f.crm_backoff,
            )
            stack.push_async_callback(crm.close)
            jobs.every("crm-push", f.crm_interval, crm)
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

    async def _answer(self, value: str) -> None:
        """One turn, claimed from the buffer: traced, the root of a trace of its own, and
        every line it logs carries the lead (and the turn's id once it is stored)."""
        phone, only = parse_member(value)
        lead = {"sdr.lead": logs.mask(phone)} if telemetry.enabled() else None  # masked in traces too
        with telemetry.root("turn", attributes=lead), logs.fields(lead=phone):
            await self._turn(value, phone, only)

    async def _turn(self, value: str, phone: str, only: int | None) -> None:
        start = time.perf_counter()
        try:
            done = await self.runner.run(phone, only)
        except Exception as exc:
            # Nothing is lost: a turn commits all it writes in one statement, so its
            # messages are still unanswered in Postgres. Try again after a window.
            log.warning(
                "turn failed (%s: %s); re-queued",
                exc.__class__.__name__,
                exc,
                exc_info=not isinstance(exc, (*OUTAGE, StageFailed)),
            )
            telemetry.failed(telemetry.current(), f"{exc.__class__.__name__}: {exc}")
            try:
                await self.buffer.add(value)
            except OUTAGE:  # Redis is down too: the next start re-queues it from Postgres
                log.warning("could not re-queue a failed turn; it is answered on next start")
            return
        telemetry.annotate(**{"sdr.turn.result": "answered" if done else "lead busy" if done is False else "no reply"})
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

    async def takeover(self, event: Takeover) -> str:
        """A person wrote to the lead from the business's number: the bot steps back for
        `[handover] pause` (a turn in flight does not send), unless it is our own send."""
        phone = await self.identities.of(event.phone, event.lid)
        outcome = await self.intake.store.take_over(phone, event, self.config.profile.handover.pause)
        if outcome == "takeover":
            self.metrics.handover.labels("takeover").inc()
            await self.leads.invalidate(phone)
            log.info("a person took over ...%s: the bot is paused for it", phone[-4:])
        return outcome

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

    async def _buffer_size(self) -> None:
        """The buffer's probe: its size is read at scrape time as sdr_active_leads."""
        self.metrics.active_leads.set(await self.buffer.pending())

    async def readiness(self) -> dict[str, str]:
        """/readyz's checks, each "ok" or why not; run side by side, so an outage costs one
        timeout, not three. Also sets sdr_dependency_up, which the alerts read."""
        timeout = self.config.profile.timeouts.redis
        # Redis can answer PING and still refuse the buffer's keys (a cluster's MOVED to a
        # plain client, a read-only replica): the buffer is probed on its own key.
        probes: dict[str, Callable[[], Awaitable[object]]] = {
            "database": self.store.ping,
            "redis": self.redis.ping,
            "buffer": self._buffer_size,
        }

        async def check(name: str, probe: Callable[[], Awaitable[object]]) -> str:
            try:
                async with asyncio.timeout(timeout):
                    await probe()
            except Exception as exc:
                self.metrics.dependency_up.labels(name).set(0)
                return f"down: {exc.__class__.__name__}: {str(exc)[:120]}"
            self.metrics.dependency_up.labels(name).set(1)
            return "ok"

        answers = await asyncio.gather(*(check(n, p) for n, p in probes.items()))
        return dict(zip(probes, answers, strict=True))
