"""What an operator does to a lead by hand (`sdrctl leads`): list and show leads; pause,
resume, ignore and unignore the bot for one; erase one (LGPD art. 18). The SQL and Redis
work lives here and returns data; the CLI only parses and renders.

Each change locks the lead's row first, so it is ordered with a turn writing the lead (a
turn refuses to answer a paused or ignored lead from the row, not from a cache)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from daemon.buffer import KEYS as BUFFER_SETS
from daemon.cache import ALL, CHANNEL, REDIS_ERRORS, SEP
from daemon.connections import Redis
from daemon.errors import ConfigError, NotFoundError, UnavailableError
from daemon.identity import LID_SERVER, parse_identity
from daemon.locks import again_key, fence_key, lock_key
from daemon.models import ANALYSED_KINDS

PHONE_HELP = "digits only, 10 to 15 of them ('+', spaces, dashes and parentheses are dropped), e.g. 5511999990000"
IDENTITY_HELP = f"{PHONE_HELP}; or a LID jid such as 187654321098765@lid"
STATUSES = ("paused", "opted-out", "unreachable", "ignored", "active")
PAUSE_REASON = "paused by an operator"
IGNORE_REASON = "ignored by an operator"

# $1: the numbers sdr.toml's [handover] ignore lists (ignored without a flag on the row).
_IS = {
    "paused": "coalesce(l.paused_until > now(), false)",
    "opted-out": "l.opted_out_at IS NOT NULL",
    "unreachable": "l.unreachable_at IS NOT NULL",  # how daemon.outbox mark_unreachable records it
    "ignored": "(l.ignored OR l.phone_number = ANY($1::text[]))",
}
_IS["active"] = f"NOT ({' OR '.join(_IS.values())})"

# A lead's last message through the indexes (conversations by phone, messages by
# conversation and id): never a scan of all messages per lead.
LIST = f"""
SELECT l.phone_number AS phone, coalesce(l.name, l.push_name) AS name, l.stage, last.at AS last_message_at,
       CASE WHEN {_IS["paused"]} THEN l.paused_until END AS paused_until,
       l.opted_out_at, l.unreachable_at, {_IS["ignored"]} AS ignored
  FROM leads l
  LEFT JOIN LATERAL (
      SELECT m.received_at AS at FROM conversations c
       CROSS JOIN LATERAL (SELECT received_at FROM messages
                            WHERE conversation_id = c.id ORDER BY id DESC LIMIT 1) m
       WHERE c.phone_number = l.phone_number AND c.lead_id = l.id
       ORDER BY 1 DESC LIMIT 1) last ON true
 WHERE {{where}}
 ORDER BY last.at DESC NULLS LAST, l.id DESC
 LIMIT $2
"""
# A LID jid names the lead known only by it, or the one it was linked to (sql/0007).
FIND = "SELECT * FROM leads WHERE phone_number = $1 OR (right($1, 4) = '@lid' AND lid = $1)"
CANCEL = """UPDATE follow_ups SET status = 'cancelled', last_error = $2, updated_at = now()
             WHERE lead_id = $1 AND status = 'pending'"""
EVENT = "INSERT INTO lead_events (lead_id, kind, actor) VALUES ($1, $2, 'cli')"
# Children before parents: outbox rows point at turns and follow-ups, messages at turns,
# turns at conversations. lead_events keep their rows (lead_id goes NULL by its FK).
ERASE = (
    ("outbox", "DELETE FROM outbox WHERE lead_id = $1"),
    ("messages", "DELETE FROM messages WHERE lead_id = $1"),
    ("discarded_replies", "DELETE FROM discarded_replies WHERE lead_id = $1"),
    ("follow_ups", "DELETE FROM follow_ups WHERE lead_id = $1"),
    ("turns", "DELETE FROM turns WHERE lead_id = $1"),
    ("conversations", "DELETE FROM conversations WHERE lead_id = $1"),
    ("leads", "DELETE FROM leads WHERE id = $1"),
)
# Frees our lock only (never one a daemon took after it expired) and the hand-off flag a
# daemon left meanwhile (daemon.locks._RELEASE).
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return redis.call('DEL', KEYS[2])
"""


