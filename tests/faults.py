"""The fault suite's harness: 3 `sdrctl serve` processes sharing one embedded PostgreSQL
and one Redis (append-only file on), a fake Evolution API over real HTTP, a load balancer
that retries a refused webhook on another daemon (as Evolution retries), and a bursty
workload of simulated leads. After a scenario, `verify` checks every promise from the
database and the fake's deliveries; `SUMMARY` collects one row per scenario for the end
of the run."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from daemon import migrations
from daemon.config import load_profile
from daemon.embedded import EmbeddedPostgres, EmbeddedRedis
from daemon.testing.fake_evolution import FakeEvolution
from daemon.testing.servers import background_server, free_port, quiet_server
from tests.helpers import ServeProcess, event, start_serve

SUMMARY: list[dict[str, Any]] = []
DAEMONS = 3
REPLY_WAIT = 30.0  # how long a lead waits for a reply before writing again anyway
PROFILE = "recommended"  # its 1 s window keeps a burst whole when a webhook is retried elsewhere


@dataclass
class Cluster:
    root: Path
    pg: EmbeddedPostgres
    redis: EmbeddedRedis
    db_url: str = ""
    redis_url: str = ""
    fake: FakeEvolution = field(default_factory=FakeEvolution)
    fake_port: int = 0
    daemons: list[ServeProcess] = field(default_factory=list)
    overrides: dict[str, str] = field(default_factory=dict)  # a scenario's own settings
    probes: list[str] = field(default_factory=list)  # ids of webhooks a fault posted itself
    _probe_bodies: list[dict[str, Any]] = field(default_factory=list)
    _fake_server: contextlib.AbstractAsyncContextManager[str] | None = None
    _rr: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def env(self) -> dict[str, str]:
        return {
            "SDR_DATABASE_URL": self.db_url,
            "SDR_REDIS_URL": self.redis_url,
            "SDR_EVOLUTION_BASE_URL": f"http://127.0.0.1:{self.fake_port}",
            "SDR_TIMEOUTS_EVOLUTION_SEND": "1.0",
            "SDR_TIMEOUTS_DATABASE": "2.0",
            "SDR_LIMITS_REDELIVER_INTERVAL": "0.5",
            "SDR_LIMITS_REDELIVER_BACKOFF": "0.5",
            "SDR_BUFFER_SWEEP_INTERVAL": "2.0",
            "SDR_FOLLOWUPS_ENABLED": "false",
            "SDR_LIMITS_LEAD_RATE": "0",
            **self.overrides,
        }

    async def start_fake(self) -> None:
        self._fake_server = background_server(quiet_server(self.fake.app(), port=self.fake_port))
        await self._fake_server.__aenter__()

    async def stop_fake(self) -> None:
        if self._fake_server is not None:
            await self._fake_server.__aexit__(None, None, None)
            self._fake_server = None

    async def start_daemon(self, i: int) -> ServeProcess:
        serve = await start_serve(self.env, self.root / f"serve-{i}.log", profile=PROFILE)
        await serve.wait_ready()
        return serve

    async def kill_and_restart(self, i: int, down_for: float) -> None:
        self.daemons[i].proc.send_signal(signal.SIGKILL)
        await self.daemons[i].proc.wait()
        await asyncio.sleep(down_for)
        self.daemons[i] = await self.start_daemon(i)

    def pause(self, i: int) -> None:
        """SIGSTOP: the process freezes (a GC pause, a stalled VM) with its turns mid-way."""
        self.daemons[i].proc.send_signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        self.daemons[i].proc.send_signal(signal.SIGCONT)

    async def metric(self, i: int, name: str) -> dict[str, float]:
        """A counter of daemon i, by its labels (joined with ',')."""
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{self.daemons[i].url}/metrics", timeout=10)).text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    values[",".join(sample.labels.values())] = sample.value
        return values

    async def post(self, body: dict[str, Any], http: httpx.AsyncClient, deadline: float) -> None:
        """Delivers a webhook like Evolution does: to any daemon, again on another after a
        refusal (503) or a broken connection, until it is accepted or the deadline."""
        while True:
            serve = self.daemons[next(self._rr) % len(self.daemons)]
            try:
                resp = await http.post(f"{serve.url}/webhook/evolution", json=body, timeout=5)
                if resp.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"webhook {body['data']['key']['id']} never accepted")
            await asyncio.sleep(0.05)

    async def probe(self, i: int) -> int:
        """A webhook posted to daemon i (while a dependency is down: it must get 503)."""
        # Lead 0's phone; not a phrase that asks for a person ("tem alguém aí?" would pause it).
        body = event("5511900000000", "oi, tudo bem por aí?", message_id=f"PROBE{len(self.probes)}")
        self.probes.append(body["data"]["key"]["id"])
        self._probe_bodies.append(body)
        async with httpx.AsyncClient() as http:
            return (await http.post(f"{self.daemons[i].url}/webhook/evolution", json=body, timeout=10)).status_code

    async def redeliver_probes(self) -> None:
        """What Evolution does with a webhook that got 503: sends it again."""
        async with httpx.AsyncClient() as http:
            for body in self._probe_bodies:
                await self.post(body, http, time.monotonic() + 30)

    async def readyz(self, i: int) -> tuple[int, dict[str, Any]]:
        async with httpx.AsyncClient() as http:
            resp = await http.get(f"{self.daemons[i].url}/readyz", timeout=5)
            return resp.status_code, resp.json()


@contextlib.asynccontextmanager
async def cluster(tmp: Path, **overrides: str) -> AsyncIterator[Cluster]:
    c = Cluster(tmp, EmbeddedPostgres(tmp / "pg"), EmbeddedRedis(tmp / "redis", start_timeout=15))
    c.overrides = overrides
    c.db_url = await asyncio.to_thread(c.pg.start)
    c.redis_url = await asyncio.to_thread(c.redis.start)
    try:
        conn = await asyncpg.connect(c.db_url)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()
        c.fake_port = free_port()
        await c.start_fake()
        c.daemons = list(await asyncio.gather(*(c.start_daemon(i) for i in range(DAEMONS))))
        yield c
    finally:
        for serve in c.daemons:
            if serve.proc.returncode is None:
                serve.proc.send_signal(signal.SIGCONT)  # a paused one too
                serve.proc.send_signal(signal.SIGTERM)
        for serve in c.daemons:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(serve.proc.wait(), 30)
            if serve.proc.returncode is None:
                serve.proc.kill()
        await c.stop_fake()
        await asyncio.to_thread(c.redis.stop)
        await asyncio.to_thread(c.pg.stop)


@dataclass
class Workload:
    leads: int = 200
    bursts: int = 3
    duplicates: bool = False  # every webhook delivered twice (some copies late)
    late_copies: int = 0  # this many copies held back `late_by` seconds
    late_by: float = 60.0
    shuffle: bool = False  # a burst's messages delivered out of order
    seed: int = 7
    posted: dict[str, list[str]] = field(default_factory=dict)  # phone -> message ids
    bursts_sent: Counter[str] = field(default_factory=Counter)
    late: list[asyncio.Task[None]] = field(default_factory=list)
    waited_in_vain: int = 0  # bursts whose lead got no reply within REPLY_WAIT


async def drive(c: Cluster, w: Workload, deadline_s: float = 120) -> None:
    """Every lead writes `bursts` bursts of 1-3 messages, waiting for the reply between
    them (or giving up on it after a while: the checks say what happened)."""
    rng = random.Random(w.seed)
    deadline = time.monotonic() + deadline_s
    late_left = w.late_copies
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=300)) as http:

        async def lead(n: int) -> None:
            nonlocal late_left
            phone = f"55119{n:08d}"
            w.posted[phone] = []
            await asyncio.sleep(rng.uniform(0, 3))  # ramp
            for b in range(w.bursts):
                base = datetime.now(UTC).timestamp()
                events = [
                    event(phone, f"mensagem {b}.{i} do lead {n}", message_id=f"F{n}-{b}-{i}", timestamp=base + i)
                    for i in range(rng.randint(1, 3))
                ]
                w.posted[phone] += [e["data"]["key"]["id"] for e in events]
                order = rng.sample(events, len(events)) if w.shuffle else events
                before = time.time()
                for e in order:
                    await c.post(e, http, deadline)
                    if w.duplicates:
                        if late_left > 0:
                            late_left -= 1
                            w.late.append(asyncio.create_task(_later(c, e, w.late_by, deadline + w.late_by)))
                        else:
                            await c.post(e, http, deadline)
                    await asyncio.sleep(rng.uniform(0.02, 0.08))
                w.bursts_sent[phone] += 1
                if await c.fake.wait_replies(phone, 1, before, timeout=REPLY_WAIT) is None:
                    w.waited_in_vain += 1
                await asyncio.sleep(rng.uniform(0.2, 1.0))

        await asyncio.gather(*(lead(n) for n in range(w.leads)))


async def race(c: Cluster, w: Workload, deadline_s: float = 120) -> None:
    """Leads who do not wait for replies, so their bursts arrive while the previous one is
    being answered, on any daemon: `bursts` bursts of 1-3 messages 20-80 ms apart (lines
    sent in a row), each after a pause of 0.3-3 s (shorter than a turn and its settle
    window, so a new burst races the reply to the last one)."""
    rng = random.Random(w.seed)
    deadline = time.monotonic() + deadline_s
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=300)) as http:

        async def lead(n: int) -> None:
            phone = f"55118{n:08d}"
            w.posted[phone] = []
            await asyncio.sleep(rng.uniform(0, 2))  # ramp
            for b in range(w.bursts):
                base = datetime.now(UTC).timestamp()
                for i in range(rng.randint(1, 3)):
                    e = event(phone, f"linha {b}.{i} do lead {n}", message_id=f"R{n}-{b}-{i}", timestamp=base + i)
                    w.posted[phone].append(e["data"]["key"]["id"])
                    await c.post(e, http, deadline)
                    await asyncio.sleep(rng.uniform(0.02, 0.08))
                w.bursts_sent[phone] += 1
                await asyncio.sleep(rng.uniform(0.3, 3.0))

        await asyncio.gather(*(lead(n) for n in range(w.leads)))


async def _later(c: Cluster, body: dict[str, Any], delay: float, deadline: float) -> None:
    await asyncio.sleep(delay)
    async with httpx.AsyncClient() as http:  # the workload's own client is closed by then
        await c.post(body, http, deadline)


async def settle(c: Cluster, timeout: float = 90) -> None:
    """Waits until every stored message is answered and every reply is out."""
    conn = await asyncpg.connect(c.db_url)
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            open_ = await conn.fetchval(
                """SELECT (SELECT count(*) FROM messages WHERE direction = 'in' AND turn_id IS NULL)
                        + (SELECT count(*) FROM outbox WHERE status <> 'sent')"""
            )
            if open_ == 0:
                return
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def verify(c: Cluster, w: Workload, scenario: str) -> dict[str, Any]:
    conn = await asyncpg.connect(c.db_url)
    try:
        stored = await conn.fetch("SELECT provider_id FROM messages WHERE direction = 'in'")
        unanswered = await conn.fetchval("SELECT count(*) FROM messages WHERE direction = 'in' AND turn_id IS NULL")
        # A message belongs to one turn (messages.turn_id); a turn that answered messages
        # another turn also answered shows here: the turns claim more messages than exist.
        answered_twice = await conn.fetchval(
            """SELECT coalesce(sum(messages_joined), 0)
                    - (SELECT count(*) FROM messages WHERE direction = 'in' AND turn_id IS NOT NULL)
                 FROM turns"""
        )
        outbox = await conn.fetch("SELECT phone_number, body, status FROM outbox")
        turns = await conn.fetchval("SELECT count(*) FROM turns")
        # A turn that wrote no reply (only a paused or ignored lead's may: none here).
        mute = await conn.fetchval(
            """SELECT count(*) FROM turns t
                WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.turn_id = t.id)
                  AND t.outcome NOT IN ('paused', 'ignored')"""
        )
        arrivals = await conn.fetch(
            """SELECT m.provider_id, m.received_at, m.turn_id, t.written_at FROM messages m
                 LEFT JOIN turns t ON t.id = m.turn_id WHERE m.direction = 'in' ORDER BY m.received_at"""
        )
        # Every execution of a lead's turn: those written (start to write) and those whose
        # reply was thrown away (start to discard). None may overlap another of its lead,
        # except one that stopped on its own fence (its lease lapsed: a frozen process).
        overlaps = await conn.fetchval(
            """WITH runs AS (
                   SELECT lead_id, started_at AS a, coalesce(written_at, finished_at) AS b FROM turns
                   UNION ALL
                   SELECT lead_id, started_at, discarded_at FROM discarded_replies
                    WHERE started_at IS NOT NULL AND reason NOT IN ('lapsed', 'fenced'))
               SELECT count(*) FROM runs x JOIN runs y
                 ON x.lead_id = y.lead_id AND (x.a, x.b) < (y.a, y.b) AND x.a < y.b AND y.a < x.b"""
        )
        stopped = dict(
            await conn.fetch(
                "SELECT reason, count(*) FROM discarded_replies WHERE reason IN ('lapsed', 'fenced') GROUP BY 1"
            )
        )
    finally:
        await conn.close()
    posted = {m for ids in w.posted.values() for m in ids} | set(c.probes)
    stored_ids = [r["provider_id"] for r in stored]
    expected = Counter((r["phone_number"], r["body"]) for r in outbox)
    delivered = Counter((s["number"], s["text"]) for s in c.fake.sent)
    settle = load_profile(PROFILE, c.env).buffer.settle_window
    split = splits([r for r in arrivals if not r["provider_id"].startswith("PROBE")], settle)
    row = {
        "scenario": scenario,
        "leads": len(w.posted),
        "messages": len(posted),
        "stored": len(stored_ids),
        "stored twice": len(stored_ids) - len(set(stored_ids)),
        "lost": len(posted - set(stored_ids)),
        "bursts": sum(w.bursts_sent.values()),
        "replies": sum(delivered.values()),
        "turns": turns,
        # A lead's burst answered by more than one turn: what the lead sees as a split...
        "splits": split.felt,
        # ...those the buffer's rules forbid: a later message that was stored before the
        # reply to the earlier one was written (it should have joined that turn)...
        "splits against the rules": split.forbidden,
        # ...or within the settle window of the earlier one (the reply went too soon).
        "splits within the settle window": split.early,
        # A turn that answered two of a lead's bursts (after a split: the late message
        # joined the lead's next burst).
        "merged bursts": split.merged,
        "bursts never answered within 30 s": w.waited_in_vain,
        "duplicates": sum(max(0, n - expected[k]) for k, n in delivered.items()),
        "answered twice": answered_twice,
        "unanswered": unanswered,
        "turns without a reply": mute,
        "replies not delivered": sum(1 for r in outbox if r["status"] != "sent"),
        "overlapping turns": overlaps,
        "turns stopped by their fence": sum(stopped.values()),
    }
    SUMMARY.append(row)
    return row


@dataclass
class Splits:
    """How a workload's client bursts (ids <x><lead>-<burst>-<i>) were answered."""

    felt: int  # consecutive messages of one burst answered by different turns
    forbidden: int  # ...the later one stored before the earlier one's reply was written
    early: int  # ...the later one stored within the settle window of the earlier one
    merged: int  # bursts a turn answered besides its first one


