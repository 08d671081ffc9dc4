"""The outbox: every message that leaves (replies, follow-ups), its statuses, its SQL, and
the one way a row is sent, used by turns, re-delivery and follow-ups alike.

A row is written before its send is tried (with its turn, or by the follow-up that
claims it), every try is on record before it starts, and a failure is filed by what a
later try can do (`SendFailed.kind`): final ones fail, the rest wait for re-delivery.

A send that timed out after its request was written, lost its connection or got a 5xx
may have been delivered (Evolution holds sendText until WhatsApp took the message). Such a
reply is 'uncertain', not failed: before a re-send, Evolution's history is searched
(findMessages, a bounded look-back) when the instance keeps one; when it keeps none, or
cannot be asked, `[evolution] on_uncertain_send` decides (README: Uncertain sends)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from enum import StrEnum

import asyncpg
import httpx

from daemon import unguarded
from daemon.config import Config, Profile
from daemon.connections import pg_boundary
from daemon.errors import LeaseLapsed, SendFailed, StageFailed
from daemon.evolution import EvolutionClient
from daemon.identity import jid
from daemon.locks import LeadLocks, Lease
from daemon.metrics import Metrics
from daemon.stages import StageClock

log = logging.getLogger("sdr.outbox")


class Status(StrEnum):
    """An outbox row's status (the `outbox.status` column)."""

    PENDING = "pending"  # written with its turn, not tried yet
    SENDING = "sending"  # a try started; a daemon that died mid-send leaves it so
    SENT = "sent"
    UNDELIVERED = "undelivered"  # certainly not delivered, a later try can fix it: re-delivered
    UNCERTAIN = "uncertain"  # may have arrived: looked up before any re-send
    FAILED = "failed"  # final: no try can deliver it (or we gave up)
    LOCAL = "local"  # no Evolution API configured: kept for `sdrctl chat`
    SUPPRESSED = "suppressed"  # not sent: a person took over the lead (or it was ignored) first


OPEN = (Status.PENDING, Status.SENDING, Status.UNDELIVERED, Status.UNCERTAIN)  # may still go out
RETRIED = (Status.UNDELIVERED, Status.SENDING, Status.UNCERTAIN)  # what re-delivery looks at

# A lock holder's fencing token becomes the lead's newest, unless a newer one got there
# first (its lock lapsed before it began): NULL no such lead, false fenced out.
TAKE_FENCE = "UPDATE leads SET fence = greatest(fence, $2) WHERE phone_number = $1 RETURNING fence = $2"

# Statuses as literals, so the planner can use the partial index of sql/0008 (a parameter
# would not prove its predicate in a generic plan): a count of the few open rows, not a scan.
BACKLOG = f"""SELECT count(*) AS n, extract(epoch FROM clock_timestamp() - min(created_at)) AS age
                FROM outbox
               WHERE status IN ('{Status.UNDELIVERED}', '{Status.UNCERTAIN}')
                  OR (status = '{Status.SENDING}' AND created_at < clock_timestamp() - make_interval(secs => $1))"""