def parse_phone(text: str, *, lid: bool = False) -> str:
    """'+55 (11) 99999-0000' -> '5511999990000'; with `lid`, '187654321098765@lid' as is."""
    raw = text.strip()
    if lid and raw.endswith(LID_SERVER):
        if (found := parse_identity(raw)) is not None:
            return found
    elif not re.search(r"[^0-9\s+()-]", raw, re.ASCII):
        digits = re.sub(r"[^0-9]", "", raw)
        if 10 <= len(digits) <= 15:
            return digits
    raise ConfigError(f"PHONE {text!r}: use {IDENTITY_HELP if lid else PHONE_HELP}")


def check_status(status: str) -> str:
    if status not in STATUSES:
        raise ConfigError(f"--status {status!r}: use one of {', '.join(STATUSES)}")
    return status


@dataclass(frozen=True)
class LeadSummary:
    phone: str
    name: str | None  # the name the lead told us, else its WhatsApp profile name
    stage: str
    last_message_at: datetime | None
    paused_until: datetime | None  # only while paused
    opted_out_at: datetime | None
    unreachable_at: datetime | None
    ignored: bool  # by `sdrctl leads ignore` or sdr.toml's [handover] ignore

    @property
    def statuses(self) -> list[str]:
        return statuses(self.ignored, self.opted_out_at, self.paused_until, self.unreachable_at)


def statuses(ignored: bool, opted_out: object, paused: object, unreachable: object) -> list[str]:
    """Every condition that holds, or 'active' when none does."""
    conditions = (("ignored", ignored), ("opted-out", opted_out), ("paused", paused), ("unreachable", unreachable))
    return [name for name, on in conditions if on] or ["active"]


@dataclass(frozen=True)
class Message:
    at: datetime
    who: str  # lead | bot | operator (a person on the business's number)
    kind: str
    text: str
    answered: bool | None  # inbound only: a reply went out for it
    why_not: str | None  # inbound and unanswered: waiting, or the silent turn's reason (paused, ignored)


@dataclass(frozen=True)
class LeadDetail:
    fields: dict[str, Any]  # the row, minus internals (id, fence)
    paused: bool
    ignored_by_config: bool
    messages: list[Message]  # the last 10, oldest first
    follow_ups: list[dict[str, Any]]  # pending: kind, step, due_at
    events: list[dict[str, Any]]  # the last 10 lead_events, newest first


@dataclass(frozen=True)
class Paused:
    phone: str
    until: datetime
    before: tuple[datetime, str | None] | None  # the pause this one replaced, while it held
    cancelled: int  # pending follow-ups


@dataclass(frozen=True)
class Changed:
    phone: str
    changed: bool  # False: it was so already
    created: bool = False  # ignore: the number had never written
    cancelled: int = 0
    until: datetime | None = None  # resume: until when it was paused
    by: str | None = None


@dataclass
class Forgotten:
    identities: list[str]
    rows: dict[str, int]  # table -> rows deleted
    events_kept: int  # the lead's lead_events rows, now without it
    redis_keys: list[str] = field(default_factory=list)
    buffer_members: int = 0  # sorted-set members of the message buffer
    media_entries: int = 0  # cached photo/voice-note analyses deleted
    media_untied: int = 0  # media messages without their bytes: their analyses cannot be found
    knowledge_entries: int = 0


async def list_leads(conn: asyncpg.Connection, ignore: list[str], status: str | None, limit: int) -> list[LeadSummary]:
    """Most recent last message first; `status` filters on one condition (a lead paused and
    opted out is listed under both)."""
    where = _IS[check_status(status)] if status else "true"
    rows = await conn.fetch(LIST.format(where=where), ignore, limit)
    return [LeadSummary(**dict(r)) for r in rows]