def splits(arrivals: list[Any], settle: float) -> Splits:
    """With `[buffer] speculate` (the recommended profile) a reply is written only after
    `settle` seconds of the lead's silence, and only if no newer message is waiting. So a
    split is forbidden when the later message was stored before the earlier one's reply
    was written, and early when it was stored within `settle` of the earlier message (the
    reply went before the lead had been quiet that long). A split with a longer gap is what
    the rules say: two bursts. It happens when the load generator itself cannot post in
    time (it shares the machine's 2 cores with 3 daemons), so it is counted, not failed."""
    by_burst: dict[str, list[Any]] = {}
    bursts_of: dict[int, set[str]] = {}
    for r in arrivals:
        burst = r["provider_id"].rsplit("-", 1)[0]
        by_burst.setdefault(burst, []).append(r)
        if r["turn_id"] is not None:
            bursts_of.setdefault(r["turn_id"], set()).add(burst)
    felt = forbidden = early = 0
    for rows in by_burst.values():
        for a, b in itertools.pairwise(rows):
            if a["turn_id"] != b["turn_id"]:
                felt += 1
                forbidden += a["written_at"] is not None and b["received_at"] < a["written_at"]
                early += (b["received_at"] - a["received_at"]).total_seconds() < settle
    return Splits(felt, forbidden, early, sum(len(b) - 1 for b in bursts_of.values()))
