"""`sdrctl followups list` and `cancel`, run as a user would, against rows inserted in the
real PostgreSQL: filters, order, the business time zone, JSON, cancelling by id and by
lead, the refusals and their exit codes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from daemon.embedded import Endpoints
from daemon.followups.admin import CANCEL_REASON
from tests.helpers import sdrctl

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # 09:00 in São Paulo (UTC-3 all year since 2019)
BEFORE = datetime(2000, 1, 1, tzinfo=UTC)  # every row's updated_at, so a cancel visibly moves it
MARKUP = "[bold]Bia[/bold]"  # a push name rich must print as text, not read as markup
LEADS = {"ana": ("5511900000001", "Ana"), "bia": ("5511900000002", MARKUP), "caio": ("5511900000003", None)}


@dataclass
class F:
    lead: str
    kind: str
    step: int
    status: str
    due_h: float  # hours after T0
    attempts: int = 0
    last_error: str | None = None


ROWS = [  # ids 1.. in this order
    F("ana", "reengage", 1, "sent", -24, 1),
    F("ana", "reengage", 2, "pending", 22),
    F("ana", "meeting_reminder", 1, "pending", 30),
    F("bia", "nurture", 1, "failed", -5, 3, "evolution: HTTP 500"),
    F("bia", "nurture", 2, "executing", -0.5, 1),
    F("bia", "meeting_confirmation", 1, "cancelled", -10, 0, "the lead wrote again"),
    F("bia", "reengage", 1, "pending", 1),
]
ENV = {"COLUMNS": "200"}  # rich wraps nothing in a wide terminal: the tests read whole cells


async def insert(endpoints: Endpoints) -> None:
    conn = await asyncpg.connect(endpoints.database_url)
    try:
        ids = {}
        for key, (phone, name) in LEADS.items():
            ids[key] = await conn.fetchval(
                "INSERT INTO leads (phone_number, push_name) VALUES ($1, $2) RETURNING id", phone, name
            )
        for f in ROWS:
            due = T0 + timedelta(hours=f.due_h)
            await conn.execute(
                """INSERT INTO follow_ups (lead_id, kind, step, status, due_at, attempts, last_error,
                                           claimed_at, sent_at, updated_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
                ids[f.lead],
                f.kind,
                f.step,
                f.status,
                due,
                f.attempts,
                f.last_error,
                due if f.status in ("executing", "sent") else None,
                due if f.status == "sent" else None,
                BEFORE,
            )
    finally:
        await conn.close()


async def statuses(endpoints: Endpoints) -> dict[int, tuple[str, bool, str | None]]:
    """id -> (status, whether updated_at moved, last_error)."""
    conn = await asyncpg.connect(endpoints.database_url)
    try:
        rows = await conn.fetch("SELECT id, status, updated_at, last_error FROM follow_ups ORDER BY id")
    finally:
        await conn.close()
    return {r["id"]: (r["status"], r["updated_at"] > BEFORE, r["last_error"]) for r in rows}


async def run(endpoints: Endpoints, *args: str, **env: str) -> tuple[int, str, str]:
    return await sdrctl("followups", *args, env={"SDR_DATABASE_URL": endpoints.database_url, **ENV, **env})


async def listed(endpoints: Endpoints, *args: str, **env: str) -> list[dict[str, Any]]:
    code, out, err = await run(endpoints, "list", "--json", *args, **env)
    assert code == 0, err
    doc: list[dict[str, Any]] = json.loads(out)
    return doc


# --- list ----------------------------------------------------------------------------------


async def test_list_shows_every_follow_up_newest_due_first_in_the_business_time_zone(clean: Endpoints) -> None:
    await insert(clean)
    code, out, err = await run(clean, "list")
    assert code == 0, err
    assert "7 follow-up(s), newest due first" in out and "due at (America/Sao_Paulo)" in out
    lines = [line for line in out.splitlines() if line.startswith("│")]
    assert [int(line.split("│")[1]) for line in lines] == [3, 2, 7, 5, 4, 6, 1]
    first = [c.strip() for c in lines[0].split("│")[1:-1]]
    assert first == ["3", "5511900000001", "Ana", "meeting_reminder", "1", "pending", "2026-03-03 15:00 -03", "0", ""]
    failed = next(line for line in lines if "failed" in line)
    assert MARKUP in failed and "evolution: HTTP 500" in failed and "2026-03-02 04:00 -03" in failed

    doc = await listed(clean)
    assert [d["id"] for d in doc] == [3, 2, 7, 5, 4, 6, 1]
    assert list(doc[0]) == [
        "id",
        "lead_id",
        "phone",
        "name",
        "kind",
        "step",
        "status",
        "due_at",
        "attempts",
        "last_error",
        "claimed_at",
        "sent_at",
    ]
    one = next(d for d in doc if d["id"] == 1)
    assert (one["due_at"], one["sent_at"], one["status"]) == (
        "2026-03-01T09:00:00-03:00",
        "2026-03-01T09:00:00-03:00",
        "sent",
    )
    # The time zone comes from [followups] timezone, overridable like any setting.
    utc = await listed(clean, SDR_FOLLOWUPS_TIMEZONE="UTC")
    assert next(d for d in utc if d["id"] == 1)["due_at"] == "2026-03-01T12:00:00+00:00"


