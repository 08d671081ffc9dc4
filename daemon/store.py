"""PostgreSQL through asyncpg: every query the pipeline runs, each one round trip.

asyncpg prepares and caches each statement per connection, so the hot queries are parsed
once (except through a transaction pooler, where no statement outlives its transaction).
Timeouts come from the profile."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, cast

import asyncpg
import msgspec

from daemon.config import Profile
from daemon.connections import pg_boundary, pg_options
from daemon.models import FinishedTurn, Inbound, PendingMessage, Refused, Takeover, TurnRecord
from daemon.outbox import Status

_encoder = msgspec.json.Encoder(enc_hook=str)  # Decimal and the like as PostgreSQL reads them


def _dumps(value: Any) -> str:
    return _encoder.encode(value).decode()


async def init_connection(conn: asyncpg.Connection) -> None:
    # msgspec: several times faster than the json module, on the intake's hot path.
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=_dumps, decoder=msgspec.json.decode, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Replaces asyncpg's reset-on-release (a round trip per release): we never change
    session state on pooled connections; an open transaction is still rolled back."""


# The hot path's read queries, named so `sdrctl migrate verify` explains exactly these.
PENDING_MESSAGES = """
SELECT m.id, m.lead_id, m.conversation_id, m.kind, m.body, m.media, m.provider_ts, m.received_at,
       m.trace_context AS trace
  FROM messages m JOIN leads l ON l.id = m.lead_id
 WHERE l.phone_number = $1 AND m.direction = 'in' AND m.turn_id IS NULL
   AND ($2::bigint IS NULL OR m.id = $2)
 ORDER BY m.provider_ts, m.id"""

HISTORY = """
SELECT coalesce(jsonb_agg(h ORDER BY h.id), '[]'::jsonb) FROM (
    SELECT id, direction, kind, body, received_at FROM messages
     WHERE conversation_id = $1 AND (direction = 'out' OR turn_id IS NOT NULL)
     ORDER BY id DESC LIMIT $2) h"""


async def connect(url: str, profile: Profile, size: int | None = None, *, pooled: bool = False) -> asyncpg.Pool:
    """The turns' pool (sized by [pools] db_min_size..db_max_size), or a fixed `size` one;
    `pooled`: `url` is a transaction pooler (see daemon.connections)."""
    pool = await asyncpg.create_pool(
        url,
        **pg_options(pooled),
        min_size=size or profile.pools.db_min_size,
        max_size=size or profile.pools.db_max_size,
        timeout=profile.timeouts.database,
        command_timeout=profile.timeouts.database,
        init=init_connection,
        reset=_keep_session,
    )
    assert pool is not None
    return pool


# The lead columns a turn may update, with their SQL types.
LEAD_COLUMNS = {
    "name": "text",
    "stage": "text",
    "bill_value": "numeric",
    "consumption_kwh": "integer",
    "solution": "text",
    "meeting_at": "timestamptz",
    "property_type": "text",
    "decision_maker": "text",
}
# ...and those only the turn itself writes (a lead's opt-out, a hand-off's pause): never
# taken from an agent's answer.
HANDOVER_COLUMNS = {
    "opted_out_at": "timestamptz",
    "paused_until": "timestamptz",
    "paused_by": "text",
    "paused_at": "timestamptz",
}


def lead_sets(param: int) -> str:
    """SET clauses for the lead columns present in the jsonb parameter `$param`."""
    return ",\n".join(
        f"{col} = CASE WHEN ${param}::jsonb ? '{col}' THEN (${param}::jsonb ->> '{col}')::{kind} ELSE {col} END"
        for col, kind in {**LEAD_COLUMNS, **HANDOVER_COLUMNS}.items()
    )


_LEAD_SETS = lead_sets(19)
# The lead's row, locked: the write is refused unless $24 is the lead's newest fencing
# token (NULL only with the test-only `SDRCTL_TEST_UNGUARDED=fence`) and the lead is not
# paused (a person took over) nor ignored. The row lock orders this write after any other of
# the lead's, and returns the row as it is now, not as the statement's snapshot saw it.
_LEAD_NOW = "SELECT id, fence, paused_until, ignored FROM leads WHERE id = $1 FOR UPDATE"
_WRITABLE = """($24::bigint IS NULL OR l.fence = $24)
       AND (l.paused_until IS NULL OR l.paused_until <= clock_timestamp()) AND NOT l.ignored"""
_ANSWERED = "SELECT 1 FROM messages a WHERE a.id = ANY($17::bigint[]) AND a.turn_id IS NOT NULL"
_NEWER = """SELECT 1 FROM messages n
            WHERE n.lead_id = $1 AND n.direction = 'in' AND n.turn_id IS NULL
              AND n.id <> ALL($17::bigint[])"""