async def _find(conn: asyncpg.Connection, identity: str, *, lock: bool = False) -> asyncpg.Record:
    row = await conn.fetchrow(FIND + (" FOR UPDATE" if lock else ""), identity)
    if row is None:
        raise NotFoundError(f"no lead with phone {identity}; `sdrctl leads list` shows them")
    return row


async def show(conn: asyncpg.Connection, identity: str, ignore: list[str]) -> LeadDetail:
    lead = await _find(conn, identity)
    paused = await conn.fetchval("SELECT coalesce($1 > now(), false)", lead["paused_until"])
    messages = await conn.fetch(
        """SELECT m.received_at AS at, m.direction, m.kind, m.body, m.turn_id, t.outcome
             FROM messages m LEFT JOIN turns t ON t.id = m.turn_id
            WHERE m.conversation_id = ANY (ARRAY(
                      SELECT id FROM conversations WHERE phone_number = $2 AND lead_id = $1))
            ORDER BY m.id DESC LIMIT 10""",
        lead["id"],
        lead["phone_number"],
    )
    follow_ups = await conn.fetch(
        "SELECT kind, step, due_at FROM follow_ups WHERE lead_id = $1 AND status = 'pending' ORDER BY due_at, id",
        lead["id"],
    )
    events = await conn.fetch(
        "SELECT kind, actor, at FROM lead_events WHERE lead_id = $1 ORDER BY at DESC, id DESC LIMIT 10", lead["id"]
    )
    return LeadDetail(
        fields={k: v for k, v in dict(lead).items() if k not in ("id", "fence")},
        paused=bool(paused),
        ignored_by_config=lead["phone_number"] in ignore,
        messages=[_message(m) for m in reversed(messages)],
        follow_ups=[dict(f) for f in follow_ups],
        events=[dict(e) for e in events],
    )


def _message(m: asyncpg.Record) -> Message:
    if m["direction"] == "out":
        return Message(m["at"], "operator" if m["kind"] == "operator" else "bot", m["kind"], m["body"], None, None)
    # A turn that sent nothing (the lead paused or ignored) marks messages handled, not answered.
    silent = m["outcome"] in ("paused", "ignored")
    answered = m["turn_id"] is not None and not silent
    why = None if answered else (m["outcome"] if silent else "waiting")
    return Message(m["at"], "lead", m["kind"], m["body"], answered, why)


async def pause(conn: asyncpg.Connection, identity: str, seconds: float) -> Paused:
    async with conn.transaction():
        lead = await _find(conn, identity, lock=True)
        row = await conn.fetchrow(
            """UPDATE leads SET paused_until = now() + make_interval(secs => $2), paused_by = 'cli',
                      paused_at = now(), updated_at = now()
                WHERE id = $1
            RETURNING paused_until, coalesce($3 > now(), false) AS was_paused""",
            lead["id"],
            seconds,
            lead["paused_until"],
        )
        cancelled = _count(await conn.execute(CANCEL, lead["id"], PAUSE_REASON))
        await conn.execute(EVENT, lead["id"], "paused")
    before = (lead["paused_until"], lead["paused_by"]) if row["was_paused"] else None
    return Paused(lead["phone_number"], row["paused_until"], before, cancelled)


async def resume(conn: asyncpg.Connection, identity: str) -> Changed:
    """A 'resumed' event only when the lead was paused: the report counts real resumes."""
    async with conn.transaction():
        lead = await _find(conn, identity, lock=True)
        was = await conn.fetchval(
            """UPDATE leads SET paused_until = NULL, paused_by = NULL, paused_at = NULL,
                      updated_at = CASE WHEN paused_until IS NULL THEN updated_at ELSE now() END
                WHERE id = $1 RETURNING coalesce($2 > now(), false)""",
            lead["id"],
            lead["paused_until"],
        )
        if was:
            await conn.execute(EVENT, lead["id"], "resumed")
    return Changed(lead["phone_number"], bool(was), until=lead["paused_until"], by=lead["paused_by"])


