"""The database's conversations as recordings: `sdrctl export` and `sdrctl replay --from-db`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from daemon.config import Config
from daemon.connections import pg_options
from daemon.durations import ALLOWED, parse_duration
from daemon.embedded import services
from daemon.errors import ConfigError, UnavailableError
from daemon.store import init_connection
from daemon.tools.replay.recording import Conversation, parse_docs


def parse_since(text: str, now: datetime | None = None) -> datetime | None:
    """--since: a duration back from now (7d, 12h: daemon/durations.py), a date or time
    (ISO 8601), or "all" (None)."""
    value = text.strip()
    if value.lower() == "all":
        return None
    try:
        return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(value))
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"--since {text!r}: use {ALLOWED}, a date such as 2026-11-01, or all") from None
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