async def test_list_filters_by_status_and_lead_and_limits(clean: Endpoints) -> None:
    await insert(clean)
    pending = await listed(clean, "--status", "pending")  # soonest due first: what goes out next
    assert [(d["id"], d["status"]) for d in pending] == [(7, "pending"), (2, "pending"), (3, "pending")]
    code, out, _ = await run(clean, "list", "--status", "pending")
    assert "3 follow-up(s), soonest due first" in out

    # Anything but digits is dropped from the phone number.
    bia = await listed(clean, "--lead", "+55 (11) 90000-0002")
    assert [d["id"] for d in bia] == [7, 5, 4, 6] and {d["name"] for d in bia} == {MARKUP}
    assert [d["id"] for d in await listed(clean, "--lead", "5511900000001", "--status", "sent")] == [1]
    assert await listed(clean, "--lead", "5511900000003") == []
    code, out, _ = await run(clean, "list", "--lead", "5511900000003", "--status", "failed")
    assert code == 0 and "no failed follow-ups of 5511900000003" in out

    code, out, err = await run(clean, "list", "--limit", "2")
    assert code == 0 and "2 follow-up(s)" in out and "showing the first 2; --limit shows more" in err


async def test_bad_list_options_exit_2_saying_what_is_allowed() -> None:
    code, _, err = await sdrctl("followups", "list", "--status", "done")
    assert code == 2 and "--status 'done': use one of pending, executing, sent, failed, cancelled" in err, err
    code, _, err = await sdrctl("followups", "list", "--lead", "call me")
    assert code == 2 and "--lead 'call me': must be a phone number of 8 to 15 digits" in err, err
    code, _, err = await sdrctl("followups", "list", "--limit", "0")
    assert code == 2, err
    assert "Traceback" not in err


# --- cancel --------------------------------------------------------------------------------


async def test_cancel_by_id_cancels_a_pending_one_only(clean: Endpoints) -> None:
    await insert(clean)
    code, out, err = await run(clean, "cancel", "7")
    assert code == 0, err
    assert f"cancelled follow-up 7 (reengage step 1 to 5511900000002 {MARKUP}, due 2026-03-02 10:00 -03)" in out
    after = await statuses(clean)
    assert after[7] == ("cancelled", True, CANCEL_REASON)
    assert all(not moved for i, (_, moved, _) in after.items() if i != 7)  # nothing else touched

    # Sent, failed, already cancelled: nothing to do, and that is no error.
    for fid, status in ((1, "sent"), (4, "failed"), (6, "cancelled"), (7, "cancelled")):
        code, out, err = await run(clean, "cancel", str(fid))
        assert code == 0 and f"nothing to cancel: follow-up {fid} is already {status}" in out, err
    assert await statuses(clean) == after


async def test_cancel_refuses_one_being_sent_and_an_unknown_id(clean: Endpoints) -> None:
    await insert(clean)
    code, out, err = await run(clean, "cancel", "5")
    assert code == 1 and "follow-up 5 (nurture step 2" in err and "is being sent right now" in err, err
    assert "sdrctl followups list --lead 5511900000002" in " ".join(err.split())
    assert "cancelled" not in out
    code, _, err = await run(clean, "cancel", "99")
    assert code == 1 and "no follow-up with id 99" in err
    assert all(not moved for _, moved, _ in (await statuses(clean)).values())


async def test_cancel_by_lead_cancels_its_pending_ones(clean: Endpoints) -> None:
    await insert(clean)
    code, out, err = await run(clean, "cancel", "--lead", "55 11 90000-0001")
    assert code == 0, err
    assert "cancelled follow-up 2 (reengage step 2" in out and "cancelled follow-up 3 (meeting_reminder" in out
    after = await statuses(clean)
    assert [i for i, (s, moved, _) in after.items() if moved] == [2, 3]
    assert after[2][0] == after[3][0] == "cancelled" and after[1][0] == "sent"

    code, out, err = await run(clean, "cancel", "--lead", "5511900000001")
    assert code == 0 and "nothing to cancel: 5511900000001 has no pending follow-up" in out, err
    code, out, err = await run(clean, "cancel", "--lead", "5511900000003")  # a lead without follow-ups
    assert code == 0 and "nothing to cancel" in out, err


async def test_cancel_by_lead_leaves_one_being_sent_and_exits_1(clean: Endpoints) -> None:
    await insert(clean)
    code, out, err = await run(clean, "cancel", "--lead", "5511900000002")
    assert code == 1, err
    assert "cancelled follow-up 7" in out and "follow-up 5 (nurture step 2" in err and "being sent right now" in err
    after = await statuses(clean)
    assert after[7][0] == "cancelled" and after[5] == ("executing", False, None)


async def test_cancel_needs_an_id_or_a_lead_and_a_known_lead(clean: Endpoints) -> None:
    code, _, err = await sdrctl("followups", "cancel")
    assert code == 2 and "give a follow-up ID or --lead PHONE" in err, err
    code, _, err = await sdrctl("followups", "cancel", "3", "--lead", "5511900000001")
    assert code == 2 and "give a follow-up ID or --lead PHONE" in err, err
    code, _, err = await sdrctl("followups", "cancel", "--lead", "12")
    assert code == 2 and "8 to 15 digits" in err, err
    code, _, err = await run(clean, "cancel", "--lead", "5511999999999")
    assert code == 1 and "no lead with phone 5511999999999" in err, err
    assert "Traceback" not in err