async def ignore(conn: asyncpg.Connection, phone: str) -> Changed:
    """A number that never wrote gets its lead row now (a phone is all it needs), so the
    bot ignores its first message too."""
    async with conn.transaction():
        lead = await conn.fetchrow("SELECT id, ignored FROM leads WHERE phone_number = $1 FOR UPDATE", phone)
        if lead is not None and lead["ignored"]:
            return Changed(phone, False)
        if lead is None:  # the intake may create it meanwhile: then it is updated
            row = await conn.fetchrow(
                """INSERT INTO leads (phone_number, ignored) VALUES ($1, true)
                   ON CONFLICT (phone_number) DO UPDATE SET ignored = true, updated_at = now()
                   RETURNING id, xmax = 0 AS created""",
                phone,
            )
            lead_id, created = row["id"], row["created"]
        else:
            lead_id, created = lead["id"], False
            await conn.execute("UPDATE leads SET ignored = true, updated_at = now() WHERE id = $1", lead_id)
        cancelled = _count(await conn.execute(CANCEL, lead_id, IGNORE_REASON))
        await conn.execute(EVENT, lead_id, "ignored")
    return Changed(phone, True, created=created, cancelled=cancelled)


async def unignore(conn: asyncpg.Connection, phone: str) -> Changed:
    """No lead_events row: the schema has no kind for it (sql/0011)."""
    async with conn.transaction():
        lead = await _find(conn, phone, lock=True)
        if lead["ignored"]:
            await conn.execute("UPDATE leads SET ignored = false, updated_at = now() WHERE id = $1", lead["id"])
    return Changed(phone, bool(lead["ignored"]))


def _count(status: str) -> int:
    return int(status.split()[-1])  # "UPDATE 3", "DELETE 3"


# --- Redis ---------------------------------------------------------------------------


def cache_key(cache: str, key: str) -> str:
    """As daemon.cache.TwoTierCache.redis_key names its entries."""
    return f"sdr:cache:{cache}:{{{key}}}"


def _text(key: object) -> str:
    return key.decode() if isinstance(key, bytes) else str(key)


