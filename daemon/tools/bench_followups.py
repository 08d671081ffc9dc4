"""`sdrctl bench --followups N`: how many due follow-ups one daemon claims and sends per
second, against the fake Evolution API over real HTTP. N silent leads each get one due
re-engagement; the daemon's executor runs passes (as its scheduler job does, without the
poll interval's wait) until every one is sent, at the profile's concurrency and batch."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from daemon.config import Config
from daemon.testing.fake_evolution import run_fake_evolution
from daemon.tools.inprocess import inprocess_daemon, with_changes


@dataclass(frozen=True)
class FollowUpBench:
    count: int
    seconds: float
    passes: int
    sent: int
    concurrency: int
    batch: int

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


async def run_followups(config: Config, count: int) -> FollowUpBench:
    config = with_changes(config, "followups", enabled=False)  # our loop drives the executor
    async with run_fake_evolution(keep_bodies=False) as fake, inprocess_daemon(config, evolution_url=fake.url) as d:
        rt = d.runtime
        now = datetime.now(UTC)
        due = rt.followups.hours.next_opening(now)  # an open hour, so nothing is deferred
        async with rt.pool.acquire() as conn:
            await conn.execute(
                """WITH l AS (
                       INSERT INTO leads (phone_number, name, stage, bill_value)
                       SELECT '55119' || lpad(g::text, 8, '0'), 'Lead ' || g, 'ask_bill', 300 + g % 700
                         FROM generate_series(1, $1) g RETURNING id, phone_number),
                   c AS (INSERT INTO conversations (lead_id, phone_number) SELECT id, phone_number FROM l)
                   INSERT INTO follow_ups (lead_id, kind, step, due_at, created_at)
                   SELECT id, 'reengage', 1, $2::timestamptz, $2::timestamptz - interval '1 hour' FROM l""",
                count,
                due,
            )
        rt.followups.clock = lambda: due + timedelta(seconds=1)
        start = time.perf_counter()
        passes = 0
        while await rt.followups.run_due():
            passes += 1
        seconds = time.perf_counter() - start
        async with rt.pool.acquire() as conn:
            sent = await conn.fetchval(
                "SELECT count(*) FROM follow_ups WHERE kind = 'reengage' AND step = 1 AND status = 'sent'"
            )
        k = config.profile.followups
        return FollowUpBench(count, seconds, passes, int(sent), k.concurrency, k.claim_batch)
