"""Group commit for the intake: concurrent webhooks share one database round trip and one
Redis round trip, so a durable write per message costs little throughput.

No linger: the first message is flushed at once; messages that arrive while a flush is in
flight wait for the next one, so batches grow only under load and an idle daemon adds no
latency. Each webhook is answered only after its own message is stored and its lead's
buffer is armed."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from daemon import telemetry
from daemon.buffer import MessageBuffer, member, window_for
from daemon.cache import TwoTierCache
from daemon.config import Profile
from daemon.identity import Identities
from daemon.models import Inbound
from daemon.store import Store

log = logging.getLogger("sdr.intake")

Result = tuple[int, bool, bool, dict[str, Any] | None]  # message id, inserted, unanswered, lead


@dataclass
class _Waiting:
    msg: Inbound
    done: asyncio.Future[str]


class IngestBatcher:
    def __init__(
        self,
        store: Store,
        buffer: MessageBuffer,
        profile: Profile,
        leads: TwoTierCache[dict[str, Any]],
        identities: Identities,
    ) -> None:
        self.store = store
        self.identities = identities  # a LID-addressed message is filed under its lead's phone
        self.buffer = buffer
        self.settings = profile.buffer
        self.max_batch = profile.pools.ingest_batch
        self.max_flushes = profile.pools.ingest_flushes
        self.leads = leads  # a created or changed lead is written through, stale copies dropped
        self._queue: list[_Waiting] = []  # bounded by [pools] webhooks_in_flight (the app)
        self._flushers: set[asyncio.Task[None]] = set()

    async def ingest(self, msg: Inbound) -> str:
        """Stores the message and arms its buffer; returns 'stored' or 'duplicate'. Traced,
        the message keeps the caller's span (its webhook's), for the turn to link to."""
        if (span := telemetry.traceparent()) is not None:
            msg = dataclasses.replace(msg, trace=span)
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(msg, done))
        if len(self._flushers) < self.max_flushes:
            self._flushers.add(asyncio.create_task(self._flush(), name="ingest-flush"))
        return await asyncio.shield(done)  # a webhook timing out must not cancel the batch

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                try:
                    outcomes = await self._store(batch)
                except Exception as exc:  # every webhook of the batch answers 503
                    for w in batch:
                        if not w.done.done():
                            w.done.set_exception(exc)
                    continue
                for w, outcome in zip(batch, outcomes, strict=True):
                    if not w.done.done():
                        w.done.set_result(outcome)
        finally:
            # No await between the empty-queue check and this: a message queued after it
            # always finds fewer flushers than the limit, and starts one.
            task = asyncio.current_task()
            if task is not None:
                self._flushers.discard(task)

    async def _store(self, batch: list[_Waiting]) -> list[str]:
        msgs = await self.identities.settle([w.msg for w in batch])
        # One lock order for every batch (by phone), so concurrent batches never deadlock.
        order = sorted(range(len(msgs)), key=lambda i: msgs[i].phone)
        stored = await self.store.ingest_many([msgs[i] for i in order])
        results: list[Result | None] = [None] * len(batch)
        for i, result in zip(order, stored, strict=True):
            results[i] = result
        arms: list[tuple[str, float]] = []
        for m, got in zip(msgs, results, strict=True):
            assert got is not None
            message_id, _, unanswered, lead = got
            if lead is not None:
                await self.leads.replace(m.phone, lead)
            if unanswered:  # also for a retried delivery: the first may have missed the buffer
                arms.append(
                    (member(m.phone, message_id, self.settings.coalesce), window_for(m.kind, m.body, self.settings))
                )
        await self.buffer.add_many(arms)
        return ["stored" if r is not None and r[1] else "duplicate" for r in results]

    async def close(self) -> None:
        """Lets the flushes in flight finish (their webhooks are waiting for them)."""
        if self._flushers:
            await asyncio.wait(set(self._flushers))
