"""Races that really race (issue #16): 3 daemons on one PostgreSQL and one Redis, leads who
do not wait for their replies (a new burst arrives while the last one is being answered,
on any daemon), and one daemon frozen by SIGSTOP while it has turns in flight, for three
times the lead lock's TTL, then resumed (twice): it wakes up believing it still holds its leads.

Guarded, nothing goes wrong: no message answered twice, no duplicate send, no overlapping
turns, no split the buffer's rules forbid, nothing lost or unanswered, and only the frozen
daemon's turns are stopped by their fence. Then each guard is switched off in turn
(`SDRCTL_TEST_UNGUARDED`, daemon/unguarded.py) and the same run must show the failure that
guard prevents: the check is only worth something if it can fail."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults import Cluster, Workload, cluster, race, settle, verify

pytestmark = pytest.mark.faults

TTL = 2.0  # the lead lock's TTL here (the recommended profile's is 10 s): a pause past it is short
RACE = {
    "SDR_TIMEOUTS_REDIS_LOCK_TTL": str(TTL),
    # A model's latency without a model (a hosted LLM's 1-3 s): turns long enough to be
    # caught mid-way, and for a lead's next burst to arrive while the agent still writes.
    "SDR_AGENT_BACKEND": "simulated",
    "SDR_AGENT_SIMULATED_LATENCY": "uniform:min=1.0,max=3.0",
    # A reply goes after 1.5 s of silence (5 s in the profile): with these leads' pauses
    # of 0.3-3 s, about half the bursts are answered before the next one, and half race it.
    "SDR_BUFFER_SETTLE_WINDOW": "1.5",
    "SDR_BUFFER_PRESENCE_SETTLE": "1.0",
}
PAUSED = 1  # the daemon frozen mid-run...
FREEZES = 2  # ...twice
# What each guard's absence must show (any one of them).
BREAKS = {
    "lock": ("turns of running daemons fenced", "overlapping turns"),
    "fence": ("answered twice", "duplicates", "overlapping turns"),
}
SAFETY = (
    "stored twice",
    "lost",
    "unanswered",
    "replies not delivered",
    "duplicates",
    "answered twice",
    "overlapping turns",
    "splits against the rules",
)


async def _in_flight(c: Cluster, i: int) -> float:
    return sum((await c.metric(i, "sdr_turns_in_flight")).values())


async def run_race(tmp_path: Path, name: str, off: str = "") -> tuple[dict[str, Any], list[float], float]:
    """(the verdict row, turns stopped by their fence per daemon, the fewest turns in
    flight on the frozen daemon when it was frozen)."""
    overrides = {**RACE, **({"SDRCTL_TEST_UNGUARDED": off} if off else {})}
    w = Workload(leads=40, bursts=8, seed=11)
    caught = []
    async with cluster(tmp_path, **overrides) as c:
        load = asyncio.create_task(race(c, w))
        for _ in range(FREEZES):
            give_up = time.monotonic() + 30
            while (n := await _in_flight(c, PAUSED)) < 2 and time.monotonic() < give_up:
                await asyncio.sleep(0.05)
            c.pause(PAUSED)
            caught.append(n)
            await asyncio.sleep(3 * TTL)
            c.resume(PAUSED)
            await asyncio.sleep(TTL)
        await load
        await settle(c)
        row = await verify(c, w, name)
        stopped = [sum((await c.metric(i, "sdr_turns_fenced_total")).values()) for i in range(len(c.daemons))]
        logs = "".join(s.log for s in c.daemons)
    assert "Traceback" not in logs, logs[-3000:]
    row["turns of running daemons fenced"] = sum(n for i, n in enumerate(stopped) if i != PAUSED)
    return row, stopped, min(caught)


def violations(row: dict[str, Any]) -> list[str]:
    return [f"{k}: {row[k]}" for k in (*SAFETY, "turns of running daemons fenced") if row[k]]


async def test_racing_leads_and_a_daemon_frozen_past_its_locks(tmp_path: Path) -> None:
    row, stopped, caught = await run_race(tmp_path, "race: leads not waiting, a daemon frozen 3x the lock TTL")
    assert caught >= 2, "the freeze caught no turn mid-way: the run proves nothing"
    assert violations(row) == [], str(row)
    assert row["stored"] == row["messages"], str(row)


@pytest.mark.parametrize("guard", sorted(BREAKS))
async def test_the_race_fails_with_a_guard_switched_off(tmp_path: Path, guard: str) -> None:
    row, _, caught = await run_race(tmp_path, f"race, {guard} switched off (must fail)", off=guard)
    assert caught >= 2, "the freeze caught no turn mid-way: the run proves nothing"
    found = [v for v in violations(row) if v.split(":")[0] in BREAKS[guard]]
    assert found, f"with the {guard} off, the race showed nothing wrong: {row}"
