"""`sdrctl replay` and `sdrctl export`: recorded conversations as JSONL, re-sent through the
real pipeline, and the new replies compared with the recorded ones, burst by burst.

Each lead message goes in as the Evolution API would post it (a `messages.upsert` webhook).
The reply is read from the daemon's outbox table: a turn writes all of its parts there in
one statement and marks the messages it answered, so the reply to a burst is known exactly
(which turn, how many parts) without guessing when the last part has arrived."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hashlib
import itertools
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from daemon.buffer import window_for
from daemon.config import Config
from daemon.connections import pg_options
from daemon.embedded import services
from daemon.errors import ConfigError, SdrError, UnavailableError
from daemon.evolution import text_event
from daemon.identity import IDENTITY_HELP, parse_identity
from daemon.store import connect, init_connection
from daemon.testing.fake_evolution import run_fake_evolution
from daemon.tools.bench import spread
from daemon.tools.inprocess import inprocess_daemon, with_changes

REQUIRED = ("conversation", "phone", "direction", "text", "ts")
OPTIONAL = ("name", "media")
DIRECTIONS = ("in", "out")
MEDIA_KINDS = ("image", "audio", "video", "document", "sticker")
STATUSES = ("exact", "changed", "missing", "extra")
DIFFERENCES = ("changed", "missing", "extra")
CONCURRENCY = 8  # conversations replayed at once: enough to overlap, few enough to stay readable
DELIVERED = ("sent", "local", "failed")  # outbox statuses after which a part will not change


# --- the format -----------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One message of a recording; `where` ("FILE:N") points back at it."""

    conversation: str
    phone: str
    name: str | None
    direction: str
    text: str
    ts: datetime
    where: str
    media: dict[str, str] | None = None


@dataclass
class Burst:
    """The lead's consecutive messages, and the recorded reply parts that followed them."""

    messages: list[Line]
    recorded: list[Line] = field(default_factory=list)

    @property
    def expected(self) -> str | None:
        return "\n\n".join(r.text for r in self.recorded) if self.recorded else None


@dataclass
class Conversation:
    id: str
    phone: str
    bursts: list[Burst]


def parse_file(path: Path) -> list[Conversation]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return parse_lines(text.splitlines(), str(path))


def parse_lines(lines: Iterable[str], source: str) -> list[Conversation]:
    """JSONL text (blank lines allowed) as conversations, in the order they first appear."""
    docs: list[tuple[str, Any]] = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            docs.append((f"{source}:{n}", json.loads(raw)))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}:{n}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    return parse_docs(docs, source)


def parse_docs(docs: Iterable[tuple[str, Any]], source: str) -> list[Conversation]:
    conversations: dict[str, Conversation] = {}
    last_in: dict[str, datetime] = {}
    for where, doc in docs:
        line = _line(doc, where)
        conv = conversations.get(line.conversation)
        if conv is None:
            if line.direction == "out":
                raise ConfigError(
                    f'{where}: conversation {line.conversation!r} starts with an "out" line; a '
                    'replay re-sends the lead\'s messages, so each conversation starts with an "in" line'
                )
            conv = conversations[line.conversation] = Conversation(line.conversation, line.phone, [])
        elif line.phone != conv.phone:
            raise ConfigError(f"{where}: conversation {line.conversation!r} was with {conv.phone}, not {line.phone}")
        if line.direction == "out":
            conv.bursts[-1].recorded.append(line)
            continue
        before = last_in.get(line.conversation)
        if before is not None and line.ts < before:
            raise ConfigError(
                f"{where}: ts {line.ts.isoformat()} is earlier than the conversation's previous "
                '"in" line; the lines of a conversation go in time order'
            )
        last_in[line.conversation] = line.ts
        if conv.bursts and not conv.bursts[-1].recorded:
            conv.bursts[-1].messages.append(line)
        else:
            conv.bursts.append(Burst([line]))
    if not conversations:
        raise ConfigError(f"{source}: no conversations in it (one JSON object per line expected)")
    return list(conversations.values())


def _line(doc: Any, where: str) -> Line:
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a JSON object (one message per line)")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise ConfigError(f"{where}: missing field {missing[0]!r} (every line has {', '.join(REQUIRED)})")
    unknown = sorted(set(doc) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        allowed = ", ".join(REQUIRED + OPTIONAL)
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; allowed: {allowed}")
    for key in REQUIRED:
        if not isinstance(doc[key], str):
            raise ConfigError(f"{where}: {key} must be a string, not {json.dumps(doc[key])}")
    direction, phone, text = doc["direction"], doc["phone"], doc["text"]
    if direction not in DIRECTIONS:
        raise ConfigError(
            f'{where}: unknown direction {direction!r}; use "in" (the lead\'s message) or "out" (the bot\'s reply)'
        )
    if not isinstance(phone, str) or parse_identity(phone) != phone:
        raise ConfigError(f"{where}: phone {phone!r} must be {IDENTITY_HELP}")
    name = doc.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where}: name must be a string or null")
    media = _media(doc.get("media"), direction, where)
    if not text.strip() and media is None:
        raise ConfigError(f"{where}: text is empty (only a media line may have no text: its caption)")
    return Line(doc["conversation"], phone, name, direction, text, _ts(doc["ts"], where), where, media)


