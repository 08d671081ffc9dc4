"""A reply sent part by part while the model still writes it.

Exactly once, as a whole reply: nothing is sent before it is on record. The first complete
part writes the turn (the same fenced statement as a whole reply, with that part as its
only outbox row); each later part adds its row under the same fencing token, refused once
another turn holds the lead; a sender owned by the turn sends the rows in order, each
checking the turn's lease before each try, with "typing..." between parts while the model
writes. When the model is done, one more statement writes what the reply came to: its
whole text, the stages, tokens, and the lead's updates (a booked meeting among them).

A cut stream (or the agent's budget running out) after parts went out: the unfinished
paragraph is dropped and the fallback goes as the last part, so the lead never reads half a
sentence and is never left without an answer. A newer message from the lead while the
reply streams does not stop it: the parts already sent answer the burst, and the next turn
answers the new message (stopping midway would leave the lead with half an answer)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from daemon.connections import pg_boundary
from daemon.errors import LeaseLapsed
from daemon.evolution import PRESENCE_MAX_MS, EvolutionClient
from daemon.locks import Lease
from daemon.models import FinishedTurn, PendingMessage, TurnRecord
from daemon.outbox import Outbox, Status
from daemon.stages import StageClock
from daemon.store import lead_sets
from daemon.tasks import Children

log = logging.getLogger("sdr.turn")

# A later part of a streamed reply: written only while the turn's token is the lead's
# newest and nobody paused the lead meanwhile.
ADD_PART = """
INSERT INTO outbox (lead_id, turn_id, phone_number, body, status, attempts, sent_at)
SELECT $1, $2, $3, $4, $5::text, 0, CASE WHEN $5::text = 'local' THEN clock_timestamp() END
  FROM (SELECT fence, paused_until, ignored FROM leads WHERE id = $1 FOR UPDATE) l
 WHERE ($6::bigint IS NULL OR l.fence = $6)
   AND (l.paused_until IS NULL OR l.paused_until <= clock_timestamp()) AND NOT l.ignored
RETURNING id
"""
# What the streamed reply came to, written when the model is done.
FINISH_STREAM = f"""
WITH l AS (SELECT id, fence FROM leads WHERE id = $1 FOR UPDATE
), t AS (
    UPDATE turns SET finished_at = $3, stages = $4, timeouts = $5, failures = $6, outcome = $7,
           prompt_tokens = $8, completion_tokens = $9, cost = $10::numeric
     WHERE id = $2 AND EXISTS (SELECT 1 FROM l WHERE $11::bigint IS NULL OR l.fence = $11)
    RETURNING id
), reply AS (
    UPDATE messages SET body = $12 FROM t WHERE messages.id = $13
), lead AS (
    UPDATE leads SET {lead_sets(14)}, updated_at = now()
      FROM t WHERE leads.id = $1
    RETURNING to_jsonb(leads.*) AS row
), event AS (
    INSERT INTO lead_events (lead_id, kind, actor) SELECT $1, $15, $16 FROM t WHERE $15::text IS NOT NULL
)
SELECT (SELECT id FROM t) AS turn_id, (SELECT row FROM lead) AS lead
"""


class StreamStopped(Exception):
    """The turn may not write its streamed reply: `reason` is 'fenced', 'paused',
    'newer_message' (a Refused from the first write) or 'lapsed'."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@pg_boundary
class StreamRows:
    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    async def add_part(self, t: TurnRecord, turn_id: int, fence: int | None, text: str) -> int | None:
        """The next part's outbox row; None when the turn lost the lead."""
        status = Status.LOCAL if t.outbox_status == Status.LOCAL else Status.PENDING
        row = await self.pool.fetchval(ADD_PART, t.lead_id, turn_id, t.phone, text, status, fence, timeout=self.timeout)
        return None if row is None else int(row)

    async def finish(
        self, t: TurnRecord, turn_id: int, reply_id: int | None, fence: int | None, event: tuple[str, str] | None
    ) -> dict[str, Any] | None:
        """The reply as it came to be; the lead as stored, or None when fenced meanwhile."""
        row = await self.pool.fetchrow(
            FINISH_STREAM,
            t.lead_id,
            turn_id,
            t.finished_at,
            t.stages,
            t.timeouts,
            t.failures,
            t.outcome,
            t.prompt_tokens,
            t.completion_tokens,
            t.cost,
            fence,
            t.reply,
            reply_id,
            t.lead_updates,
            event[0] if event else None,
            event[1] if event else None,
            timeout=self.timeout,
        )
        return None if row is None or row["turn_id"] is None else dict(row["lead"])