FINISH_TURN = f"""
WITH l AS ({_LEAD_NOW}
), t AS (
    -- $23: a speculative reply is written only if no newer message of the lead is waiting
    -- (the last check before it is sent; nothing at all is written otherwise).
    INSERT INTO turns (lead_id, conversation_id, messages_joined, first_message_at,
        last_message_at, started_at, finished_at, buffer_wait_ms, stages, timeouts, failures,
        agent_backend, outcome, response_ms, cache_hits, cache_misses, window_ms, fence,
        prompt_tokens, completion_tokens, cost)
    SELECT $1, $2, cardinality($17::bigint[]), $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
           $14, $15, $22, $24, $27::integer, $28::integer, $29::numeric
      FROM l
     WHERE {_WRITABLE}
       AND NOT ($23::boolean AND EXISTS ({_NEWER}))
       AND ($24::bigint IS NULL OR NOT EXISTS ({_ANSWERED}))
    RETURNING id
), answered AS (
    UPDATE messages SET turn_id = t.id FROM t
     WHERE messages.id = ANY($17::bigint[]) AND ($24::bigint IS NULL OR messages.turn_id IS NULL)
), reply AS (
    INSERT INTO messages (conversation_id, lead_id, direction, body, provider_ts)
    SELECT $2, $1, 'out', $18, clock_timestamp() FROM t
    RETURNING id
), lead AS (
    UPDATE leads SET {_LEAD_SETS},
        updated_at = now()
    FROM t WHERE leads.id = $1
    RETURNING to_jsonb(leads.*) AS row
), event AS (
    -- $25: what the turn was about, for the report (an opt-out, a hand-off), by $26
    INSERT INTO lead_events (lead_id, kind, actor) SELECT $1, $25, $26 FROM t WHERE $25::text IS NOT NULL
), outbox_rows AS (
    -- The first part's first send attempt is recorded here, before it is attempted.
    INSERT INTO outbox (lead_id, turn_id, phone_number, body, status, attempts, sent_at)
    SELECT $1, t.id, $16, p.part,
           CASE WHEN $20::text = '{Status.PENDING}' AND p.n = 1 THEN '{Status.SENDING}' ELSE $20::text END,
           CASE WHEN $20::text = '{Status.PENDING}' AND p.n = 1 THEN 1 ELSE 0 END,
           CASE WHEN $20::text = '{Status.LOCAL}' THEN clock_timestamp() END
      FROM t, unnest($21::text[]) WITH ORDINALITY AS p(part, n)
     ORDER BY p.n
    RETURNING id
)
SELECT (SELECT id FROM t) AS turn_id,
       (SELECT array_agg(id ORDER BY id) FROM outbox_rows) AS outbox_ids,
       (SELECT row FROM lead) AS lead,
       (SELECT id FROM reply) AS reply_id,
       CASE WHEN NOT EXISTS (SELECT 1 FROM l WHERE $24::bigint IS NULL OR l.fence = $24)
              OR ($24::bigint IS NOT NULL AND EXISTS ({_ANSWERED})) THEN 'fenced'
            WHEN NOT EXISTS (SELECT 1 FROM l WHERE {_WRITABLE}) THEN 'paused'
            ELSE 'newer_message' END AS refused
"""
# A burst the bot does not answer (the lead is paused or ignored): a turn without a reply
# marks it handled, so neither the sweep nor a restart brings it back. Fenced like a reply.
SILENT_TURN = """
WITH l AS (SELECT id, fence FROM leads WHERE id = $1 FOR UPDATE
), t AS (
    INSERT INTO turns (lead_id, conversation_id, messages_joined, first_message_at,
        last_message_at, started_at, finished_at, buffer_wait_ms, agent_backend, outcome, fence)
    SELECT $1, $2, cardinality($3::bigint[]), $4, $5, $6, $7, 0, 'none', $8, $9 FROM l
     WHERE ($9::bigint IS NULL OR l.fence = $9)
       AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.id = ANY($3::bigint[]) AND a.turn_id IS NOT NULL)
    RETURNING id
), answered AS (
    UPDATE messages SET turn_id = t.id FROM t WHERE messages.id = ANY($3::bigint[]) AND messages.turn_id IS NULL
), event AS (
    INSERT INTO lead_events (lead_id, kind, actor) SELECT $1, 'suppressed', 'bot' FROM t
)
SELECT id FROM t
"""
# The turn's first statement: its fencing token (see daemon.outbox.TAKE_FENCE) and whether
# the bot may answer the lead at all (read from the row, not a cache: `sdrctl leads pause`
# and a takeover reach every daemon at once).
BEGIN_TURN = """
UPDATE leads SET fence = greatest(fence, $2) WHERE phone_number = $1
RETURNING fence = $2 AS newest, coalesce(paused_until > clock_timestamp(), false) AS paused, ignored"""
_WORD = re.compile(r"[0-9a-zà-öø-ÿ]+")


