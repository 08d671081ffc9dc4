"""The fault suite: 3 daemons on one PostgreSQL and one Redis, 200 bursty leads, and a
fault in the middle of the run. After each: every message stored once, every burst
answered exactly once (no split the buffer's rules forbid, none within the settle window;
no exemption near a fault), no silence, no overlapping turns, and recovery without a hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.faults import Cluster, Workload, cluster, drive, settle, splits, verify

pytestmark = pytest.mark.faults


async def run(
    tmp_path: Path, name: str, fault: Callable[[Cluster], Awaitable[None]], w: Workload | None = None
) -> dict:
    w = w or Workload()
    async with cluster(tmp_path) as c:
        load = asyncio.create_task(drive(c, w))
        await asyncio.sleep(4)  # mid-run: every lead is writing
        await fault(c)
        await load
        if w.late:
            await asyncio.gather(*w.late)
        await settle(c)
        row = await verify(c, w, name)
        logs = "".join(s.log for s in c.daemons)
    assert "Traceback" not in logs, logs[-3000:]
    assert row["stored"] == row["messages"] and row["stored twice"] == 0 and row["lost"] == 0, str(row)
    assert row["unanswered"] == 0 and row["replies not delivered"] == 0, str(row)
    assert row["duplicates"] == 0 and row["answered twice"] == 0 and row["overlapping turns"] == 0, str(row)
    # Splits: none the rules forbid, none within the settle window. A later message that
    # reached the daemons over the settle window after the one before it (the load
    # generator itself fell behind) is a burst of its own by the rules: counted in the
    # summary, and it gets its own reply.
    assert row["splits against the rules"] == 0 and row["splits within the settle window"] == 0, str(row)
    assert row["turns without a reply"] == 0, str(row)
    # Each lead waits up to 30 s for a reply before its next burst: every one came (a
    # Redis restart made some late, until a daemon re-queued unanswered messages when
    # Redis came back). One reply per burst, one more per split, one less per merge.
    assert row["bursts never answered within 30 s"] == 0, str(row)
    assert row["replies"] == row["bursts"] + row["splits"] - row["merged bursts"], str(row)
    return row


async def test_a_daemon_killed_with_sigkill_mid_run(tmp_path: Path) -> None:
    async def fault(c: Cluster) -> None:
        await c.kill_and_restart(1, down_for=2)

    await run(tmp_path, "SIGKILL a daemon, restart it", fault)


async def test_redis_restarted_mid_run(tmp_path: Path) -> None:
    seen: dict = {}

    async def fault(c: Cluster) -> None:
        await asyncio.to_thread(c.redis.stop)
        await asyncio.sleep(1)
        seen["readyz"] = await c.readyz(0)
        seen["webhook"] = await c.probe(0)
        await asyncio.sleep(1)
        await asyncio.to_thread(c.redis.start)
        await c.redeliver_probes()

    await run(tmp_path, "restart Redis", fault)
    status, body = seen["readyz"]
    assert status == 503 and body["redis"].startswith("down") and body["database"] == "ok"
    assert seen["webhook"] == 503


async def test_postgres_restarted_mid_run(tmp_path: Path) -> None:
    seen: dict = {}

    async def fault(c: Cluster) -> None:
        await asyncio.to_thread(c.pg.stop)
        await asyncio.sleep(1)
        seen["readyz"] = await c.readyz(0)
        seen["webhook"] = await c.probe(0)
        await asyncio.sleep(1)
        await asyncio.to_thread(c.pg.start)
        await c.redeliver_probes()

    await run(tmp_path, "restart PostgreSQL", fault)
    status, body = seen["readyz"]
    assert status == 503 and body["database"].startswith("down") and body["redis"] == "ok"
    assert seen["webhook"] == 503


async def test_the_evolution_api_fails_times_out_and_refuses_connections(tmp_path: Path) -> None:
    async def fault(c: Cluster) -> None:
        c.fake.failing_status, c.fake.failing_until = 500, time.time() + 1.5
        await asyncio.sleep(1.5)
        c.fake.failing_status, c.fake.failing_until = 503, time.time() + 1.5
        await asyncio.sleep(1.5)
        c.fake.failing_status, c.fake.stall = 0, 2.0  # longer than the 1 s send timeout
        c.fake.failing_until = time.time() + 1.5
        await asyncio.sleep(1.5)
        await c.stop_fake()  # connections refused
        await asyncio.sleep(1.5)
        await c.start_fake()

    await run(tmp_path, "Evolution API 500, 503, timeouts, refused", fault)


async def test_webhooks_delivered_twice_out_of_order_and_late(tmp_path: Path) -> None:
    async def fault(c: Cluster) -> None:
        return None  # the faults are in the delivery itself

    w = Workload(duplicates=True, shuffle=True, late_copies=20, late_by=60.0)
    await run(tmp_path, "every webhook twice, out of order, 20 copies 60 s late", fault, w)


def test_splits_are_judged_by_the_settle_window_and_the_reply() -> None:
    """The verdict on one lead's burst of three (F1-0-0..2) answered by turns 1, 2, 3."""
    t0 = datetime(2026, 12, 1, 12, tzinfo=UTC)

    def msg(i: int, at: float, turn: int, written: float) -> dict:
        return {
            "provider_id": f"F1-0-{i}",
            "received_at": t0 + timedelta(seconds=at),
            "turn_id": turn,
            "written_at": t0 + timedelta(seconds=written),
        }

    # 6 s of silence, then a reply, then the next line: two bursts by the rules.
    late = splits([msg(0, 0, 1, 5.5), msg(1, 6, 2, 12)], settle=5)
    assert (late.felt, late.forbidden, late.early, late.merged) == (1, 0, 0, 0)
    # A reply written 1 s after the first line, the second at 2 s: it went too soon.
    early = splits([msg(0, 0, 1, 1), msg(1, 2, 2, 8)], settle=5)
    assert (early.felt, early.forbidden, early.early) == (1, 0, 1)
    # The second line stored before the first one's reply was written: against the rules.
    forbidden = splits([msg(0, 0, 1, 6), msg(1, 0.5, 2, 7)], settle=5)
    assert (forbidden.felt, forbidden.forbidden, forbidden.early) == (1, 1, 1)
    # A late line answered with the lead's next burst (F1-1-0): one merge.
    merged = splits([msg(0, 0, 1, 5.5), msg(1, 6, 2, 12), {**msg(0, 6.5, 2, 12), "provider_id": "F1-1-0"}], 5)
    assert (merged.felt, merged.merged) == (1, 1)
    whole = splits([msg(0, 0, 1, 6), msg(1, 0.1, 1, 6), msg(2, 0.2, 1, 6)], settle=5)
    assert (whole.felt, whole.merged) == (0, 0)
