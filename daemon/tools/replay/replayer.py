"""Replaying recorded conversations against a daemon (a throw-away in-process one, or the
one at --url) and reading its replies.

Each lead message goes in as the Evolution API would post it (a `messages.upsert` webhook).
The reply is read from the daemon's outbox table: a turn writes all of its parts there in
one statement and marks the messages it answered, so the reply to a burst is known exactly
(which turn, how many parts) without guessing when the last part has arrived."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
import httpx

from daemon.buffer import window_for
from daemon.config import Config
from daemon.embedded import services
from daemon.errors import ConfigError, SdrError, UnavailableError
from daemon.evolution import text_event
from daemon.outbox import Status
from daemon.store import connect
from daemon.testing.fake_evolution import run_fake_evolution
from daemon.tools.inprocess import inprocess_daemon, with_changes
from daemon.tools.replay.recording import Conversation, Line
from daemon.tools.replay.results import ConversationResult, ReplayReport, TurnResult, classify

CONCURRENCY = 8  # conversations replayed at once: enough to overlap, few enough to stay readable
DELIVERED = (Status.SENT, Status.LOCAL, Status.FAILED)  # after these a part will not change


@dataclass(frozen=True)
class Target:
    """Where the events go, and the database whose outbox holds the replies."""

    url: str
    database_url: str
    name: str
    pooled: bool = False  # database_url is a transaction pooler


@contextlib.asynccontextmanager
async def target_for(config: Config, url: str | None) -> AsyncIterator[Target]:
    if url is not None:
        stack = contextlib.ExitStack()
        try:
            endpoints = await asyncio.to_thread(stack.enter_context, services(config, redis=False))
            yield Target(url.rstrip("/"), endpoints.direct_url, f"daemon at {url}", endpoints.direct_pooled)
        finally:
            await asyncio.to_thread(stack.close)
        return
    # Always on throw-away services: leads already in the configured database are further
    # along the flow, and would be answered differently (and changed by the replay).
    fresh = with_changes(with_changes(config, "database", url=""), "redis", url="")
    async with run_fake_evolution() as fake, inprocess_daemon(fresh, evolution_url=fake.url) as d:
        yield Target(d.url, d.endpoints.database_url, "in-process daemon")


def check_speed(speed: float) -> None:
    if not speed > 0:
        raise ConfigError(f"--speed {speed:g}: must be a positive number (10 = ten times faster)")


async def replay(
    conversations: list[Conversation],
    config: Config,
    *,
    url: str | None = None,
    speed: float = 10.0,
    progress: Callable[[ConversationResult], None] | None = None,
) -> ReplayReport:
    """Replays the conversations against an in-process daemon (or the one at `url`)."""
    check_speed(speed)
    started = time.monotonic()
    async with target_for(config, url) as target, Replayer(config, target, speed) as replayer:
        results = await replayer.run(conversations, progress)
    return ReplayReport(target.name, speed, results, time.monotonic() - started)


# A turn answers the burst's messages; all of its parts are in the outbox at once.
REPLY = """
WITH burst AS (SELECT turn_id FROM messages WHERE provider_id = ANY($1::text[]))
SELECT (SELECT count(*) FROM burst) AS stored,
       (SELECT count(*) FROM burst WHERE turn_id IS NULL) AS unanswered,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'body', o.body, 'status', o.status, 'at', extract(epoch FROM o.sent_at)::float8)
                   ORDER BY o.id), '[]'::jsonb)
          FROM outbox o
         WHERE o.phone_number = $2 AND o.turn_id IN (SELECT turn_id FROM burst)) AS parts