class StreamedReply:
    """The PartSink of one turn: `put` each part as the agent completes it, `end` once."""

    def __init__(
        self,
        *,
        rows: StreamRows,
        outbox: Outbox,
        open_turn: Callable[[str], Awaitable[FinishedTurn]],
        phone: str,
        burst: list[PendingMessage],
        record: TurnRecord,
        lease: Lease,
        fence: int | None,
        clock: StageClock,
        children: Children,
        presence_ms: int,
        presence_timeout: float,
    ) -> None:
        self.rows = rows
        self.outbox = outbox
        self.open_turn = open_turn  # the first write: the turn with its first part, or StreamStopped
        self.phone = phone
        self.since = max(m.received_at for m in burst)
        self.record = record
        self.lease = lease
        self.fence = fence
        self.clock = clock
        self.children = children
        self.presence_ms = presence_ms
        self.presence_timeout = presence_timeout
        self.done: FinishedTurn | None = None
        self.texts: list[str] = []  # the parts on record, in order
        self.queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        self.sender: asyncio.Task[None] | None = None
        self.typing: asyncio.Task[None] | None = None
        self.broken = False  # a part did not go: the rest wait for re-delivery, in order

    @property
    def started(self) -> bool:
        return self.done is not None

    async def put(self, text: str) -> None:
        if self.fence is not None and self.lease.lapsed:
            raise StreamStopped("lapsed")
        if self.done is None:
            self.done = await self.open_turn(text)  # raises StreamStopped when refused
            outbox_id = self.done.outbox_ids[0]
            if self.record.outbox_status != Status.LOCAL:
                self.sender = self.children.start(self._send(), f"stream:{self.phone[-4:]}")
        else:
            added = await self.rows.add_part(self.record, self.done.turn_id, self.fence, text)
            if added is None:
                raise StreamStopped("fenced")
            outbox_id = added
        self.texts.append(text)
        await self.queue.put((outbox_id, text))

    async def end(self) -> None:
        """The model is done (or gave up): the parts on record go out before the turn ends."""
        await self.queue.put(None)
        if self.sender is not None:
            await asyncio.wait({self.sender})
        if self.typing is not None:
            await self.children.stop(self.typing)

    async def finish(self, record: TurnRecord, event: tuple[str, str] | None) -> dict[str, Any] | None:
        assert self.done is not None
        return await self.rows.finish(record, self.done.turn_id, self.done.reply_id, self.fence, event)

    async def _send(self) -> None:
        assert self.done is not None
        opening = True
        while (item := await self.queue.get()) is not None:
            if self.typing is not None:
                await self.children.stop(self.typing)
            outbox_id, text = item
            if self.broken:  # sent by re-delivery after the part that did not go
                await self.outbox.rows.postpone(outbox_id, "an earlier part did not go out", 0)
                continue
            try:
                sent = await self.outbox.send_reply(
                    self.phone,
                    [(outbox_id, text)],
                    self.done.turn_id,
                    self.since,
                    self.clock,
                    self.lease,
                    opening=opening,
                )
            except LeaseLapsed:
                sent = False
            opening = False
            self.broken = not sent
            if sent and self.queue.empty():  # the model is still writing the next part
                self.typing = self.children.start(self._typing(), f"typing:{self.phone[-4:]}")

    async def _typing(self) -> None:
        sender: EvolutionClient | None = self.outbox.sender
        if sender is None:
            return
        try:
            await sender.send_presence(self.phone, min(self.presence_ms, PRESENCE_MAX_MS), self.presence_timeout)
        except Exception as exc:  # never worth failing a reply over
            log.info("typing presence not shown: %s", exc.__class__.__name__)