def _media(value: Any, direction: str, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if direction != "in":
        raise ConfigError(f'{where}: media is for the lead\'s ("in") messages only')
    if not isinstance(value, dict) or value.get("kind") not in MEDIA_KINDS:
        kinds = ", ".join(MEDIA_KINDS)
        raise ConfigError(f'{where}: media must be {{"kind": one of {kinds}, "ref": "..."}}')
    return {"kind": value["kind"], "ref": str(value.get("ref", ""))}


def _ts(value: str, where: str) -> datetime:
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        ts = None
    if ts is None or ts.tzinfo is None:
        raise ConfigError(
            f"{where}: ts {value!r} must be an ISO 8601 time with its offset, e.g. 2026-11-20T14:03:05-03:00"
        )
    return ts


def select(conversations: list[Conversation], ids: list[str] | None, source: str) -> list[Conversation]:
    """Only the conversations named (all when none are)."""
    if not ids:
        return conversations
    known = {c.id for c in conversations}
    unknown = [i for i in ids if i not in known]
    if unknown:
        shown = ", ".join(sorted(known)[:10]) + (", ..." if len(known) > 10 else "")
        raise ConfigError(f"{source}: no conversation {unknown[0]!r}; it has {shown}")
    return [c for c in conversations if c.id in ids]


def dumps_line(doc: dict[str, Any]) -> str:
    return json.dumps(doc, ensure_ascii=False)


# --- results ---------------------------------------------------------------------------


def classify(expected: str | None, got: str | None) -> str:
    if expected is None:
        return "exact" if got is None else "extra"
    if got is None:
        return "missing"
    return "exact" if got == expected else "changed"


@dataclass(frozen=True)
class TurnResult:
    conversation: str
    where: str  # the burst's first line
    sent: list[str]  # what the lead said in the burst
    expected: str | None  # the recorded reply parts, joined
    parts: list[str]  # the reply now, as WhatsApp messages
    latency: float | None  # seconds: last message posted -> reply's first part delivered
    status: str

    @property
    def got(self) -> str | None:
        return "\n\n".join(self.parts) if self.parts else None

    def diff(self) -> list[str]:
        old, new = (self.expected or "").splitlines(), (self.got or "").splitlines()
        return list(difflib.unified_diff(old, new, "recorded", "replayed", n=1, lineterm=""))


@dataclass
class ConversationResult:
    id: str
    phone: str
    turns: list[TurnResult]

    def counts(self) -> dict[str, int]:
        return _counts(self.turns)

    def latency(self) -> dict[str, float | None]:
        return spread([t.latency for t in self.turns if t.latency is not None])


@dataclass
class ReplayReport:
    target: str
    speed: float
    conversations: list[ConversationResult]
    elapsed: float

    @property
    def turns(self) -> list[TurnResult]:
        return [t for c in self.conversations for t in c.turns]

    def counts(self) -> dict[str, int]:
        return _counts(self.turns)

    def differences(self) -> int:
        counts = self.counts()
        return sum(counts[s] for s in DIFFERENCES)

    def latency(self) -> dict[str, float | None]:
        return spread([t.latency for t in self.turns if t.latency is not None])

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "speed": self.speed,
            "elapsed_s": self.elapsed,
            "counts": self.counts(),
            "differences": self.differences(),
            "latency_s": self.latency(),
            "conversations": [
                {
                    "id": c.id,
                    "phone": c.phone,
                    "counts": c.counts(),
                    "latency_s": c.latency(),
                    "turns": [
                        {
                            "line": t.where,
                            "status": t.status,
                            "sent": t.sent,
                            "expected": t.expected,
                            "got": t.got,
                            "parts": t.parts,
                            "latency_s": t.latency,
                        }
                        for t in c.turns
                    ],
                }
                for c in self.conversations
            ],
        }


def _counts(turns: list[TurnResult]) -> dict[str, int]:
    seen = Counter(t.status for t in turns)
    return {s: seen[s] for s in STATUSES}


# --- replaying -------------------------------------------------------------------------


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


# --- the database as recordings (export, --from-db) ------------------------------------