def _glob(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


async def invalidate_lead(redis: Redis, identities: list[str]) -> None:
    """Drops the cached lead in Redis and in every daemon's local tier (TwoTierCache.invalidate,
    but failing loudly: the operator is told)."""
    for identity in identities:
        await redis.delete(cache_key("lead", identity))
        await redis.publish(CHANNEL, f"lead{SEP}{identity}")


def _identities(lead: asyncpg.Record | dict[str, Any]) -> list[str]:
    return [i for i in (lead["phone_number"], lead["lid"]) if i]


async def forget(
    conn: asyncpg.Connection, redis: Redis, identity: str, *, lock_wait: float, on_wait: Callable[[], None]
) -> Forgotten:
    """Erases the lead: its rows in one transaction, then its Redis entries before that
    transaction commits, so a Redis failure deletes nothing from PostgreSQL and a rerun
    finishes the job. The lead's lock is held throughout: no turn or follow-up of it runs
    meanwhile (one running is waited for, up to `lock_wait` seconds)."""
    phone = (await _find(conn, identity))["phone_number"]
    token = await _lock(redis, phone, lock_wait, on_wait)
    try:
        async with conn.transaction():
            lead = await _find(conn, identity, lock=True)
            if lead["phone_number"] != phone:  # linked to its phone meanwhile: locked the wrong identity
                raise UnavailableError(f"the lead {identity} changed meanwhile; run the command again")
            lead_id = lead["id"]
            digests, untied = await _media_digests(conn, lead_id)
            kept = await conn.fetchval("SELECT count(*) FROM lead_events WHERE lead_id = $1", lead_id)
            rows = {table: _count(await conn.execute(sql, lead_id)) for table, sql in ERASE}
            await conn.execute(EVENT, None, "forgotten")
            done = Forgotten(_identities(lead), rows, kept, media_untied=untied)
            await _forget_in_redis(redis, done, phone, digests)
    finally:
        try:
            await redis.register_script(_UNLOCK)(keys=[lock_key(phone), again_key(phone)], args=[token])
        except REDIS_ERRORS:
            pass  # Redis is what failed: the lock expires by itself
    return done


async def _lock(redis: Redis, phone: str, wait: float, on_wait: Callable[[], None]) -> str:
    # Held for the lock's TTL from the profile, like a turn's (`wait` is that TTL): it
    # expires by itself if this process dies; the lead's row lock covers a longer erasure.
    token = f"sdrctl-forget-{secrets.token_hex(8)}"
    loop = asyncio.get_running_loop()
    deadline, told = loop.time() + wait, False
    while not await redis.set(lock_key(phone), token, nx=True, px=max(1, int(wait * 1000))):
        if loop.time() > deadline:
            raise UnavailableError(f"a turn or follow-up of {phone} still holds the lead after {wait:g}s; try again")
        if not told:
            on_wait()
            told = True
        await asyncio.sleep(0.1)
    return token


async def _media_digests(conn: asyncpg.Connection, lead_id: int) -> tuple[set[str], int]:
    """The content hashes the lead's photos and voice notes were analysed under
    (daemon.media.processor caches by them), from the bytes the webhook carried; and how many
    came without bytes (fetched from the Evolution API, never stored): those cannot be tied."""
    from daemon.media import images  # Pillow: only when forgetting
    from daemon.media.refusal import MediaRefused

    rows = await conn.fetch(
        "SELECT media ->> 'base64' AS b64 FROM messages WHERE lead_id = $1 AND kind = ANY($2::text[])",
        lead_id,
        sorted(ANALYSED_KINDS),
    )
    digests: set[str] = set()
    for r in rows:
        if r["b64"]:
            try:  # the processor's own decoding, so the hash is the same
                digests.add(hashlib.sha256(images.decode(r["b64"], 1 << 62)).hexdigest())
            except MediaRefused:
                pass  # refused before the cache: nothing was stored under it
    return digests, sum(1 for r in rows if not r["b64"])


async def _forget_in_redis(redis: Redis, done: Forgotten, locked: str, digests: set[str]) -> None:
    """Every key family that carries the lead's identity (locks, hand-off flags, fences, the
    lead cache: all hash-tagged with it; buffer members), its media analyses, and the
    knowledge-search cache, whose keys are words the leads typed."""
    for identity in done.identities:
        names = [again_key(identity), fence_key(identity), cache_key("lead", identity)]
        names += [lock_key(identity)] if identity != locked else []
        # Any other key hash-tagged with the lead, as the README says every per-lead key is.
        names += [_text(k) async for k in redis.scan_iter(match=f"*{{{_glob(identity)}}}*", count=500)]
        for name in dict.fromkeys(names):
            if name != lock_key(locked) and await redis.delete(name):
                done.redis_keys.append(name)
        await redis.publish(CHANNEL, f"lead{SEP}{identity}")
        for zset in BUFFER_SETS:  # members: the phone, or "phone|message id" without coalescing
            members = [identity] + [m async for m, _ in redis.zscan_iter(zset, match=f"{_glob(identity)}|*")]
            done.buffer_members += await redis.zrem(zset, *members)
    for digest in sorted(digests):
        done.media_entries += await redis.delete(cache_key("media", digest))
        await redis.publish(CHANNEL, f"media{SEP}{digest}")
    for name in [k async for k in redis.scan_iter(match=cache_key("knowledge", "*"), count=500)]:
        done.knowledge_entries += await redis.unlink(name)
    await redis.publish(CHANNEL, f"knowledge{SEP}{ALL}")
