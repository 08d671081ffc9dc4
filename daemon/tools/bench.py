"""`sdrctl bench`: simulated leads against the real pipeline, end to end over real HTTP.

Each profile under test runs as a real `sdrctl serve` subprocess on its own throw-away
embedded PostgreSQL and Redis, with the `simulated` agent (`--agent fake-llm`: the openai
backend against a fake model, replies whole vs streamed: bench_agent.py), replying to a
fake Evolution API that runs here and notes when each reply arrives. Leads type bursts at
human speed (or the quick gaps of the `quick-typers` scenario), wait for a reply, think,
and write again.
Several profiles run at the same time on the same workload and seed, so their figures are
comparable. After the run every burst is accounted for from the daemon's database and the
fake's arrivals (whole, split, lost, unanswered: bursts.py). The leads are in
workload.py, the daemon under test in daemons.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from daemon.config import Profile, load_profile
from daemon.evolution import text_event
from daemon.outbox import OPEN, Status
from daemon.store import init_connection
from daemon.testing.fake_evolution import FakeEvolution, run_fake_evolution
from daemon.testing.servers import free_port
from daemon.tools.bursts import BurstFigures, account, spread
from daemon.tools.daemons import start_daemon
from daemon.tools.loadgen import LoadResult, RawClient, post_load
from daemon.tools.workload import LeadSimulator, Tally, Workload


class Target(Protocol):
    """What the load generator needs of a daemon: a subprocess here, or one in this process
    (`sdrctl profile`)."""

    @property
    def profile(self) -> Profile: ...
    @property
    def url(self) -> str: ...
    @property
    def database_url(self) -> str: ...


# --- results ------------------------------------------------------------------------------


@dataclass
class ProfileResult:
    profile: str
    leads: int
    tally: Tally
    elapsed: float
    turns: dict[str, Any]
    bursts: BurstFigures | None = None

    def summary(self) -> dict[str, Any]:
        """The figures; `response_s` is the burst response (see daemon/tools/bursts.py),
        `lead_wait_s` what the lead waited for any reply."""
        t = self.tally
        per_burst = self.bursts.summary() if self.bursts is not None else {}
        return {
            "profile": self.profile,
            "leads": self.leads,
            "response_s": per_burst.get("response_s", spread([])),
            "lead_wait_s": per_burst.get("lead_wait_s", spread(t.responses)),
            "bursts": t.bursts,
            "messages": t.messages,
            **{k: v for k, v in per_burst.items() if k not in ("response_s", "lead_wait_s")},
            "missing_replies": t.missing,
            "webhook_errors": t.errors,
            "duplicate_posts": t.duplicates,
            "presence_posts": t.presence_posts,
            "presence_errors": t.presence_errors,
            "throughput_msgs_per_s": t.messages / self.elapsed if self.elapsed else 0.0,
            **self.turns,
        }


async def turn_stats(database_url: str, since: float) -> dict[str, Any]:
    """Per-stage figures from the turns table: what each turn recorded of itself."""
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        rows = await conn.fetch(
            """SELECT response_ms, buffer_wait_ms, window_ms, stages, timeouts, outcome,
                      cache_hits, cache_misses
                 FROM turns WHERE started_at >= to_timestamp($1)""",
            since,
        )
        unanswered = await conn.fetchval("SELECT count(*) FROM messages WHERE direction = 'in' AND turn_id IS NULL")
        failed_sends = await conn.fetchval("SELECT count(*) FROM outbox WHERE status <> $1", Status.SENT)
    finally:
        await conn.close()
    stages: dict[str, list[float]] = {}
    overhead: list[float] = []
    for r in rows:
        for stage, ms in r["stages"].items():
            stages.setdefault(stage, []).append(ms)
        if r["response_ms"] is not None and r["window_ms"] is not None:
            overhead.append(r["response_ms"] - r["window_ms"] - r["stages"].get("agent", 0.0))
    hits = sum(r["cache_hits"] for r in rows)
    lookups = hits + sum(r["cache_misses"] for r in rows)
    timed_out = sum(1 for r in rows if r["timeouts"])
    return {
        "turns": len(rows),
        "unanswered_messages": unanswered,  # left without a turn when the run ended
        "unsent_replies": failed_sends,  # replies written but not delivered (failed, or cut off)
        "timeout_rate": timed_out / len(rows) if rows else 0.0,
        "fallbacks": sum(1 for r in rows if r["outcome"] == "fallback"),
        "cache_hit_rate": hits / lookups if lookups else None,
        "buffer_wait_ms": spread([r["buffer_wait_ms"] for r in rows]),
        "overhead_ms": spread(overhead),
        "stages_ms": {stage: spread(values) for stage, values in sorted(stages.items())},
    }


async def settle(database_url: str, ids: list[str], deadline: float) -> None:
    """Waits (until `deadline`, a time.monotonic()) for every stored message of the run to
    have a turn whose reply is no longer on its way, so the last bursts are judged on
    what happened to them, not on when the leads stopped."""
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        while time.monotonic() < deadline:
            open_ = await conn.fetchval(
                """SELECT count(*) FROM messages m
                    WHERE m.direction = 'in' AND m.provider_id = ANY($1::text[])
                      AND (m.turn_id IS NULL OR EXISTS (
                           SELECT 1 FROM outbox o WHERE o.turn_id = m.turn_id AND o.status = ANY($2::text[])))""",
                ids,
                list(OPEN),  # outbox states that may still be delivered
            )
            if not open_:
                return
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def burst_records(
    database_url: str, since: float, ids: list[str], delivered_at: Mapping[str, float]
) -> tuple[dict[str, int | None], dict[int, list[float]], int]:
    """From the daemon's database: message -> turn, turn -> when each part of its reply
    reached the lead (the fake's arrival time for the key id the send returned; the
    outbox's sent_at if the fake did not see that id), and the replies thrown away since
    `since`."""
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        rows = await conn.fetch(
            "SELECT provider_id, turn_id FROM messages WHERE direction = 'in' AND provider_id = ANY($1::text[])", ids
        )
        stored = {r["provider_id"]: r["turn_id"] for r in rows}
        turns = sorted({t for t in stored.values() if t is not None})
        parts = await conn.fetch(
            """SELECT turn_id, provider_id, status, extract(epoch FROM sent_at)::float8 AS sent_at
                 FROM outbox WHERE turn_id = ANY($1::bigint[]) ORDER BY turn_id, id""",
            turns,
        )
        discarded = 0
        if await conn.fetchval("SELECT to_regclass('discarded_replies') IS NOT NULL"):
            discarded = await conn.fetchval(
                "SELECT count(*) FROM discarded_replies WHERE discarded_at >= to_timestamp($1)", since
            )
    finally:
        await conn.close()
    deliveries: dict[int, list[float]] = {}
    for r in parts:
        at = delivered_at.get(r["provider_id"]) if r["provider_id"] else None
        if at is None and r["status"] == Status.SENT:
            at = r["sent_at"]
        if at is not None:
            deliveries.setdefault(r["turn_id"], []).append(at)
    return stored, deliveries, discarded


class CpuMeter:
    """User+system CPU seconds of a daemon process and its Python children (the media
    workers; not the embedded PostgreSQL and Redis it may have started), from `start()`
    on. None where psutil or the process cannot be read."""

    def __init__(self, pid: int | None) -> None:
        self._root: Any = None
        self._start: dict[int, float] = {}
        if pid is None:
            return
        try:
            import psutil

            self._root = psutil.Process(pid)
            self._exe = self._root.exe()
        except Exception:  # noqa: BLE001 - no psutil, no process, no permission: not measured
            self._root = None

    def _times(self) -> dict[int, float] | None:
        if self._root is None:
            return None
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except Exception:  # noqa: BLE001 - the daemon is gone
            return None
        out: dict[int, float] = {}
        for p in procs:
            try:
                if p is not self._root and p.exe() != self._exe:
                    continue
                t = p.cpu_times()
                out[p.pid] = t.user + t.system + t.children_user + t.children_system
            except Exception:  # noqa: BLE001, S112 - a child that ended meanwhile
                continue
        return out

    def start(self) -> None:
        self._start = self._times() or {}

    def seconds(self) -> float | None:
        now = self._times()
        if now is None:
            return None
        return sum(v - self._start.get(pid, 0.0) for pid, v in now.items())


# --- a run --------------------------------------------------------------------------


Progress = Callable[[dict[str, Tally], float], None]


async def run_bench(
    profiles: list[str],
    workload: Workload,
    *,
    config_path: str | None = None,
    progress: Progress | None = None,
    progress_every: float = 1.0,
) -> list[ProfileResult]:
    """Runs the workload against one daemon per profile, at the same time."""
    workload.validated()
    loaded = [load_profile(name) for name in profiles]
    async with run_fake_evolution(keep_bodies=False) as fake, contextlib.AsyncExitStack() as stack:
        ready = max(p.timeouts.embedded_start for p in loaded) * 4
        daemons = [
            await stack.enter_async_context(start_daemon(p, fake.url, workload, config_path, ready)) for p in loaded
        ]
        return await drive(daemons, fake, workload, progress=progress, every=progress_every)


def patience_for(p: Profile, w: Workload) -> float:
    """How long a lead waits for a reply after its last message: long enough for the
    slowest legitimate answer (the window cap, the speculative settle, the agent timeout,
    the send; all scaled) plus a second of slack for a loaded machine."""
    settle_s = p.buffer.settle_window if getattr(p.buffer, "speculate", False) else 0.0
    return (p.timeouts.message_buffer + settle_s + p.timeouts.agent + p.timeouts.evolution_send) * w.time_scale + 1.0


async def drive(
    daemons: Sequence[Target],
    fake: FakeEvolution,
    w: Workload,
    *,
    progress: Progress | None = None,
    every: float = 1.0,
    run: int = 0,
) -> list[ProfileResult]:
    """Runs the workload's leads against daemons already running (each replying to `fake`),
    all at once, then accounts for every burst from each daemon's database and the fake's
    arrivals: one result per daemon, in order. `progress` is called every `every` seconds
    with the tallies so far; `run` (a capacity search's step) keeps each run's lead phones
    apart on one daemon."""
    since = time.time()
    meters = [CpuMeter(getattr(getattr(d, "process", None), "pid", None)) for d in daemons]
    for m in meters:
        m.start()
    start = time.monotonic()
    stop_at = start + w.duration * w.time_scale
    tallies = {d.profile.name: Tally() for d in daemons}
    tasks: list[asyncio.Task[None]] = []
    clients = []
    for n, d in enumerate(daemons):
        p = d.profile
        patience = patience_for(p, w)
        http = RawClient(d.url, size=100, timeout=p.timeouts.webhook)
        clients.append(http)
        for i in range(w.leads):
            lead = LeadSimulator(i, run * len(daemons) + n, w, patience)
            begin = start + (w.ramp * w.time_scale) * i / max(1, w.leads)
            tasks.append(asyncio.create_task(lead.run(http, fake, tallies[p.name], begin, stop_at)))
    try:
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=every)
            if progress is not None:
                progress(tallies, time.monotonic() - start)
        for t in tasks:
            t.result()  # surface a driver bug instead of hiding it in the figures
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for http in clients:
            await http.aclose()
    elapsed = time.monotonic() - start
    ids = {d.profile.name: [m for b in tallies[d.profile.name].sent for m in b.ids] for d in daemons}
    deadline = time.monotonic() + max(patience_for(d.profile, w) for d in daemons)
    await asyncio.gather(*(settle(d.database_url, ids[d.profile.name], deadline) for d in daemons))
    cpu = [m.seconds() for m in meters]
    results = []
    for d, cpu_s in zip(daemons, cpu, strict=True):
        name = d.profile.name
        turns = await turn_stats(d.database_url, since)
        stored, deliveries, discarded = await burst_records(d.database_url, since, ids[name], fake.delivered_at)
        figures = account(
            tallies[name].sent, stored, deliveries, turns=turns["turns"], discarded=discarded, cpu_seconds=cpu_s
        )
        results.append(ProfileResult(name, w.leads, tallies[name], elapsed, turns, figures))
    return results


# The figures `compare` puts side by side (B/A): where to find each in a summary.
_COMPARED: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "response_p50": lambda s: s["response_s"]["p50"],
    "response_p95": lambda s: s["response_s"]["p95"],
    "response_p99": lambda s: s["response_s"]["p99"],
    "lead_wait_p95": lambda s: s["lead_wait_s"]["p95"],
    "split_rate": lambda s: s.get("split_rate"),
    "replies_per_burst": lambda s: s.get("replies_per_burst"),
    "agent_calls_per_turn": lambda s: s.get("agent_calls_per_turn"),
    "lost": lambda s: s.get("bursts_by_outcome", {}).get("lost"),
    "unanswered": lambda s: s.get("bursts_by_outcome", {}).get("unanswered"),
    "cpu_s_per_turn": lambda s: s.get("cpu_s_per_turn"),
    "throughput": lambda s: s["throughput_msgs_per_s"],
    "turns": lambda s: s["turns"],
}


def compare(a: ProfileResult, b: ProfileResult) -> dict[str, float | None]:
    """Ratios B/A of the headline figures (None where A's is 0 or either is unknown)."""

    def ratio(x: float | None, y: float | None) -> float | None:
        return None if x in (None, 0) or y is None else y / x

    sa, sb = a.summary(), b.summary()
    return {name: ratio(get(sa), get(sb)) for name, get in _COMPARED.items()}


# --- capacity -----------------------------------------------------------------------


@dataclass
class CapacityStep:
    leads: int
    p95: float | None  # the burst response's
    missing: int
    timeout_rate: float
    held: bool
    lost: int = 0
    unanswered: int = 0
    split_rate: float | None = None


def held_slo(s: dict[str, Any], limit: float, max_timeout_rate: float) -> bool:
    """A run held the SLO: the burst response's P95 within `limit`, no message lost, at most
    1 % of the bursts unanswered or left without a reply within the patience, and timeouts
    within the SLO's rate."""
    p95 = s["response_s"]["p95"]
    outcomes = s.get("bursts_by_outcome", {})
    budget = 0.01 * max(1, s["bursts"])
    return (
        p95 is not None
        and p95 <= limit
        and outcomes.get("lost", 0) == 0
        and outcomes.get("unanswered", 0) <= budget
        and s["missing_replies"] <= budget
        and s["timeout_rate"] <= max_timeout_rate
    )


async def find_capacity(
    profile: str,
    workload: Workload,
    slo_p95: float,
    max_timeout_rate: float,
    *,
    config_path: str | None = None,
    max_leads: int = 5000,
    progress: Callable[[str, list[CapacityStep]], None] | None = None,
) -> list[CapacityStep]:
    """Doubles the leads from `workload.leads` until the burst response's P95 breaks the SLO
    (or messages are lost, bursts go unanswered, timeouts pass the SLO: `held_slo`), then
    bisects once between the last that held and the first that broke. One daemon for the
    profile, a fresh set of leads per step."""
    workload.validated()
    p = load_profile(profile)
    limit = slo_p95 * workload.time_scale
    steps: list[CapacityStep] = []
    async with run_fake_evolution(keep_bodies=False) as fake:
        async with start_daemon(p, fake.url, workload, config_path, p.timeouts.embedded_start * 4) as daemon:

            async def step(leads: int) -> CapacityStep:
                w = dataclasses.replace(workload, leads=leads)
                [r] = await drive([daemon], fake, w, run=len(steps) + 1)
                s = r.summary()
                outcomes = s.get("bursts_by_outcome", {})
                steps.append(
                    CapacityStep(
                        leads,
                        s["response_s"]["p95"],
                        r.tally.missing,
                        s["timeout_rate"],
                        held_slo(s, limit, max_timeout_rate),
                        outcomes.get("lost", 0),
                        outcomes.get("unanswered", 0),
                        s.get("split_rate"),
                    )
                )
                if progress is not None:
                    progress(p.name, steps)
                return steps[-1]

            leads = workload.leads
            while leads <= max_leads and (await step(leads)).held:
                leads *= 2
            good = [s.leads for s in steps if s.held]
            bad = [s.leads for s in steps if not s.held]
            if good and bad and bad[0] - good[-1] > 1:
                await step((good[-1] + bad[0]) // 2)
    return steps


def capacity(steps: list[CapacityStep]) -> int:
    """The largest lead count that held the SLO (0 if none did)."""
    return max((s.leads for s in steps if s.held), default=0)


# --- intake throughput ------------------------------------------------------------------


@dataclass
class IntakeResult:
    baseline: LoadResult
    daemon: LoadResult

    @property
    def ratio(self) -> float:
        return self.daemon.rate / self.baseline.rate if self.baseline.rate else 0.0


@contextlib.asynccontextmanager
async def _bare_server(ready_timeout: float) -> AsyncIterator[str]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "daemon.tools.bare_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
        "--lifespan",
        "off",
    ]
    proc = await asyncio.create_subprocess_exec(*args)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        await proc.wait()


async def run_intake(
    profile: str, *, duration: float, connections: int, leads: int, config_path: str | None = None
) -> IntakeResult:
    """Webhook requests/s of our intake against a bare Starlette endpoint, one after the
    other in one run, with the same client, connections and payloads."""
    p = load_profile(profile)
    workload = Workload(leads=leads, agent_latency="fixed:0.01").validated()
    run_id = int(time.time()) % 10**6

    def body(n: int) -> bytes:
        phone = f"5511{9_000_000_00 + n % leads:09d}"
        event = text_event(phone, "Oi, quero saber de energia solar", message_id=f"I{run_id}-{n}", instance="sdr")
        return json.dumps(event).encode()

    async with run_fake_evolution(keep_bodies=False) as fake:
        async with _bare_server(p.timeouts.embedded_start) as bare_url:
            await post_load(f"{bare_url}/webhook/evolution", body, connections=connections, duration=1.0)
            baseline = await post_load(
                f"{bare_url}/webhook/evolution", body, connections=connections, duration=duration
            )
        # The per-lead rate limit off: this floods a few hundred leads at thousands of
        # requests/s to measure intake capacity, not the limiter (which would answer 429).
        no_limit = {"SDR_LIMITS_LEAD_RATE": "0"}
        async with start_daemon(
            p, fake.url, workload, config_path, p.timeouts.embedded_start * 4, extra_env=no_limit
        ) as daemon:
            await post_load(f"{daemon.url}/webhook/evolution", body, connections=connections, duration=1.0)
            ours = await post_load(f"{daemon.url}/webhook/evolution", body, connections=connections, duration=duration)
    return IntakeResult(baseline, ours)
