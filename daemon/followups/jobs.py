"""The daemon's periodic work, on one APScheduler 3.x AsyncIOScheduler inside `serve`:

- follow-ups: claim and send what is due (every [followups] poll_interval);
- knowledge-base refresh: when the knowledge_base table changed, drop its cache in every
  daemon (every kb_refresh_interval);
- unanswered sweep: re-queue messages whose buffer entry was lost (every [buffer]
  sweep_interval); lead locks need no sweep, they expire by their TTL in Redis;
- CRM push (when [followups] crm_url is set): leads changed since the last push, POSTed as
  JSON batches, with retries and bounded concurrency (every crm_interval).

Each run is one task the runtime owns: never two of a job at once (max_instances=1,
coalesce), a failing run is logged and counted, and `stop` cancels what is running."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
import httpx
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from daemon.metrics import Metrics
from daemon.tasks import cancel_and_wait

log = logging.getLogger("sdr.jobs")

Job = Callable[[], Awaitable[Any]]


class Jobs:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.scheduler = AsyncIOScheduler(timezone="UTC")
        self.running: set[asyncio.Task[Any]] = set()
        self._stopped = False

    def every(self, name: str, seconds: float, job: Job) -> None:
        self.scheduler.add_job(
            self._run,
            "interval",
            args=(name, job),
            seconds=seconds,
            id=name,
            name=name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )

    def start(self) -> None:
        self.scheduler.start()

    async def stop(self) -> None:
        """No new runs; running ones cancelled. Idempotent: the asyncio scheduler shuts
        down on the next loop pass, so `running` alone cannot tell a second call."""
        if self.scheduler.running and not self._stopped:
            self._stopped = True
            self.scheduler.shutdown(wait=False)
        for task in list(self.running):
            await cancel_and_wait(task)

    async def _run(self, name: str, job: Job) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.running.add(task)
        try:
            await job()
            self.metrics.jobs.labels(name, "ok").inc()
        except asyncio.CancelledError:
            if self._stopped:  # our own stop: ended quietly (APScheduler logs a traceback
                return  # for any exception a job raises, CancelledError included)
            raise
        except Exception as exc:
            self.metrics.jobs.labels(name, "failed").inc()
            log.warning("job %s failed: %s: %s", name, exc.__class__.__name__, exc)
        finally:
            self.running.discard(task)


class KnowledgeRefresh:
    """Drops the knowledge-base cache everywhere when the table changed (count or latest
    update), so an edited answer reaches leads within one interval, not one TTL."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        invalidate_all: Callable[[], Awaitable[None]],
        embed: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.pool = pool
        self.invalidate_all = invalidate_all
        self.embed = embed  # vectors for new or edited entries (with an embeddings endpoint)
        self.seen: tuple[int, datetime | None] | None = None

    async def __call__(self) -> None:
        row = await self.pool.fetchrow("SELECT count(*) AS n, max(updated_at) AS at FROM knowledge_base")
        assert row is not None
        version = (row["n"], row["at"])
        if self.seen is None or version != self.seen:
            if self.embed is not None:  # first: the search by meaning finds the new entries too
                await self.embed()
            if self.seen is not None:
                log.info("knowledge base changed: dropping its cache")
                await self.invalidate_all()
        self.seen = version


class CrmPush:
    """POSTs leads changed since the last push to the CRM, `batch` per request, at most
    `concurrency` requests at once, each tried `attempts` times; the watermark moves only
    past what the CRM accepted, so nothing is skipped (a lead may be sent twice)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        url: str,
        *,
        batch: int,
        concurrency: int,
        attempts: int,
        timeout: float,
        backoff: float,
    ) -> None:
        self.pool = pool
        self.url = url
        self.batch = batch
        self.attempts = attempts
        self.backoff = backoff
        self.slots = asyncio.Semaphore(concurrency)
        self.http = httpx.AsyncClient(timeout=timeout)

    async def close(self) -> None:
        await self.http.aclose()

    async def __call__(self) -> int:
        since = await self.pool.fetchval("SELECT pushed_until FROM crm_sync WHERE id = 1")
        rows = await self.pool.fetch(
            """SELECT id, phone_number, name, push_name, stage, bill_value, consumption_kwh, solution,
                      property_type, decision_maker, meeting_at, updated_at
                 FROM leads WHERE $1::timestamptz IS NULL OR updated_at > $1
                ORDER BY updated_at, id LIMIT $2""",
            since,
            self.batch * 10,
        )
        if not rows:
            return 0
        batches = [rows[i : i + self.batch] for i in range(0, len(rows), self.batch)]
        results = await asyncio.gather(*(self._post(b) for b in batches))
        # The watermark: the end of the leading run of accepted batches (in order).
        until = None
        for batch, ok in zip(batches, results, strict=True):
            if not ok:
                break
            until = batch[-1]["updated_at"]
        if until is not None:
            await self.pool.execute(
                """INSERT INTO crm_sync (id, pushed_until) VALUES (1, $1)
                   ON CONFLICT (id) DO UPDATE SET pushed_until = greatest(crm_sync.pushed_until, $1)""",
                until,
            )
        return sum(len(b) for b, ok in zip(batches, results, strict=True) if ok)

    async def _post(self, rows: list[asyncpg.Record]) -> bool:
        body = {"leads": [_jsonable(dict(r)) for r in rows]}
        delay = self.backoff
        async with self.slots:
            for attempt in range(1, self.attempts + 1):
                try:
                    resp = await self.http.post(self.url, json=body)
                    if resp.status_code < 400:
                        return True
                    error = f"HTTP {resp.status_code}"
                except httpx.HTTPError as exc:
                    error = f"{exc.__class__.__name__}: {exc}"
                log.warning("CRM push attempt %d/%d failed: %s", attempt, self.attempts, error)
                if attempt < self.attempts:
                    await asyncio.sleep(delay)
                    delay *= 2
        return False


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            out[key] = str(value)  # Decimal
        else:
            out[key] = value
    return out