@pg_boundary
class OutboxStore:
    """The outbox's SQL. (A turn's rows are written by the turn's one statement, in
    daemon.store's FINISH_TURN; a follow-up's row with its message, here.)"""

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    async def open_follow_up(
        self, follow_up_id: int, lead_id: int, phone: str, text: str, now: datetime, fence: int | None, *, local: bool
    ) -> int | None:
        """A follow-up's row (and the conversation's message) before its send is tried,
        so a daemon dying mid-send leaves a trace, never a second message. Nothing (None)
        unless `fence` is the lead's newest token (None: unguarded, tests only)."""
        status = Status.LOCAL if local else Status.SENDING
        value = await self.pool.fetchval(
            """WITH fenced AS (
                   SELECT id FROM leads WHERE id = $1 AND ($9::bigint IS NULL OR fence = $9) FOR UPDATE
               ), msg AS (
                   INSERT INTO messages (conversation_id, lead_id, direction, body, provider_ts)
                   SELECT c.id, $1, 'out', $3, $5 FROM conversations c, fenced
                    WHERE c.lead_id = $1 AND c.status = 'open')
               INSERT INTO outbox (lead_id, phone_number, body, status, attempts, follow_up_id, sent_at)
               SELECT $1, $2, $3, $4, $7, $6, CASE WHEN $4 = $8 THEN $5 END FROM fenced
               RETURNING id""",
            lead_id,
            phone,
            text,
            status,
            now,
            follow_up_id,
            0 if local else 1,
            Status.LOCAL,
            fence,
            timeout=self.timeout,
        )
        return None if value is None else int(value)

    async def silenced(self, phone: str) -> bool:
        """Whether the bot must not send to the lead now: a person took it over (or an
        operator paused it), or it is ignored. Read right before a reply's first part. (A
        hand-off's pause is the reply's own: it says a consultant will answer.)"""
        return bool(
            await self.pool.fetchval(
                """SELECT coalesce(paused_until > clock_timestamp() AND paused_by <> 'handoff', false) OR ignored
                     FROM leads WHERE phone_number = $1""",
                phone,
                timeout=self.timeout,
            )
        )

    async def suppress(self, outbox_ids: list[int]) -> None:
        """A reply that will not go (the lead was paused before it did), recorded as such."""
        await self.pool.execute(
            """WITH gone AS (
                   UPDATE outbox SET status = $2, last_error = 'a person took over the lead before it went'
                    WHERE id = ANY($1::bigint[]) RETURNING lead_id)
               INSERT INTO lead_events (lead_id, kind, actor) SELECT DISTINCT lead_id, 'suppressed', 'bot' FROM gone""",
            outbox_ids,
            Status.SUPPRESSED,
            timeout=self.timeout,
        )

    async def take_fence(self, phone: str, fence: int) -> bool:
        """Makes `fence` the lead's newest token; False when a newer one holds the lead."""
        return bool(await self.pool.fetchval(TAKE_FENCE, phone, fence, timeout=self.timeout))

    async def record_attempt(self, outbox_id: int) -> None:
        """Written before each try, so a crash mid-send leaves a trace, not a guess."""
        await self.pool.execute(
            "UPDATE outbox SET status = $2, attempts = attempts + 1 WHERE id = $1",
            outbox_id,
            Status.SENDING,
            timeout=self.timeout,
        )

    async def delivered(
        self,
        outbox_ids: list[int],
        status: Status,
        *,
        provider_id: str | None = None,
        error: str | None = None,
        turn_id: int | None = None,
        response_ms: float | None = None,
    ) -> None:
        """Marks rows sent or failed; with `turn_id`, also the turn's response time (the
        lead's first reply), in the same round trip."""
        await self.pool.execute(
            """WITH sent AS (
                   UPDATE outbox SET status = $2, provider_id = $3, last_error = $4,
                          sent_at = CASE WHEN $2 = $7 THEN clock_timestamp() END
                    WHERE id = ANY($1::bigint[]))
               UPDATE turns SET response_ms = $6 WHERE id = $5""",
            outbox_ids,
            status,
            provider_id,
            error[:500] if error else error,
            turn_id,
            response_ms,
            Status.SENT,
            timeout=self.timeout,
        )

    async def postpone(self, outbox_id: int, error: str, backoff: float, *, uncertain: bool = False) -> None:
        """Undelivered again ('uncertain' when it may have arrived: looked up before a
        re-send): the next try waits backoff * 2^(attempts-1), at most an hour."""
        await self.pool.execute(
            """UPDATE outbox SET status = $4, last_error = $2,
                      retry_at = clock_timestamp() + make_interval(secs => least(3600, $3 * 2 ^ greatest(attempts - 1, 0)))
                WHERE id = $1""",
            outbox_id,
            error[:500],
            backoff,
            Status.UNCERTAIN if uncertain else Status.UNDELIVERED,
            timeout=self.timeout,
        )

    async def undelivered(
        self, stale_after: float, max_attempts: int, within: float, limit: int
    ) -> list[tuple[int, str, str, Status, datetime, str | None]]:
        """(outbox id, identity, body, status, created, lid) of rows to send again, oldest
        first: those whose send failed in a way a later try can fix ('undelivered'), may
        have arrived ('uncertain'), or were left 'sending' by a daemon that died (older
        than any send can take). Gives up on the ones out of attempts or past `within`
        seconds (a reply that late no longer answers anything)."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                """UPDATE outbox SET status = $4, last_error = coalesce(last_error, '') || ' (gave up)'
                    WHERE status = ANY($5::text[])
                      AND (attempts >= $1 OR created_at < clock_timestamp() - make_interval(secs => $3))
                      AND (status <> $6 OR created_at < clock_timestamp() - make_interval(secs => $2))""",
                max_attempts,
                stale_after,
                within,
                Status.FAILED,
                list(RETRIED),
                Status.SENDING,
                timeout=self.timeout,
            )
            rows = await conn.fetch(
                """SELECT o.id, o.phone_number, o.body, o.status, o.created_at, l.lid FROM outbox o
                     JOIN leads l ON l.id = o.lead_id
                    WHERE ((o.status IN ($4, $5) AND (o.retry_at IS NULL OR o.retry_at <= clock_timestamp()))
                           OR (o.status = $6 AND o.created_at < clock_timestamp() - make_interval(secs => $1)))
                      AND o.attempts < $2
                    ORDER BY o.id LIMIT $3""",
                stale_after,
                max_attempts,
                limit,
                Status.UNDELIVERED,
                Status.UNCERTAIN,
                Status.SENDING,
                timeout=self.timeout,
            )
        return [(r["id"], r["phone_number"], r["body"], Status(r["status"]), r["created_at"], r["lid"]) for r in rows]

    async def backlog(self, stale_after: float) -> tuple[int, float]:
        """(rows waiting for re-delivery, seconds the oldest has waited): what `undelivered`
        would pick up, attempts and back-off aside."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(BACKLOG, stale_after, timeout=self.timeout)
        assert row is not None
        return row["n"], float(row["age"] or 0.0)

    async def claim_redelivery(self, outbox_id: int, status: Status) -> bool:
        """Takes one row for a re-send if it is still in `status` (another daemon's job
        may have sent it since it was listed); counts the attempt."""
        return bool(
            await self.pool.fetchval(
                "UPDATE outbox SET status = $3, attempts = attempts + 1 WHERE id = $1 AND status = $2 RETURNING true",
                outbox_id,
                status,
                Status.SENDING,
                timeout=self.timeout,
            )
        )

    async def last_sent(self) -> tuple[str, str] | None:
        """(identity, provider id) of the newest reply Evolution accepted: what asking its
        history about tells whether it keeps one."""
        row = await self.pool.fetchrow(
            """SELECT phone_number, provider_id FROM outbox
                WHERE status = $1 AND provider_id IS NOT NULL ORDER BY id DESC LIMIT 1""",
            Status.SENT,
            timeout=self.timeout,
        )
        return (row["phone_number"], row["provider_id"]) if row else None

    async def mark_unreachable(self, phone: str) -> None:
        """Evolution says the number is not on WhatsApp: no reply can reach it."""
        await self.pool.execute(
            "UPDATE leads SET unreachable_at = now(), updated_at = now() WHERE phone_number = $1 AND unreachable_at IS NULL",
            phone,
            timeout=self.timeout,
        )


