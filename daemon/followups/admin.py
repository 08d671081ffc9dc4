"""What an operator does to follow-ups by hand (`sdrctl followups`): list them and cancel
pending ones. The SQL and the rules live here and return data; the CLI only renders.

Cancelling is one conditional UPDATE (`status = 'pending'`): a daemon that claims the row
at the same moment wins or loses cleanly, and an operator never cancels a message that is
being sent (status executing)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from daemon.errors import ConfigError, NotFoundError
from daemon.identity import IDENTITY_HELP, parse_identity

STATUSES = ("pending", "executing", "sent", "failed", "cancelled")
CANCEL_REASON = "cancelled by an operator (sdrctl followups cancel)"

COLUMNS = """f.id, f.lead_id, l.phone_number AS phone, coalesce(l.name, l.push_name) AS name, f.kind,
       f.step, f.status, f.due_at, f.attempts, f.last_error, f.claimed_at, f.sent_at"""

# Pending rows only; `which` is one of the two fixed filters below, never user text. The
# reason goes where the daemon writes why it cancelled one, so `list` shows who did.
CANCEL = f"""
WITH f AS (
    UPDATE follow_ups SET status = 'cancelled', updated_at = now(), last_error = $2
     WHERE {{which}} AND status = 'pending'
    RETURNING *)
SELECT {COLUMNS} FROM f JOIN leads l ON l.id = f.lead_id ORDER BY f.due_at, f.id
"""
BY_ID, BY_LEAD = "id = $1", "lead_id = $1"


@dataclass(frozen=True)
class FollowUp:
    id: int
    lead_id: int
    phone: str
    name: str | None  # the name the lead told us, else its WhatsApp profile name
    kind: str
    step: int
    status: str
    due_at: datetime
    attempts: int
    last_error: str | None
    claimed_at: datetime | None
    sent_at: datetime | None


@dataclass(frozen=True)
class Cancelled:
    cancelled: list[FollowUp]  # were pending, now cancelled
    busy: list[FollowUp]  # executing: being sent right now, left alone
    settled: list[FollowUp]  # sent, failed or already cancelled: nothing to do


def check_status(status: str) -> str:
    if status not in STATUSES:
        raise ConfigError(f"--status {status!r}: use one of {', '.join(STATUSES)}")
    return status


def normalise_phone(text: str) -> str:
    """The lead's identity as stored: '+55 (11) 98765-4321' -> '5511987654321', or a LID jid."""
    phone = parse_identity(text)
    if phone is None:
        raise ConfigError(f"--lead {text!r}: must be {IDENTITY_HELP}")
    return phone


def _rows(records: list[asyncpg.Record]) -> list[FollowUp]:
    return [FollowUp(**dict(r)) for r in records]


async def list_follow_ups(
    conn: asyncpg.Connection, *, status: str | None = None, phone: str | None = None, limit: int = 50
) -> list[FollowUp]:
    """Pending ones soonest due first (what goes out next); otherwise newest due first
    (what just happened). The WHERE holds only the filters given, so the partial index
    on pending due_at serves `--status pending`."""
    where: list[str] = []
    args: list[object] = []
    if status is not None:
        args.append(check_status(status))
        where.append(f"f.status = ${len(args)}")
    if phone is not None:
        args.append(phone)
        where.append(f"l.phone_number = ${len(args)}")
    order = "ASC" if status == "pending" else "DESC"
    args.append(limit)
    query = (
        f"SELECT {COLUMNS} FROM follow_ups f JOIN leads l ON l.id = f.lead_id"
        f" {'WHERE ' + ' AND '.join(where) if where else ''}"
        f" ORDER BY f.due_at {order}, f.id {order} LIMIT ${len(args)}"
    )
    return _rows(await conn.fetch(query, *args))


async def cancel_one(conn: asyncpg.Connection, follow_up_id: int) -> Cancelled:
    cancelled = _rows(await conn.fetch(CANCEL.format(which=BY_ID), follow_up_id, CANCEL_REASON))
    if cancelled:
        return Cancelled(cancelled, [], [])
    # Not pending (any more): read it as it is now, to say why.
    rows = _rows(
        await conn.fetch(
            f"SELECT {COLUMNS} FROM follow_ups f JOIN leads l ON l.id = f.lead_id WHERE f.id = $1", follow_up_id
        )
    )
    if not rows:
        raise NotFoundError(f"no follow-up with id {follow_up_id}; `sdrctl followups list` shows them")
    busy = [f for f in rows if f.status == "executing"]
    return Cancelled([], busy, [f for f in rows if f.status != "executing"])


async def cancel_lead(conn: asyncpg.Connection, phone: str) -> Cancelled:
    """Every pending follow-up of the lead; executing ones are reported, not touched."""
    lead_id = await conn.fetchval("SELECT id FROM leads WHERE phone_number = $1", phone)
    if lead_id is None:
        raise NotFoundError(f"no lead with phone {phone}; `sdrctl followups list` shows the leads with follow-ups")
    cancelled = _rows(await conn.fetch(CANCEL.format(which=BY_LEAD), lead_id, CANCEL_REASON))
    busy = _rows(
        await conn.fetch(
            f"SELECT {COLUMNS} FROM follow_ups f JOIN leads l ON l.id = f.lead_id"
            " WHERE f.lead_id = $1 AND f.status = 'executing' ORDER BY f.id",
            lead_id,
        )
    )
    return Cancelled(cancelled, busy, [])