def tsquery_any(text: str) -> str:
    """An OR of the text's words for to_tsquery; only letters and digits reach Postgres."""
    words = dict.fromkeys(w for w in _WORD.findall(text.lower()) if len(w) > 1)
    return " | ".join(words)


@pg_boundary
class Store:
    def __init__(self, pool: asyncpg.Pool, profile: Profile) -> None:
        self.pool = pool
        self.timeout = profile.timeouts.database

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1", timeout=self.timeout)

    async def ingest_many(self, msgs: list[Inbound]) -> list[tuple[int, bool, bool, dict[str, Any] | None]]:
        """`ingest` for a batch, in one round trip and one transaction (group commit)."""
        batch = [
            {
                "phone": m.phone,
                "push_name": m.push_name,
                "provider_id": m.provider_id,
                "kind": m.kind,
                "body": m.body,
                "media": m.media,
                "provider_ts": m.provider_ts.isoformat(),
                "trace": m.trace,  # the webhook's span, linked from the turn (sql/0016)
            }
            for m in msgs
        ]
        rows = await self.pool.fetch("SELECT * FROM ingest_many($1::jsonb)", batch, timeout=self.timeout)
        return [(r["message_id"], r["inserted"], r["unanswered"], r["lead"]) for r in rows]

    async def link_lids(self, pairs: dict[str, str]) -> list[str]:
        """Stores each LID -> phone pair (merging a lead known only by the LID into the
        phone's lead); returns the identities whose lead row changed."""
        changed: list[str] = []
        async with self.pool.acquire() as conn, conn.transaction():
            for lid, phone in sorted(pairs.items()):  # one lock order for every caller
                changed += await conn.fetchval("SELECT link_lead_lid($1, $2)", phone, lid, timeout=self.timeout)
        return changed

    async def phones_for_lids(self, lids: list[str]) -> dict[str, str]:
        """The identity of the leads that have these LIDs (their phone, once learned)."""
        rows = await self.pool.fetch(
            "SELECT lid, phone_number FROM leads WHERE lid = ANY($1::text[])", lids, timeout=self.timeout
        )
        return {r["lid"]: r["phone_number"] for r in rows}

    async def apply_edit(self, provider_id: str, text: str, edit_id: str) -> tuple[str, str, int] | None:
        """A lead's edit of message `provider_id`: still waiting in its burst, the text is
        replaced ('replaced'); already answered, the new text is stored as a message of its
        own ('correction') for the next turn. (outcome, identity, message id); None when
        the message is not one we know."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT m.id, m.turn_id, m.conversation_id, m.lead_id, l.phone_number
                     FROM messages m JOIN leads l ON l.id = m.lead_id
                    WHERE m.provider_id = $1 AND m.direction = 'in' FOR UPDATE OF m""",
                provider_id,
                timeout=self.timeout,
            )
            if row is None:
                return None
            if row["turn_id"] is None:
                await conn.execute("UPDATE messages SET body = $2 WHERE id = $1", row["id"], text, timeout=self.timeout)
                return "replaced", row["phone_number"], row["id"]
            new_id = await conn.fetchval(
                """INSERT INTO messages (conversation_id, lead_id, provider_id, direction, kind, body, provider_ts)
                   VALUES ($1, $2, $3, 'in', 'edit', $4, clock_timestamp())
                   ON CONFLICT (provider_id) DO NOTHING RETURNING id""",
                row["conversation_id"],
                row["lead_id"],
                edit_id,
                text,
                timeout=self.timeout,
            )
            return (
                ("correction", row["phone_number"], new_id)
                if new_id is not None
                else ("duplicate", row["phone_number"], row["id"])
            )

    async def begin_turn(
        self, phone: str, fence: int | None, only: int | None
    ) -> tuple[list[PendingMessage], str | None] | None:
        """Makes `fence` the lead's newest token, then reads its unanswered messages, with
        why the bot must not answer them ('paused', 'ignored', else None); None when a
        newer token holds the lead. Two statements, in this order: the token's UPDATE waits
        for a turn writing the lead right now, and the read after it (a snapshot of its
        own) sees what that turn answered. `fence` None: unguarded (tests only)."""
        row = await self.pool.fetchrow(BEGIN_TURN, phone, fence, timeout=self.timeout)
        if row is not None and row["newest"] is False:
            return None
        silenced = None if row is None else ("ignored" if row["ignored"] else "paused" if row["paused"] else None)
        return await self.pending_messages(phone, only), silenced

    async def silent_turn(self, t: TurnRecord, fence: int | None) -> bool:
        """Marks a burst handled without a reply (outcome 'paused' or 'ignored'); False when
        fenced out (another turn holds the lead)."""
        turn_id = await self.pool.fetchval(
            SILENT_TURN,
            t.lead_id,
            t.conversation_id,
            t.message_ids,
            t.first_message_at,
            t.last_message_at,
            t.started_at,
            t.finished_at,
            t.outcome,
            fence,
            timeout=self.timeout,
        )
        return turn_id is not None

    async def take_over(self, phone: str, msg: Takeover, pause: float) -> str:
        """A person wrote to the lead from the business's number: their message joins the
        conversation (the agent reads it later), the bot pauses for `pause` seconds and the
        lead's pending follow-ups are cancelled. 'echo' when it is one of our own sends,
        'duplicate' when already seen, else 'takeover'."""
        async with self.pool.acquire() as conn, conn.transaction():
            t = self.timeout
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM outbox WHERE provider_id = $1)", msg.provider_id):
                return "echo"
            lead_id = await conn.fetchval(
                """INSERT INTO leads (phone_number) VALUES ($1)
                   ON CONFLICT (phone_number) DO UPDATE SET updated_at = now() RETURNING id""",
                phone,
                timeout=t,
            )
            conversation = await conn.fetchval(
                """INSERT INTO conversations (lead_id, phone_number) VALUES ($1, $2)
                   ON CONFLICT (lead_id) WHERE status = 'open' DO UPDATE SET last_message_at = now() RETURNING id""",
                lead_id,
                phone,
                timeout=t,
            )
            stored = await conn.fetchval(
                """INSERT INTO messages (conversation_id, lead_id, provider_id, direction, kind, body, provider_ts)
                   VALUES ($1, $2, $3, 'out', 'operator', $4, $5) ON CONFLICT (provider_id) DO NOTHING RETURNING id""",
                conversation,
                lead_id,
                msg.provider_id,
                msg.body,
                msg.provider_ts,
                timeout=t,
            )
            if stored is None:
                return "duplicate"
            await conn.execute(
                """WITH paused AS (
                       UPDATE leads SET paused_until = greatest(paused_until, clock_timestamp() + make_interval(secs => $2)),
                              paused_by = 'operator', paused_at = clock_timestamp(), updated_at = now()
                        WHERE id = $1),
                   cancelled AS (
                       UPDATE follow_ups SET status = 'cancelled', last_error = 'a person took over the chat',
                              updated_at = clock_timestamp()
                        WHERE lead_id = $1 AND status = 'pending')
                   INSERT INTO lead_events (lead_id, kind, actor) VALUES ($1, 'takeover', 'operator')""",
                lead_id,
                pause,
                timeout=t,
            )
            return "takeover"

    async def pending_messages(self, phone: str, only: int | None = None) -> list[PendingMessage]:
        """The lead's unanswered messages (or just message `only`), in the order the lead
        wrote them."""
        rows = await self.pool.fetch(
            PENDING_MESSAGES,
            phone,
            only,
            timeout=self.timeout,
        )
        return [PendingMessage(**dict(r)) for r in rows]

    async def lead_with_history(
        self, lead_id: int, conversation_id: int, limit: int
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The lead and the conversation's last `limit` answered messages, in one query."""
        row = await self.pool.fetchrow(
            """SELECT to_jsonb(l) AS lead,
                      (SELECT coalesce(jsonb_agg(h ORDER BY h.id), '[]'::jsonb) FROM (
                           SELECT id, direction, kind, body, received_at FROM messages
                            WHERE conversation_id = $2 AND (direction = 'out' OR turn_id IS NOT NULL)
                            ORDER BY id DESC LIMIT $3) h) AS history
                 FROM leads l WHERE l.id = $1""",
            lead_id,
            conversation_id,
            limit,
            timeout=self.timeout,
        )
        assert row is not None
        return row["lead"], row["history"]

    async def history(self, conversation_id: int, limit: int) -> list[dict[str, Any]]:
        """The conversation's last `limit` answered messages (when the lead came from cache)."""
        value = await self.pool.fetchval(
            HISTORY,
            conversation_id,
            limit,
            timeout=self.timeout,
        )
        return list(value)

    async def finish_turn(
        self, t: TurnRecord, fence: int | None, *, unless_newer: bool = False, event: tuple[str, str] | None = None
    ) -> FinishedTurn | Refused:
        """The turn, the answered messages, the reply, the lead's updates and the outbox
        rows, in one statement (one round trip, one transaction). Nothing is written when
        `fence` is not the lead's newest token or a message was answered by another turn
        ('fenced'), when the lead was paused or ignored meanwhile ('paused'), or with
        `unless_newer` when a newer message of the lead is waiting ('newer_message').
        `event`: (kind, actor) of a lead_events row written with the turn."""
        updates = {k: v for k, v in t.lead_updates.items() if k in LEAD_COLUMNS or k in HANDOVER_COLUMNS}
        row = await self.pool.fetchrow(
            FINISH_TURN,
            t.lead_id,
            t.conversation_id,
            t.first_message_at,
            t.last_message_at,
            t.started_at,
            t.finished_at,
            t.buffer_wait_ms,
            t.stages,
            t.timeouts,
            t.failures,
            t.agent_backend,
            t.outcome,
            t.response_ms,
            t.cache_hits,
            t.cache_misses,
            t.phone,
            t.message_ids,
            t.reply,
            updates,
            t.outbox_status,
            t.parts,
            t.window_ms,
            unless_newer,
            fence,
            event[0] if event else None,
            event[1] if event else None,
            t.prompt_tokens,
            t.completion_tokens,
            t.cost,
            timeout=self.timeout,
        )
        assert row is not None
        if row["turn_id"] is None:
            return cast(Refused, row["refused"])
        return FinishedTurn(row["turn_id"], list(row["outbox_ids"]), row["lead"], row["reply_id"])

    async def newer_message(self, lead_id: int, last_id: int) -> bool:
        """Whether the lead wrote a message after `last_id` that is still unanswered."""
        return bool(
            await self.pool.fetchval(
                """SELECT EXISTS (SELECT 1 FROM messages WHERE lead_id = $1 AND direction = 'in'
                                 AND turn_id IS NULL AND id > $2)""",
                lead_id,
                last_id,
                timeout=self.timeout,
            )
        )

    async def discard_reply(
        self,
        lead_id: int,
        message_ids: list[int],
        reason: str,
        agent_ms: float | None,
        started_at: datetime,
        tokens: tuple[int | None, int | None, float | None] = (None, None, None),
    ) -> None:
        """A reply the agent wrote, thrown away: an agent call paid for and unread
        (`tokens`: prompt, completion and cost, as on a turn)."""
        await self.pool.execute(
            """INSERT INTO discarded_replies (lead_id, message_ids, reason, agent_ms, started_at,
                                              prompt_tokens, completion_tokens, cost)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            lead_id,
            message_ids,
            reason,
            agent_ms,
            started_at,
            *tokens,
            timeout=self.timeout,
        )

    async def stale_unanswered(self, older_than: float) -> list[tuple[str, int]]:
        """(phone, message id) of messages still unanswered `older_than` seconds after
        they arrived: more than any turn takes, so their buffer entry was lost."""
        rows = await self.pool.fetch(
            """SELECT l.phone_number, m.id FROM messages m JOIN leads l ON l.id = m.lead_id
                WHERE m.direction = 'in' AND m.turn_id IS NULL
                  AND m.received_at < clock_timestamp() - make_interval(secs => $1)
                ORDER BY m.id""",
            older_than,
            timeout=self.timeout,
        )
        return [(r["phone_number"], r["id"]) for r in rows]

    async def unanswered(self) -> list[tuple[str, int]]:
        """(phone, message id) of every message no turn answered: re-buffered at start."""
        rows = await self.pool.fetch(
            """SELECT l.phone_number, m.id FROM messages m JOIN leads l ON l.id = m.lead_id
                WHERE m.direction = 'in' AND m.turn_id IS NULL ORDER BY m.id""",
            timeout=self.timeout,
        )
        return [(r["phone_number"], r["id"]) for r in rows]

    async def outbox_after(self, phone: str, after_id: int) -> list[tuple[int, str]]:
        rows = await self.pool.fetch(
            "SELECT id, body FROM outbox WHERE phone_number = $1 AND id > $2 ORDER BY id",
            phone,
            after_id,
            timeout=self.timeout,
        )
        return [(r["id"], r["body"]) for r in rows]

    async def last_outbox_id(self, phone: str) -> int:
        value = await self.pool.fetchval(
            "SELECT coalesce(max(id), 0) FROM outbox WHERE phone_number = $1",
            phone,
            timeout=self.timeout,
        )
        return int(value)