class Outbox:
    """Sends rows of the outbox: the one path for turns, re-delivery and follow-ups."""

    def __init__(
        self, config: Config, pool: asyncpg.Pool, sender: EvolutionClient | None, locks: LeadLocks, metrics: Metrics
    ) -> None:
        p: Profile = config.profile
        self.limits, self.timeouts = p.limits, p.timeouts
        self.batch = p.buffer.claim_batch  # rows re-delivered per pass
        self.rows = OutboxStore(pool, p.timeouts.database)
        self.sender = sender
        self.locks = locks
        self.metrics = metrics
        self.uncertain = UncertainSends(config, sender, self.rows, metrics) if sender is not None else None

    @property
    def local(self) -> bool:
        """No Evolution API configured: rows are kept for `sdrctl chat`, never sent."""
        return self.sender is None

    async def attempt(
        self, outbox_id: int, phone: str, text: str, *, each_try: bool = False, lease: Lease | None = None
    ) -> str | None:
        """Sends one row (the client retries what certainly did not arrive). The first try
        is on record already (the row was opened or claimed as 'sending'); with
        `each_try`, so is every retry (a turn's reply: its attempts are its tries), else a
        pass of re-delivery or a follow-up counts as one attempt. Returns the provider's
        id; raises SendFailed, counted by kind, or LeaseLapsed when `lease` (the lead's
        lock it is sent under) lapsed before a try: checked right before each one."""
        assert self.sender is not None
        tries = 0

        async def before_attempt() -> None:
            nonlocal tries
            tries += 1
            if lease is not None and lease.lapsed and not unguarded.off("fence"):
                self.metrics.fenced.labels("lapsed").inc()
                raise LeaseLapsed(f"the lock of ...{phone[-4:]} lapsed before try {tries} of a send")
            if each_try and tries > 1:
                await self.rows.record_attempt(outbox_id)

        try:
            return await self.sender.send_text(phone, text, before_attempt)
        except SendFailed as exc:
            self.metrics.send_errors.labels(exc.kind).inc()
            raise

    async def file_failure(self, outbox_id: int, phone: str, exc: SendFailed) -> None:
        """A row's send failed: a final failure fails it (and marks an unreachable number
        on the lead); any other waits for re-delivery."""
        if exc.final:
            await self.rows.delivered([outbox_id], Status.FAILED, error=str(exc))
            if exc.kind == "unreachable":
                await self.rows.mark_unreachable(phone)
        else:
            await self.rows.postpone(outbox_id, str(exc), self.limits.redeliver_backoff, uncertain=exc.uncertain)

    async def send_reply(
        self,
        phone: str,
        parts: list[tuple[int, str]],
        turn_id: int,
        since: datetime,
        clock: StageClock,
        lease: Lease | None = None,
        *,
        opening: bool = True,
    ) -> bool:
        """A turn's reply, its parts in order (the first row was marked 'sending' with the
        turn; with `opening` False, these parts follow ones sent before: a streamed reply).
        True when all went out. A part that fails stops the rest: they go with it, failed or postponed.
        Each part goes only while the turn's `lease` holds: past it, the re-delivery job
        (under the lock of whoever holds the lead then) sends what is left, so a paused
        process that wakes up does not send a part that job already sent."""
        # A person who wrote to the lead meanwhile has it now: the reply never goes.
        if await self.rows.silenced(phone):
            await self.rows.suppress([outbox_id for outbox_id, _ in parts])
            self.metrics.handover.labels("suppressed").inc()
            log.info("reply to ...%s not sent: a person took over the lead", phone[-4:])
            return False
        for i, (outbox_id, text) in enumerate(parts):
            first = i == 0 and opening
            try:  # the client has its own timeouts, per attempt
                provider_id = await self._part(outbox_id, phone, text, first=first, clock=clock, lease=lease)
            except LeaseLapsed:
                # This part may have had a try before (looked up before any re-send); the
                # ones after it certainly did not.
                await self.rows.postpone(outbox_id, "the turn's lock lapsed before its send", 0, uncertain=True)
                for later, _ in parts[i + 1 :]:
                    await self.rows.postpone(later, "the turn's lock lapsed before its send", 0)
                log.warning("a reply to ...%s left to re-delivery: its turn's lock lapsed", phone[-4:])
                return False
            except StageFailed as exc:
                cause = exc.__cause__
                if not isinstance(cause, SendFailed):  # not a send error the client knows: unknown
                    cause = SendFailed(str(cause or exc), "uncertain")
                await self.file_failure(outbox_id, phone, cause)
                # The parts after it certainly did not go: re-delivered in order, or with an
                # unreachable number, failed with it.
                for later, _ in parts[i + 1 :]:
                    if cause.final:
                        await self.rows.delivered([later], Status.FAILED, error=str(cause))
                    else:
                        await self.rows.postpone(later, "an earlier part did not go out", self.limits.redeliver_backoff)
                self.metrics.sends.labels("failed").inc(len(parts) - i)
                return False
            self.metrics.sends.labels("sent").inc()
            if first:  # the lead sees an answer from the first message on
                response = (datetime.now(UTC) - since).total_seconds()
                await self.rows.delivered(
                    [outbox_id], Status.SENT, provider_id=provider_id, turn_id=turn_id, response_ms=response * 1000
                )
                self.metrics.response_time.observe(response)
            else:
                await self.rows.delivered([outbox_id], Status.SENT, provider_id=provider_id)
        return True

    async def _part(
        self, outbox_id: int, phone: str, text: str, *, first: bool, clock: StageClock, lease: Lease | None
    ) -> str | None:
        """A reply's part: the first is 'sending' since its turn was written; a later one
        is put on record as it starts. Timed as the turn's 'send' stage; a lapsed lease is
        not a send failure and goes through as LeaseLapsed."""
        if lease is not None and lease.lapsed and not unguarded.off("fence"):
            self.metrics.fenced.labels("lapsed").inc()
            raise LeaseLapsed(f"the lock of ...{phone[-4:]} lapsed before its send")
        if not first:
            await self.rows.record_attempt(outbox_id)
        try:
            return await clock.run("send", self.attempt(outbox_id, phone, text, each_try=True, lease=lease), None)
        except StageFailed as exc:
            if isinstance(exc.__cause__, LeaseLapsed):
                raise exc.__cause__ from None
            raise

    async def redeliver(self) -> None:
        """The re-delivery job: rows that did not go out are sent again, in order, under
        each lead's lock (never interleaved with a live turn's replies). One that may have
        arrived (its send timed out, or its daemon died mid-send) is looked up first."""
        assert self.uncertain is not None
        lim, t = self.limits, self.timeouts
        stale = t.evolution_send * lim.send_attempts + t.redis_lock_ttl
        rows = await self.rows.undelivered(stale, lim.redeliver_attempts, lim.redeliver_within, self.batch)
        by_lead: dict[str, list[tuple[int, str, Status, datetime, str | None]]] = {}
        for outbox_id, phone, body, status, created, lid in rows:
            by_lead.setdefault(phone, []).append((outbox_id, body, status, created, lid))
        for phone, replies in by_lead.items():
            async with self.locks.held(phone) as lease:
                if lease is None:
                    continue  # a live turn is sending: next pass
                for outbox_id, body, status, created, lid in replies:
                    if not await self._resend(outbox_id, phone, body, status, created, lid, lease):
                        break  # keep the lead's replies in order
        waiting, oldest = await self.rows.backlog(stale)  # what is left for the next passes
        self.metrics.outbox_backlog.set(waiting)
        self.metrics.outbox_oldest.set(oldest)

    async def _resend(
        self, outbox_id: int, phone: str, body: str, status: Status, created: datetime, lid: str | None, lease: Lease
    ) -> bool:
        """One row of re-delivery; False when it failed (the lead's later rows wait)."""
        assert self.uncertain is not None
        if status in (Status.SENDING, Status.UNCERTAIN):  # did it arrive after all?
            outcome, provider_id = await self.uncertain.settle(phone, lid, body, created)
            if outcome == "arrived":
                await self.rows.delivered([outbox_id], Status.SENT, provider_id=provider_id)
                return True
            if outcome == "skip":
                error = "uncertain send skipped (on_uncertain_send = skip)"
                await self.rows.delivered([outbox_id], Status.FAILED, error=error)
                return True
        if not await self.rows.claim_redelivery(outbox_id, status):
            return True  # another daemon's job got it first
        try:
            provider_id = await self.attempt(outbox_id, phone, body, lease=lease)
        except LeaseLapsed:  # frozen past the lock: left 'sending', looked up before a re-send
            return False
        except SendFailed as exc:
            await self.file_failure(outbox_id, phone, exc)
            self.metrics.sends.labels("redelivery_failed").inc()
            return False
        await self.rows.delivered([outbox_id], Status.SENT, provider_id=provider_id)
        self.metrics.sends.labels("redelivered").inc()
        return True

    async def settle(self, phone: str, text: str, since: datetime) -> tuple[str, str | None]:
        """Did a send of unknown outcome arrive? (see UncertainSends.settle)"""
        assert self.uncertain is not None
        return await self.uncertain.settle(phone, None, text, since)


