"""Follow-ups in PostgreSQL, the source of truth: planned, claimed exactly once, finished.

Every statement takes `now` from the caller, so the scheduler runs on any clock (tests
drive it with a fake one) and every daemon agrees on what is due."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from daemon.connections import pg_boundary
from daemon.followups.planner import SILENCE_KINDS, Planned
from daemon.outbox import Status

# Replace the lead's pending silence follow-ups by what was planned (one statement). The
# lead wrote or we replied: the old sequence no longer applies. Meeting follow-ups are
# kept unless a planned one replaces the same kind and step.
PLAN = """
WITH gone AS (
    UPDATE follow_ups SET status = 'cancelled', last_error = $4, updated_at = $3
     WHERE lead_id = $1 AND status = 'pending'
       AND (kind = ANY($5::text[])
            OR (kind, step) IN (SELECT p.kind, p.step FROM jsonb_to_recordset($2::jsonb) AS p(kind text, step int)))
)
INSERT INTO follow_ups (lead_id, kind, step, due_at, payload, created_at, updated_at)
SELECT $1, p.kind, p.step, p.due_at, coalesce(p.payload, '{}'), $3, $3
  FROM jsonb_to_recordset($2::jsonb) AS p(kind text, step int, due_at timestamptz, payload jsonb)
"""

# Due follow-ups, and those whose daemon died mid-send, claimed by one daemon only.
CLAIM = """
UPDATE follow_ups f
   SET status = 'executing', claimed_at = $1, attempts = f.attempts + 1, updated_at = $1
  FROM leads l
 WHERE l.id = f.lead_id AND f.id IN (
       SELECT id FROM follow_ups
        WHERE (status = 'pending' AND due_at <= $1)
           OR (status = 'executing' AND claimed_at < $1 - make_interval(secs => $3))
        ORDER BY due_at
        LIMIT $2
          FOR UPDATE SKIP LOCKED)
RETURNING f.id, f.lead_id, f.kind, f.step, f.due_at, f.payload, f.attempts, f.created_at, l.phone_number,
          (SELECT o.status FROM outbox o WHERE o.follow_up_id = f.id ORDER BY o.id DESC LIMIT 1) AS last_send
"""


@dataclass(frozen=True)
class Claimed:
    id: int
    lead_id: int
    kind: str
    step: int
    due_at: datetime
    payload: dict[str, Any]
    attempts: int
    created_at: datetime
    phone: str
    last_send: str | None  # the outbox status of a previous attempt, if any


@pg_boundary
class FollowUpStore:
    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    async def plan(self, lead_id: int, planned: list[Planned], now: datetime, reason: str) -> None:
        await self.pool.execute(
            PLAN,
            lead_id,
            [p.as_json() for p in planned],
            now,
            reason,
            list(SILENCE_KINDS),
            timeout=self.timeout,
        )

    async def cancel_all(self, lead_id: int, now: datetime, reason: str) -> None:
        """Every pending follow-up of the lead, meeting ones too (an opt-out, a pause)."""
        await self.pool.execute(
            """UPDATE follow_ups SET status = 'cancelled', last_error = $3, updated_at = $2
                WHERE lead_id = $1 AND status = 'pending'""",
            lead_id,
            now,
            reason,
            timeout=self.timeout,
        )

    async def claim(self, now: datetime, limit: int, stuck_after: float) -> list[Claimed]:
        rows = await self.pool.fetch(CLAIM, now, limit, stuck_after, timeout=self.timeout)
        return [
            Claimed(
                r["id"],
                r["lead_id"],
                r["kind"],
                r["step"],
                r["due_at"],
                _obj(r["payload"]),
                r["attempts"],
                r["created_at"],
                r["phone_number"],
                r["last_send"],
            )
            for r in rows
        ]

    async def lead(self, lead_id: int) -> tuple[dict[str, Any], datetime | None]:
        """The lead and when it last wrote to us."""
        row = await self.pool.fetchrow(
            """SELECT to_jsonb(l) AS lead,
                      (SELECT max(received_at) FROM messages m WHERE m.lead_id = l.id AND m.direction = 'in') AS wrote
                 FROM leads l WHERE l.id = $1""",
            lead_id,
            timeout=self.timeout,
        )
        assert row is not None
        return _obj(row["lead"]), row["wrote"]

    async def sent(
        self, f: Claimed, outbox_id: int, provider_id: str | None, now: datetime, nxt: list[Planned]
    ) -> None:
        """Done: the follow-up, its outbox row, and the next of its sequence, at once (one
        statement: a crash between them would leave a sent row behind a follow-up that is
        sent again)."""
        await self.pool.execute(
            """WITH f AS (
                   UPDATE follow_ups SET status = 'sent', sent_at = $3, updated_at = $3, last_error = NULL
                    WHERE id = $1),
               o AS (
                   UPDATE outbox SET status = CASE WHEN status = $7 THEN $7 ELSE $8 END,
                          provider_id = $4, sent_at = $3
                    WHERE id = $2)
               INSERT INTO follow_ups (lead_id, kind, step, due_at, payload, created_at, updated_at)
               SELECT $5, p.kind, p.step, p.due_at, coalesce(p.payload, '{}'), $3, $3
                 FROM jsonb_to_recordset($6::jsonb) AS p(kind text, step int, due_at timestamptz, payload jsonb)""",
            f.id,
            outbox_id,
            now,
            provider_id,
            f.lead_id,
            [p.as_json() for p in nxt],
            Status.LOCAL,
            Status.SENT,
            timeout=self.timeout,
        )

    async def retry_at(self, f: Claimed, due_at: datetime, now: datetime, error: str | None, *, attempt: bool) -> None:
        """Back to pending; `attempt` False when nothing was tried (closed hours, a live
        turn), so it does not count against max_attempts."""
        await self.pool.execute(
            """UPDATE follow_ups SET status = 'pending', due_at = $2, updated_at = $3,
                      last_error = coalesce($4, last_error),
                      attempts = attempts - CASE WHEN $5 THEN 0 ELSE 1 END
                WHERE id = $1""",
            f.id,
            due_at,
            now,
            error,
            attempt,
            timeout=self.timeout,
        )

    async def finish(self, f: Claimed, status: str, now: datetime, error: str | None) -> None:
        """failed or cancelled, with why."""
        await self.pool.execute(
            "UPDATE follow_ups SET status = $2, updated_at = $3, last_error = $4 WHERE id = $1",
            f.id,
            status,
            now,
            error,
            timeout=self.timeout,
        )


def _obj(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return dict(json.loads(value))
    return dict(value or {})