SINCE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime | None:
    """ "7d", "12h", "30m", "2w", a date or time (ISO 8601), or "all" (None)."""
    value = text.strip().lower()
    if value == "all":
        return None
    now = now or datetime.now(UTC)
    match = SINCE.match(value)
    if match:
        return now - timedelta(**{UNITS[match.group(2)]: float(match.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"--since {text!r}: use a duration such as 7d, 12h or 30m, a date such as 2026-11-01, or all"
        ) from None
    return when if when.tzinfo else when.astimezone()  # a bare date is local time


EXPORT_MESSAGES = """
SELECT c.id AS conversation, l.phone_number AS phone, l.push_name AS name, m.kind, m.body,
       m.provider_id, m.provider_ts, m.received_at, m.turn_id
  FROM conversations c
  JOIN leads l ON l.id = c.lead_id
  JOIN messages m ON m.conversation_id = c.id AND m.direction = 'in'
 WHERE ($1::timestamptz IS NULL OR c.last_message_at >= $1)
   AND ($2::text IS NULL OR l.phone_number = $2)
 ORDER BY c.id, m.turn_id NULLS LAST, m.provider_ts, m.id
"""
# Replies to turns only: a follow-up the daemon sent on its own cannot be replayed.
EXPORT_REPLIES = """
SELECT o.turn_id, o.body, coalesce(o.sent_at, o.created_at) AS at
  FROM outbox o JOIN turns t ON t.id = o.turn_id
 WHERE t.conversation_id = ANY($1::bigint[])
 ORDER BY o.id
"""


def pseudonym(phone: str, salt: str = "") -> str:
    """A stable stand-in for a phone: `55000` and 8 digits from a hash (same phone and
    salt, same pseudonym). Without a secret salt it can be found by trying every number."""
    digest = hashlib.sha256(f"{salt}:{phone}".encode()).hexdigest()
    return f"55000{int(digest, 16) % 10**8:08d}"


async def export(
    config: Config,
    *,
    since: datetime | None,
    lead: str | None = None,
    anonymize: bool = False,
    salt: str = "",
) -> list[dict[str, Any]]:
    """The configured database's conversations as recording lines (whole conversations
    active since `since`): each turn's messages, then the reply parts it sent."""
    messages, replies = await _fetch(config, since, lead)
    by_turn: dict[int, list[asyncpg.Record]] = {}
    for r in replies:
        by_turn.setdefault(r["turn_id"], []).append(r)
    lines: list[dict[str, Any]] = []
    for conv_id, group in itertools.groupby(messages, key=lambda m: m["conversation"]):
        rows = list(group)
        phone, name = rows[0]["phone"], rows[0]["name"]
        shown = pseudonym(phone, salt) if anonymize else phone
        if anonymize and name is not None:
            name = f"Lead {shown[-4:]}"
        head = {"conversation": f"c{conv_id}", "phone": shown, "name": name}
        for i, m in enumerate(rows):
            # The text is kept, but a lead may have typed its own number in it.
            lines.append(_said(head, "in", m["body"].replace(phone, shown), m["provider_ts"]))
            if m["kind"] != "text":
                lines[-1]["media"] = {"kind": m["kind"], "ref": m["provider_id"]}
            if m["turn_id"] is None or (i + 1 < len(rows) and rows[i + 1]["turn_id"] == m["turn_id"]):
                continue  # a turn's reply goes after the last message it answered
            for r in by_turn.get(m["turn_id"], []):
                # On the lead's clock (provider_ts), as long after its message as it really was.
                at = m["provider_ts"] + (r["at"] - m["received_at"])
                lines.append(_said(head, "out", r["body"].replace(phone, shown), at))
    return lines


def _said(head: dict[str, Any], direction: str, text: str, ts: datetime) -> dict[str, Any]:
    when = ts.astimezone(UTC).isoformat(timespec="seconds")
    return {**head, "direction": direction, "text": text, "ts": when}


async def _fetch(
    config: Config, since: datetime | None, lead: str | None
) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    stack = contextlib.ExitStack()
    try:
        endpoints = await asyncio.to_thread(stack.enter_context, services(config, redis=False))
        try:
            conn = await asyncpg.connect(
                endpoints.direct_url,
                timeout=config.profile.timeouts.database,
                **pg_options(endpoints.direct_pooled),
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise UnavailableError(f"PostgreSQL is unreachable: {exc}") from None
        try:
            await init_connection(conn)
            messages = await conn.fetch(EXPORT_MESSAGES, since, lead)
            replies = await conn.fetch(EXPORT_REPLIES, sorted({m["conversation"] for m in messages}))
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(stack.close)
    return messages, replies


async def from_database(config: Config, *, since: datetime | None, lead: str | None = None) -> list[Conversation]:
    lines = await export(config, since=since, lead=lead)
    if not lines:
        raise ConfigError("database: no conversations to replay (try a longer --since, or another --lead)")
    return parse_docs(((f"database:{n}", doc) for n, doc in enumerate(lines, 1)), "database")