class UncertainSends:
    def __init__(self, config: Config, sender: EvolutionClient, store: OutboxStore, metrics: Metrics) -> None:
        self.sender = sender
        self.store = store
        self.metrics = metrics
        self.policy = config.evolution.on_uncertain_send
        self.look_back = config.profile.limits.uncertain_look_back  # findMessages pages per chat
        setting = config.evolution.stores_messages
        self._history: bool | None = None if setting == "auto" else setting == "yes"
        self._warned = False

    async def keeps_history(self) -> bool | None:
        """Whether findMessages can answer, decided once (`auto`: is a reply we know
        arrived in the instance's history?); None while nothing was sent to ask about."""
        if self._history is None:
            probe = await self.store.last_sent()
            if probe is None:
                return None
            identity, provider_id = probe
            self._history = await self.sender.keeps_history(jid(identity), provider_id)
            log.info("the Evolution instance %s message history", "keeps" if self._history else "keeps no")
        return self._history

    async def settle(self, identity: str, lid: str | None, text: str, since: datetime) -> tuple[str, str | None]:
        """('arrived', provider id) | ('absent', None): send it | ('resend' | 'skip', None):
        the history could not tell, and the policy chose."""
        try:
            if self._history is not False:
                jids = list(dict.fromkeys([jid(identity), *([lid] if lid else [])]))
                found = await self.sender.was_sent(jids, text, since, self.look_back)
                if found is not None:  # found: there is a history
                    self._history = True
                    self.metrics.uncertain.labels("arrived").inc()
                    return "arrived", found
                if await self.keeps_history():  # a history without it: it never arrived
                    self.metrics.uncertain.labels("absent").inc()
                    return "absent", None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("cannot tell whether a reply arrived (%s: %s)", exc.__class__.__name__, exc)
        if not self._warned:
            self._warned = True
            log.warning(
                "a reply's send is uncertain and the Evolution instance keeps no history to check it "
                "(DATABASE_SAVE_DATA_NEW_MESSAGE=true lets it): following on_uncertain_send = %s",
                self.policy,
            )
        self.metrics.uncertain.labels(self.policy).inc()
        return self.policy, None