"""


class Replayer:
    def __init__(self, config: Config, target: Target, speed: float) -> None:
        p = config.profile
        self.config = config
        self.target = target
        self.speed = speed
        # The daemon's own limits: a burst is answered (or falls back) within these.
        self.patience = p.timeouts.message_buffer + p.timeouts.agent + p.timeouts.evolution_send
        self.poll = p.buffer.poll_interval
        headers = {"authorization": f"Bearer {config.webhook_token}"} if config.webhook_token else {}
        self.http = httpx.AsyncClient(base_url=target.url, headers=headers, timeout=p.timeouts.webhook)
        self.ids = (f"RPL{secrets.token_hex(4).upper()}{n:06d}" for n in itertools.count(1))
        self.clock_offset = 0.0  # database clock - ours

    async def __aenter__(self) -> Replayer:
        try:
            (await self.http.get("/healthz")).raise_for_status()
        except httpx.HTTPError:
            await self.http.aclose()
            raise UnavailableError(f"no daemon answers at {self.target.url}; start one with `sdrctl serve`") from None
        try:
            self.pool = await connect(self.target.database_url, self.config.profile, pooled=self.target.pooled)
        except (OSError, asyncpg.PostgresError) as exc:
            await self.http.aclose()
            raise UnavailableError(f"PostgreSQL (where the replies are read) is unreachable: {exc}") from None
        before = time.time()
        db_now = await self.pool.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
        self.clock_offset = float(db_now) - (before + time.time()) / 2
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await self.pool.close()

    async def run(
        self, conversations: list[Conversation], progress: Callable[[ConversationResult], None] | None
    ) -> list[ConversationResult]:
        # Conversations of one phone share the lead's state, so they run in order, as recorded.
        by_phone: dict[str, list[Conversation]] = {}
        for c in conversations:
            by_phone.setdefault(c.phone, []).append(c)
        slots = asyncio.Semaphore(CONCURRENCY)
        done: dict[str, ConversationResult] = {}

        async def lead(convs: list[Conversation]) -> None:
            async with slots:
                for c in convs:
                    done[c.id] = result = await self.conversation(c)
                    if progress is not None:
                        progress(result)

        try:
            async with asyncio.TaskGroup() as tg:  # owns them: one failing cancels the rest
                for convs in by_phone.values():
                    tg.create_task(lead(convs), name=f"replay:{convs[0].phone[-4:]}")
        except* SdrError as group:
            raise group.exceptions[0] from None
        return [done[c.id] for c in conversations]

    async def conversation(self, c: Conversation) -> ConversationResult:
        turns: list[TurnResult] = []
        previous: Line | None = None
        posted = time.monotonic()
        for burst in c.bursts:
            accepted: list[str] = []
            last_sent: float | None = None
            for i, msg in enumerate(burst.messages):
                if previous is not None:
                    await asyncio.sleep(max(0.0, posted + self._gap(previous, msg, i > 0) - time.monotonic()))
                previous = msg
                if not msg.text.strip():
                    continue  # a media message without a caption: no text to send for now
                last_sent, posted = time.time(), time.monotonic()
                message_id = await self._post(c.phone, msg)
                if message_id is not None:
                    accepted.append(message_id)
            parts, arrived = await self._reply(c.phone, accepted)
            turns.append(
                TurnResult(
                    conversation=c.id,
                    where=burst.messages[0].where,
                    sent=[m.text for m in burst.messages],
                    expected=burst.expected,
                    parts=parts,
                    latency=None if arrived is None or last_sent is None else max(0.0, arrived - last_sent),
                    status=classify(burst.expected, "\n\n".join(parts) if parts else None),
                )
            )
        return ConversationResult(c.id, c.phone, turns)

    def _gap(self, previous: Line, msg: Line, within_burst: bool) -> float:
        """The recorded gap, `speed` times shorter. Inside a burst it stays well within the
        window the buffer gives the previous message, so the burst is still one turn."""
        gap = (msg.ts - previous.ts).total_seconds() / self.speed
        if within_burst:
            gap = min(gap, window_for("text", previous.text, self.config.profile.buffer) / 2)
        return max(0.0, gap)

    async def _post(self, phone: str, msg: Line) -> str | None:
        """Posts one message; its id when the daemon stored it (None when it ignored it)."""
        message_id = next(self.ids)
        event = text_event(
            phone,
            msg.text,
            message_id=message_id,
            instance=self.config.evolution.instance,
            push_name=msg.name,
            timestamp=msg.ts.timestamp(),
        )
        try:
            resp = await self.http.post("/webhook/evolution", json=event)
        except httpx.HTTPError as exc:
            raise UnavailableError(
                f"the daemon at {self.target.url} did not take {msg.where}: {exc.__class__.__name__} {exc}"
            ) from None
        if resp.status_code != 200:
            raise UnavailableError(
                f"the daemon at {self.target.url} refused {msg.where}: HTTP {resp.status_code} {resp.text[:200]}"
            )
        return message_id if resp.json().get("status") in ("stored", "duplicate") else None

    async def _reply(self, phone: str, message_ids: list[str]) -> tuple[list[str], float | None]:
        """The parts of the turn(s) that answered these messages, once all are delivered,
        and when the first one was (our clock); nothing when no reply came in time."""
        if not message_ids:
            return [], None
        deadline = time.monotonic() + self.patience
        while time.monotonic() < deadline:
            row = await self.pool.fetchrow(REPLY, message_ids, phone)
            if row["stored"] < len(message_ids):  # the daemon acknowledged them stored
                raise UnavailableError(
                    f"the daemon at {self.target.url} stores its messages in another database than the "
                    "configured one; point --config (or SDR_DATABASE_URL) at the daemon's database"
                )
            parts = row["parts"]
            if row["unanswered"] == 0 and all(p["status"] in DELIVERED for p in parts):
                times = [p["at"] for p in parts if p["at"] is not None]
                return [p["body"] for p in parts], (min(times) - self.clock_offset if times else None)
            await asyncio.sleep(self.poll)
        return [], None
