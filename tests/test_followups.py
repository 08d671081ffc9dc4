"""Follow-ups against real PostgreSQL and Redis, with a controllable clock: planned when a
turn ends, sent exactly once by whichever daemon claims them, within business hours."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from daemon.embedded import Endpoints
from daemon.followups.executor import FollowUpExecutor
from daemon.followups.jobs import CrmPush, KnowledgeRefresh
from daemon.runtime import Runtime
from daemon.testing.servers import background_server, quiet_server
from tests.helpers import (
    FixedClock,
    event,
    fetch,
    make_config,
    metric,
    pin_clock,
    run_daemon,
    run_fake_evolution,
    wait_for,
)

PHONE = "5511944443333"
SP = ZoneInfo("America/Sao_Paulo")
FAR_FUTURE = datetime(2100, 1, 1, tzinfo=UTC)


def executor(rt: Runtime, clock: FixedClock) -> FollowUpExecutor:
    """A daemon's follow-up executor on a fake clock (the scheduler's own job is off)."""
    return FollowUpExecutor(rt.config, rt.followup_store, rt.outbox, rt.locks, rt.metrics, clock)


async def post(url: str, *events: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        for e in events:
            assert (await http.post("/webhook/evolution", json=e)).status_code == 200


async def follow_ups(endpoints: Endpoints) -> list[Any]:
    return await fetch(endpoints.database_url, "SELECT * FROM follow_ups ORDER BY id")


async def a_silent_lead(d: Any, endpoints: Endpoints, fake: Any) -> Any:
    """A lead that said hello and got asked its name, then went quiet."""
    await post(d.url, event(PHONE, "Oi"))
    await wait_for(lambda: asyncio.sleep(0, fake.sent), timeout=20)
    [planned] = await wait_for(lambda: follow_ups(endpoints))
    return planned


async def test_a_silent_lead_gets_its_re_engagement_once_even_from_two_daemons(clean: Endpoints) -> None:
    async with run_fake_evolution() as fake:
        cfg = make_config(clean, SDR_EVOLUTION_BASE_URL=fake.url, SDR_FOLLOWUPS_ENABLED="false")
        async with run_daemon(cfg) as d1, run_daemon(cfg) as d2:
            planned = await a_silent_lead(d1, clean, fake)
            [turn] = await fetch(clean.database_url, "SELECT finished_at FROM turns")
            hours = d1.runtime.followups.hours
            assert planned["kind"] == "reengage" and planned["step"] == 1 and planned["status"] == "pending"
            assert planned["due_at"] == hours.next_opening(turn["finished_at"] + timedelta(minutes=30))

            clock = FixedClock(planned["due_at"] - timedelta(seconds=1))
            early = await asyncio.gather(executor(d1.runtime, clock).run_due(), executor(d2.runtime, clock).run_due())
            clock.now = planned["due_at"]  # an open instant (a second later may be closing time)
            claims = await asyncio.gather(executor(d1.runtime, clock).run_due(), executor(d2.runtime, clock).run_due())
            again = await asyncio.gather(executor(d1.runtime, clock).run_due(), executor(d2.runtime, clock).run_due())
            rows = await follow_ups(clean)
    assert early == [0, 0]
    assert sorted(claims) == [0, 1] and again == [0, 0]  # one daemon claimed it, once
    texts = [s["text"] for s in fake.sent]
    assert len(texts) == 2 and texts[1].startswith("Oi! Ficou alguma dúvida sobre a energia solar?")
    assert "{" not in texts[1] and "conta de" not in texts[1]  # no bill yet: that sentence is dropped
    first, second = rows
    assert first["status"] == "sent" and first["attempts"] == 1
    assert second["kind"] == "reengage" and second["step"] == 2 and second["status"] == "pending"
    assert second["due_at"] == hours.next_opening(clock.now + timedelta(hours=24))


async def test_a_lead_who_answers_cancels_the_pending_re_engagement(clean: Endpoints) -> None:
    async with run_fake_evolution() as fake:
        cfg = make_config(clean, SDR_EVOLUTION_BASE_URL=fake.url, SDR_FOLLOWUPS_ENABLED="false")
        async with run_daemon(cfg) as d:
            planned = await a_silent_lead(d, clean, fake)
            # The lead writes; before its turn even ends, the old follow-up must not go out.
            await post(d.url, event(PHONE, "Meu nome é Rita"))
            clock = FixedClock(planned["due_at"] + timedelta(seconds=1))
            await executor(d.runtime, clock).run_due()
            await wait_for(lambda: asyncio.sleep(0, len(fake.sent) >= 2), timeout=20)
            rows = await wait_for(lambda: _when(follow_ups(clean), lambda r: len(r) == 2))
    old, new = rows
    assert old["status"] == "cancelled" and old["last_error"] == "the lead wrote again"
    assert new["kind"] == "reengage" and new["step"] == 1 and new["status"] == "pending"
    assert not [s for s in fake.sent if "Ficou alguma dúvida" in s["text"]]


async def test_a_follow_up_due_at_night_is_sent_at_the_next_opening(clean: Endpoints) -> None:
    async with run_fake_evolution() as fake:
        cfg = make_config(clean, SDR_EVOLUTION_BASE_URL=fake.url, SDR_FOLLOWUPS_ENABLED="false")
        async with run_daemon(cfg) as d:
            await a_silent_lead(d, clean, fake)
            friday_night = datetime(2026, 11, 27, 22, 0, tzinfo=SP)  # a Friday, 22:00
            await _set_due(clean, friday_night)
            clock = FixedClock(friday_night + timedelta(seconds=1))
            await executor(d.runtime, clock).run_due()
            [deferred] = await follow_ups(clean)
            clock.now = datetime(2026, 11, 28, 8, 0, 1, tzinfo=SP)  # Saturday, opening
            await executor(d.runtime, clock).run_due()
            rows = await follow_ups(clean)
    assert deferred["status"] == "pending" and deferred["attempts"] == 0
    assert deferred["due_at"] == datetime(2026, 11, 28, 8, 0, tzinfo=SP)
    assert rows[0]["status"] == "sent" and len(fake.sent) == 2


async def test_a_failing_send_is_retried_with_backoff_then_stops_at_max_attempts(clean: Endpoints) -> None:
    async with run_fake_evolution() as fake:
        cfg = make_config(
            clean,
            SDR_EVOLUTION_BASE_URL=fake.url,
            SDR_FOLLOWUPS_ENABLED="false",
            SDR_FOLLOWUPS_MAX_ATTEMPTS="3",
            SDR_FOLLOWUPS_RETRY_BACKOFF="60",
        )
        async with run_daemon(cfg) as d:
            await a_silent_lead(d, clean, fake)
            start = datetime(2026, 11, 25, 10, 0, tzinfo=SP)  # a Wednesday, open
            await _set_due(clean, start)
            fake.answers = [503] * 9  # each run: sendText tries 3 times (send_attempts), all refused
            clock = FixedClock(start)
            states = []
            for wait in (0, 60, 120, 240):  # the backoff doubles: 60 s, then 120 s
                clock.now += timedelta(seconds=wait)
                await executor(d.runtime, clock).run_due()
                [row, *_] = await follow_ups(clean)
                states.append((row["status"], row["attempts"], row["due_at"] - start))
            outbox = await fetch(clean.database_url, "SELECT status FROM outbox WHERE follow_up_id IS NOT NULL")
    assert states[0] == ("pending", 1, timedelta(seconds=60))
    assert states[1] == ("pending", 2, timedelta(seconds=180))
    assert states[2][:2] == ("failed", 3) and states[3][:2] == ("failed", 3)  # no 4th try
    assert [r["status"] for r in outbox] == ["failed"] * 3 and len(fake.sent) == 1  # the first reply only


async def test_a_follow_up_stuck_executing_is_reclaimed(clean: Endpoints) -> None:
    async with run_fake_evolution() as fake:
        cfg = make_config(
            clean, SDR_EVOLUTION_BASE_URL=fake.url, SDR_FOLLOWUPS_ENABLED="false", SDR_FOLLOWUPS_STUCK_AFTER="300"
        )
        async with run_daemon(cfg) as d:
            await a_silent_lead(d, clean, fake)
            now = datetime(2026, 11, 25, 10, 0, tzinfo=SP)
            await fetch(
                clean.database_url,
                "UPDATE follow_ups SET status = 'executing', claimed_at = $1, attempts = 1, due_at = $1",
                now - timedelta(seconds=200),
            )
            fresh = await executor(d.runtime, FixedClock(now)).run_due()  # its daemon may still be at it
            reclaimed = await executor(d.runtime, FixedClock(now + timedelta(seconds=101))).run_due()
            [row, *_] = await follow_ups(clean)
    assert fresh == 0 and reclaimed == 1
    assert row["status"] == "sent" and row["attempts"] == 2 and len(fake.sent) == 2


async def test_a_reclaimed_follow_up_whose_send_had_started_is_never_sent_twice(clean: Endpoints) -> None:
    async with run_fake_evolution() as fake:
        cfg = make_config(clean, SDR_EVOLUTION_BASE_URL=fake.url, SDR_FOLLOWUPS_ENABLED="false")
        async with run_daemon(cfg) as d:
            [planned] = [await a_silent_lead(d, clean, fake)]
            now = datetime(2026, 11, 25, 10, 0, tzinfo=SP)
            await fetch(
                clean.database_url,
                "UPDATE follow_ups SET status = 'executing', claimed_at = $1, attempts = 1",
                now - timedelta(hours=1),
            )
            await fetch(
                clean.database_url,
                "INSERT INTO outbox (lead_id, phone_number, body, status, follow_up_id) "
                "VALUES ($1, $2, 'oi', 'sending', $3)",
                planned["lead_id"],
                PHONE,
                planned["id"],
            )
            await executor(d.runtime, FixedClock(now)).run_due()
            [row] = await follow_ups(clean)
    assert row["status"] == "failed" and "not sent again" in row["last_error"]
    assert len(fake.sent) == 1


# Whatever day the suite runs on: the lead books a meeting (8 or 9 days ahead) on a Friday,
# on a Saturday evening (closed) and on a Sunday (closed all day, no holiday near), and gets
# the confirmation and reminders that business hours (Mon-Sat, 08-20) allow. A meeting
# itself is booked only when business hours are open (book_meeting's rules, which the
# playbook shares): a Sunday one is a preference the consultant confirms, with no reminders.
BOOKINGS = [
    pytest.param(
        datetime(2026, 12, 4, 10, 0, tzinfo=SP),
        {  # a Saturday meeting: its 24 h reminder on Friday, its 2 h one that morning
            ("meeting_confirmation", 1): datetime(2026, 12, 4, 10, 2, tzinfo=SP),
            ("meeting_reminder", 1): datetime(2026, 12, 11, 15, 0, tzinfo=SP),
            ("meeting_reminder", 2): datetime(2026, 12, 12, 13, 0, tzinfo=SP),
        },
        8,
        id="friday",
    ),
    pytest.param(
        datetime(2026, 12, 5, 20, 30, tzinfo=SP),
        {  # a Monday meeting: the confirmation waits for Monday, the 24 h reminder (a Sunday) too
            ("meeting_confirmation", 1): datetime(2026, 12, 7, 8, 0, tzinfo=SP),
            ("meeting_reminder", 1): datetime(2026, 12, 14, 8, 0, tzinfo=SP),
            ("meeting_reminder", 2): datetime(2026, 12, 14, 13, 0, tzinfo=SP),
        },
        9,
        id="saturday-evening",
    ),
    pytest.param(
        datetime(2026, 12, 6, 11, 0, tzinfo=SP),
        {  # a Tuesday meeting: reminders 24 h and 2 h before
            ("meeting_confirmation", 1): datetime(2026, 12, 7, 8, 0, tzinfo=SP),
            ("meeting_reminder", 1): datetime(2026, 12, 14, 15, 0, tzinfo=SP),
            ("meeting_reminder", 2): datetime(2026, 12, 15, 13, 0, tzinfo=SP),
        },
        9,
        id="sunday",
    ),
]


@pytest.mark.parametrize(("now", "expected", "days"), BOOKINGS)
async def test_booking_a_meeting_plans_its_confirmation_and_reminders_within_business_hours(
    clean: Endpoints, now: datetime, expected: dict[tuple[str, int], datetime], days: int
) -> None:
    async with run_fake_evolution() as fake:
        cfg = make_config(clean, SDR_EVOLUTION_BASE_URL=fake.url, SDR_FOLLOWUPS_ENABLED="false")
        async with run_daemon(cfg) as d:
            pin_clock(d.runtime, FixedClock(now))
            await post(d.url, event(PHONE, "Oi"))
            await wait_for(lambda: asyncio.sleep(0, fake.sent), timeout=20)
            await fetch(clean.database_url, "UPDATE leads SET stage = 'offer_meeting', name = 'Rita', bill_value = 480")
            d.runtime.leads.clear_local()
            await d.runtime.leads.invalidate(PHONE)
            meeting_day = (now + timedelta(days=days)).date()
            await post(d.url, event(PHONE, f"Pode ser dia {meeting_day:%d/%m} às 15h"))
            await wait_for(lambda: asyncio.sleep(0, len(fake.sent) >= 2), timeout=20)
            [lead] = await fetch(clean.database_url, "SELECT * FROM leads")
            rows = await wait_for(lambda: _when(follow_ups(clean), lambda r: len(r) >= 1 + len(expected)))
            planned = {(r["kind"], r["step"]): r["due_at"] for r in rows if r["status"] == "pending"}
            for due in sorted(planned.values()):
                await executor(d.runtime, FixedClock(due + timedelta(seconds=1))).run_due()
            left = [r for r in await follow_ups(clean) if r["status"] == "pending"]
    meeting = datetime(meeting_day.year, meeting_day.month, meeting_day.day, 15, tzinfo=SP)
    assert lead["stage"] == "booked" and lead["meeting_at"] == meeting
    assert planned == expected
    texts = [s["text"] for s in fake.sent[2:]]
    assert len(texts) == len(expected) and left == []
    assert texts[0].startswith("Confirmado, Rita! Sua conversa com um consultor está marcada para")
    assert f"{meeting_day:%d/%m}, às 15h" in texts[0]
    assert all(t.startswith("Oi, Rita! Lembrete: sua conversa com um consultor é") for t in texts[1:])


@pytest.mark.parametrize(
    ("now", "outcome", "moved_to"),
    [
        pytest.param(datetime(2026, 11, 25, 10, 0, tzinfo=SP), "sent", None, id="open"),  # a Wednesday
        pytest.param(
            datetime(2026, 12, 5, 20, 30, tzinfo=SP), "deferred", datetime(2026, 12, 7, 8, 0, tzinfo=SP), id="closed"
        ),  # Saturday evening -> Monday
    ],
)
async def test_the_scheduler_inside_serve_sends_due_follow_ups_by_itself(
    clean: Endpoints, now: datetime, outcome: str, moved_to: datetime | None
) -> None:
    async with run_fake_evolution() as fake:
        cfg = make_config(clean, SDR_EVOLUTION_BASE_URL=fake.url, SDR_FOLLOWUPS_POLL_INTERVAL="0.2")
        async with run_daemon(cfg) as d:
            await a_silent_lead(d, clean, fake)
            # The scheduler's executor goes on the test's clock; meanwhile the row is due on neither.
            await _set_due(clean, FAR_FUTURE)
            d.runtime.followups.clock = FixedClock(now)
            await _set_due(clean, now - timedelta(seconds=1))
            async with httpx.AsyncClient(base_url=d.url) as http:

                async def counted() -> str:  # counted once the run is over: sent or moved
                    text = (await http.get("/metrics")).text
                    return text if metric(text, "sdr_followups_total", kind="reengage", outcome=outcome) else ""

                text = await wait_for(counted)
            [row] = [r for r in await follow_ups(clean) if r["step"] == 1]
    assert metric(text, "sdr_jobs_total", job="followups", outcome="ok") >= 1
    assert metric(text, "sdr_followups_total", kind="reengage", outcome=outcome) == 1
    if outcome == "sent":
        assert row["status"] == "sent" and len(fake.sent) == 2
    else:  # outside business hours: moved to the next opening instead
        assert row["status"] == "pending" and row["due_at"] == moved_to and len(fake.sent) == 1


async def test_the_knowledge_refresh_drops_the_cache_when_the_table_changes(clean: Endpoints) -> None:
    cfg = make_config(clean, SDR_FOLLOWUPS_ENABLED="false")
    async with run_daemon(cfg) as d:
        kb = d.runtime.knowledge
        refresh = KnowledgeRefresh(d.runtime.pool, kb.invalidate_all)
        await refresh()  # remembers the table's version
        await kb.set("placas", [])
        await refresh()  # unchanged: kept
        kept = await kb.get("placas")
        await fetch(clean.database_url, "UPDATE knowledge_base SET updated_at = now() WHERE id = 1")
        await refresh()
        gone = await kb.get("placas")
        left = await d.runtime.redis.keys(kb.redis_key("*"))
    assert kept == [] and gone is None and left == []


async def test_the_crm_push_sends_changed_leads_in_batches_and_retries(clean: Endpoints) -> None:
    received: list[dict[str, Any]] = []
    answers = [503]

    async def crm(request: Request) -> JSONResponse:
        if answers:
            return JSONResponse({"error": "busy"}, status_code=answers.pop(0))
        received.append(await request.json())
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/leads", crm, methods=["POST"])])
    async with background_server(quiet_server(app)) as url:
        cfg = make_config(clean, SDR_FOLLOWUPS_ENABLED="false")
        async with run_daemon(cfg) as d:
            await fetch(
                clean.database_url,
                "INSERT INTO leads (phone_number, name, bill_value) "
                "SELECT '55119' || g, 'Lead ' || g, 100 + g FROM generate_series(1, 5) g",
            )
            push = CrmPush(d.runtime.pool, f"{url}/leads", batch=2, concurrency=2, attempts=3, timeout=5, backoff=0.01)
            try:
                first = await push()
                second = await push()  # nothing changed since
                await fetch(
                    clean.database_url, "UPDATE leads SET stage = 'booked', updated_at = now() WHERE name = 'Lead 3'"
                )
                third = await push()
            finally:
                await push.close()
    assert first == 5 and second == 0 and third == 1
    pushed = [lead["name"] for body in received for lead in body["leads"]]
    assert sorted(pushed[:5]) == [f"Lead {i}" for i in range(1, 6)] and pushed[5:] == ["Lead 3"]
    assert max(len(body["leads"]) for body in received) == 2
    assert received[-1]["leads"][0]["stage"] == "booked" and received[-1]["leads"][0]["bill_value"] == "103.00"


async def _set_due(endpoints: Endpoints, when: datetime) -> None:
    await fetch(endpoints.database_url, "UPDATE follow_ups SET due_at = $1", when)


async def _when(rows: Any, ok: Any) -> Any:
    found = await rows
    return found if found and ok(found) else None


async def test_a_follow_up_waits_while_a_live_turn_holds_the_lead(clean: Endpoints) -> None:
    async with run_fake_evolution() as fake:
        cfg = make_config(
            clean, SDR_EVOLUTION_BASE_URL=fake.url, SDR_FOLLOWUPS_ENABLED="false", SDR_FOLLOWUPS_BUSY_DELAY="30"
        )
        async with run_daemon(cfg) as d:
            await a_silent_lead(d, clean, fake)
            now = datetime(2026, 11, 25, 10, 0, tzinfo=SP)
            await _set_due(clean, now)
            lease = await d.runtime.locks.try_acquire(PHONE)  # a turn is running
            assert lease is not None
            await executor(d.runtime, FixedClock(now)).run_due()
            [waiting] = await follow_ups(clean)
            await d.runtime.locks.release(PHONE, lease.token)
            await executor(d.runtime, FixedClock(now + timedelta(seconds=31))).run_due()
            [row, *_] = await follow_ups(clean)
    assert waiting["status"] == "pending" and waiting["attempts"] == 0
    assert waiting["due_at"] == now + timedelta(seconds=30)
    assert row["status"] == "sent" and len(fake.sent) == 2
