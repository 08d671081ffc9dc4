"""`sdrctl bench`: simulated leads against the real pipeline, end to end over real HTTP.

Each profile under test runs as a real `sdrctl serve` subprocess on its own throw-away
embedded PostgreSQL and Redis, with the `simulated` agent, replying to a fake Evolution API
that runs here and notes when each reply arrives. Leads write bursts with human gaps, wait
for the reply, think, and write again. Several profiles run at the same time on the same
workload and seed, so their figures are comparable."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import httpx
import msgspec

from daemon.config import Profile, Timeouts, load_profile
from daemon.errors import ConfigError, SdrError
from daemon.evolution import text_event
from daemon.fake_evolution import FakeEvolution, run_fake_evolution
from daemon.latency import parse_latency
from daemon.loadgen import LoadResult, RawClient, post_load
from daemon.store import init_connection

# What leads write. Questions come from a small set, as in real traffic (and so the
# knowledge-base cache sees repeats); statements vary.
QUESTIONS = [
    "Quanto custa?", "quanto custa a instalação?", "Tem financiamento?", "Funciona em dia nublado?",
    "E à noite?", "Quanto tempo demora a instalação?", "Precisa de manutenção?", "Qual a garantia?",
    "Quanto vou economizar?", "O que é a lei 14.300?", "Vocês instalam em telhado de metal?",
    "E se faltar luz?", "Quanto tempo para pagar o investimento?", "Vocês atendem empresas?",
    "Precisa de bateria?",
]  # fmt: skip
STATEMENTS = [
    "Oi", "Olá, boa tarde", "Vi o anúncio de vocês", "Meu nome é {name}", "{name}",
    "Minha conta vem uns R$ {value}", "uns {value} reais", "É casa", "Moro em apartamento",
    "Tenho um comércio", "Sou eu que decido", "Eu e minha esposa", "Pode ser amanhã de manhã",
    "Quero saber mais", "Ok", "Entendi", "Legal", "Vou ver aqui",
]  # fmt: skip
NAMES = ["Ana", "Bruno", "Carla", "Diego", "Eduarda", "Felipe", "Gabriela", "Heitor", "Isabela", "João"]


@dataclass(frozen=True)
class Workload:
    leads: int = 100
    duration: float = 60.0  # seconds of load after the ramp starts
    ramp: float = 10.0  # leads start spread over this long
    seed: int = 1
    burst_min: int = 1
    burst_max: int = 4
    typing_gap: str = "uniform:min=0.2,max=0.9"  # between the quick messages of a burst
    think: str = "uniform:min=2,max=8"  # after a reply, before the next burst
    question_share: float = 0.3  # bursts that end with a question
    duplicate_share: float = 0.05  # bursts with one message delivered twice
    agent_latency: str = "lognormal:median=1.5,p95=4"
    time_scale: float = 1.0  # every window, timeout and latency times this

    def validated(self) -> Workload:
        checks = [
            (self.leads >= 1, "leads must be at least 1"),
            (self.duration > 0, "duration must be positive"),
            (self.ramp >= 0, "ramp must not be negative"),
            (1 <= self.burst_min <= self.burst_max <= 20, "need 1 <= burst_min <= burst_max <= 20"),
            (0 <= self.question_share <= 1, "question_share must be from 0 to 1"),
            (0 <= self.duplicate_share <= 1, "duplicate_share must be from 0 to 1"),
            (0.01 <= self.time_scale <= 1, "time_scale must be from 0.01 to 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"workload: {message}")
        for name in ("typing_gap", "think", "agent_latency"):
            try:
                parse_latency(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(f"workload: {name}: {exc}") from None
        return self


def load_scenario(path: Path, **overrides: Any) -> Workload:
    """A scenario file: a TOML table with Workload's keys (unknown keys refused)."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    known = {f.name: f for f in dataclasses.fields(Workload)}
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]}; allowed: {', '.join(known)}")
    values = {**doc, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return Workload(**values).validated()
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def scaled_overrides(profile: Profile, factor: float) -> dict[str, str]:
    """SDR_ variables that scale a profile's waits by `factor` (infrastructure timeouts —
    database, redis, embedded start, shutdown — are left alone)."""
    keep = {"database", "redis", "embedded_start", "shutdown_grace"}
    env: dict[str, str] = {"SDR_FEATURES_TYPING_AFTER": repr(profile.features.typing_after * factor)}
    for section, names in (
        ("timeouts", [f.name for f in dataclasses.fields(Timeouts) if f.name not in keep]),
        ("buffer", ["min_window", "quiet_window", "extended_window"]),
        ("limits", ["lock_backoff", "send_backoff"]),
    ):
        part = getattr(profile, section)
        for name in names:
            env[f"SDR_{section.upper()}_{name.upper()}"] = repr(getattr(part, name) * factor)
    return env


# --- one daemon under test --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DaemonUnderTest:
    profile: Profile
    url: str
    data_dir: Path
    process: asyncio.subprocess.Process

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@/sdr?host={self.data_dir / 'var' / 'pg'}"


@contextlib.asynccontextmanager
async def start_daemon(
    profile: Profile, evolution_url: str, workload: Workload, config_path: str | None, ready_timeout: float,
    *, extra_env: Mapping[str, str] | None = None,
) -> AsyncIterator[DaemonUnderTest]:  # fmt: skip
    data_dir = Path(tempfile.mkdtemp(prefix=f"sdrctl-bench-{profile.name}-", dir="/tmp"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDR_")}
    env.update(
        SDR_DAEMON_DATA_DIR=str(data_dir / "var"), SDR_DAEMON_PORT=str(port), SDR_DAEMON_HOST="127.0.0.1",
        SDR_DAEMON_LOG_LEVEL="warning", SDR_EVOLUTION_BASE_URL=evolution_url,
        SDR_AGENT_BACKEND="simulated",
        SDR_AGENT_SIMULATED_LATENCY=_scaled_spec(workload.agent_latency, workload.time_scale),
        **scaled_overrides(profile, workload.time_scale),
    )  # fmt: skip
    env.update(extra_env or {})
    args = [sys.executable, "-m", "sdrctl", "serve", "--profile", profile.source]
    if config_path:
        args += ["--config", config_path]
    log = (data_dir / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(*args, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT)
    daemon = DaemonUnderTest(profile, f"http://127.0.0.1:{port}", data_dir, proc)
    try:
        await _wait_ready(daemon, ready_timeout)
        yield daemon
    finally:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ready_timeout):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        log.close()
        if os.environ.get("SDRCTL_BENCH_KEEP"):  # for a post-mortem of a run
            print(f"kept {data_dir}", file=sys.stderr)
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


async def _wait_ready(daemon: DaemonUnderTest, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=daemon.url) as http:
        while time.monotonic() < deadline:
            if daemon.process.returncode is not None:
                break
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    log = (daemon.data_dir / "serve.log").read_text(errors="replace")[-2000:]
    raise SdrError(f"the daemon for profile {daemon.profile.name} did not become ready:\n{log}")


def _scaled_spec(spec: str, factor: float) -> str:
    lat = parse_latency(spec).scaled(factor)
    if lat.kind == "fixed":
        return f"fixed:{lat.a!r}"
    if lat.kind == "uniform":
        return f"uniform:min={lat.a!r},max={lat.b!r}"
    return f"lognormal:median={lat.a!r},p95={lat.b!r}"


class Target(Protocol):
    """What the load generator needs of a daemon: a subprocess here, or one in this process
    (`sdrctl profile`)."""

    @property
    def profile(self) -> Profile: ...
    @property
    def url(self) -> str: ...
    @property
    def database_url(self) -> str: ...


_encode = msgspec.json.Encoder().encode


# --- the leads ------------------------------------------------------------------------


@dataclass
class Tally:
    """What the load generator saw for one profile."""

    responses: list[float] = field(default_factory=list)  # seconds, per answered burst
    bursts: int = 0
    messages: int = 0
    missing: int = 0  # bursts whose reply never came within the patience
    errors: int = 0  # webhooks not answered 200


class LeadSimulator:
    def __init__(self, index: int, run_id: int, workload: Workload, coalesce: bool, patience: float) -> None:
        # 13 digits, unique per run and lead: 55 + area + 9 + run (2) + lead (6).
        self.phone = f"55{11 + index % 80:02d}9{run_id % 100:02d}{index % 10**6:06d}"
        self.rng = random.Random(workload.seed * 1_000_003 + index)  # same per lead, any profile
        self.w = workload
        self.coalesce = coalesce
        self.patience = patience
        f = workload.time_scale
        self.gap = parse_latency(workload.typing_gap).scaled(f)
        self.think = parse_latency(workload.think).scaled(f)
        self.count = 0

    def _statement(self) -> str:
        return self.rng.choice(STATEMENTS).format(
            name=self.rng.choice(NAMES), value=self.rng.randrange(150, 2500, 10)
        )

    async def run(
        self, http: RawClient, fake: FakeEvolution, tally: Tally, start_at: float, stop_at: float
    ) -> None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        while time.monotonic() < stop_at:
            size = self.rng.randint(self.w.burst_min, self.w.burst_max)
            texts = [self._statement() for _ in range(size)]
            if self.rng.random() < self.w.question_share:
                texts[-1] = self.rng.choice(QUESTIONS)  # a question ends a burst, as people write
            events = []
            sent = time.time()
            for i, text in enumerate(texts):
                self.count += 1
                sent = time.time()  # the last one counts: response = its reply - this
                events.append(text_event(self.phone, text, message_id=f"B{self.phone}{self.count:06d}", instance="sdr"))
                if not await self._post(http, events[-1], tally):
                    continue
                tally.messages += 1
                if i < size - 1:
                    await asyncio.sleep(self.gap.sample(self.rng))
            if self.rng.random() < self.w.duplicate_share:
                await self._post(http, self.rng.choice(events), tally)  # a retried delivery
            tally.bursts += 1
            arrived = await fake.wait_replies(self.phone, 1 if self.coalesce else size, sent, self.patience)
            if arrived is None:
                tally.missing += 1
                fake.forget(self.phone)
            else:
                tally.responses.append(arrived[-1] - sent)
            await asyncio.sleep(self.think.sample(self.rng))

    async def _post(self, http: RawClient, event: dict[str, Any], tally: Tally) -> bool:
        try:
            ok = await http.post("/webhook/evolution", _encode(event)) == 200
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            ok = False
        if not ok:
            tally.errors += 1
        return ok


# --- results ------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def spread(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
        "max": max(values) if values else None, "n": len(values),
    }  # fmt: skip


@dataclass
class ProfileResult:
    profile: str
    leads: int
    tally: Tally
    elapsed: float
    turns: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        t = self.tally
        return {
            "profile": self.profile,
            "leads": self.leads,
            "response_s": spread(t.responses),
            "bursts": t.bursts,
            "messages": t.messages,
            "missing_replies": t.missing,
            "webhook_errors": t.errors,
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
        unanswered = await conn.fetchval(
            "SELECT count(*) FROM messages WHERE direction = 'in' AND turn_id IS NULL"
        )
        failed_sends = await conn.fetchval("SELECT count(*) FROM outbox WHERE status <> 'sent'")
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
            await stack.enter_async_context(start_daemon(p, fake.url, workload, config_path, ready))
            for p in loaded
        ]
        return await _drive(daemons, fake, workload, progress, progress_every)


async def _drive(
    daemons: Sequence[Target], fake: FakeEvolution, w: Workload, progress: Progress | None,
    every: float, run: int = 0,
) -> list[ProfileResult]:  # fmt: skip
    since = time.time()
    start = time.monotonic()
    stop_at = start + w.duration * w.time_scale
    tallies = {d.profile.name: Tally() for d in daemons}
    tasks: list[asyncio.Task[None]] = []
    clients = []
    for n, d in enumerate(daemons):
        p = d.profile
        # Long enough for the slowest legitimate answer: the window cap, the agent timeout,
        # the sends (all scaled), plus a second of slack for a loaded machine.
        patience = (p.timeouts.message_buffer + p.timeouts.agent + p.timeouts.evolution_send) * w.time_scale + 1.0
        http = RawClient(d.url, size=100, timeout=p.timeouts.webhook)
        clients.append(http)
        for i in range(w.leads):
            lead = LeadSimulator(i, run * len(daemons) + n, w, p.buffer.coalesce, patience)
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
    return [
        ProfileResult(d.profile.name, w.leads, tallies[d.profile.name], elapsed, await turn_stats(d.database_url, since))
        for d in daemons
    ]


def compare(a: ProfileResult, b: ProfileResult) -> dict[str, float | None]:
    """Ratios B/A of the headline figures."""

    def ratio(x: float | None, y: float | None) -> float | None:
        return None if x in (None, 0) or y is None else y / x

    sa, sb = a.summary(), b.summary()
    return {
        "response_p50": ratio(sa["response_s"]["p50"], sb["response_s"]["p50"]),
        "response_p95": ratio(sa["response_s"]["p95"], sb["response_s"]["p95"]),
        "throughput": ratio(sa["throughput_msgs_per_s"], sb["throughput_msgs_per_s"]),
        "turns": ratio(sa["turns"], sb["turns"]),
    }



# --- capacity -----------------------------------------------------------------------


@dataclass
class CapacityStep:
    leads: int
    p95: float | None
    missing: int
    timeout_rate: float
    held: bool


async def find_capacity(
    profile: str, workload: Workload, slo_p95: float, max_timeout_rate: float, *,
    config_path: str | None = None, max_leads: int = 5000,
    progress: Callable[[str, list[CapacityStep]], None] | None = None,
) -> list[CapacityStep]:  # fmt: skip
    """Doubles the leads from `workload.leads` until P95 breaks the SLO (or replies go
    missing, or timeouts pass the SLO), then bisects once between the last that held and
    the first that broke. One daemon for the profile, a fresh set of leads per step."""
    workload.validated()
    p = load_profile(profile)
    limit = slo_p95 * workload.time_scale
    steps: list[CapacityStep] = []
    async with run_fake_evolution(keep_bodies=False) as fake:
        async with start_daemon(p, fake.url, workload, config_path, p.timeouts.embedded_start * 4) as daemon:

            async def step(leads: int) -> CapacityStep:
                w = dataclasses.replace(workload, leads=leads)
                [r] = await _drive([daemon], fake, w, None, 1.0, run=len(steps) + 1)
                s = r.summary()
                p95 = s["response_s"]["p95"]
                held = (
                    p95 is not None and p95 <= limit and r.tally.missing <= 0.01 * max(1, r.tally.bursts)
                    and s["timeout_rate"] <= max_timeout_rate
                )  # fmt: skip
                steps.append(CapacityStep(leads, p95, r.tally.missing, s["timeout_rate"], held))
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
    port = _free_port()
    args = [sys.executable, "-m", "uvicorn", "daemon.bare_app:app", "--host", "127.0.0.1",
            "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
            "--log-level", "warning", "--lifespan", "off"]  # fmt: skip
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
            baseline = await post_load(f"{bare_url}/webhook/evolution", body, connections=connections, duration=duration)
        # The per-lead rate limit off: this floods a few hundred leads at thousands of
        # requests/s to measure intake capacity, not the limiter (which would answer 429).
        no_limit = {"SDR_LIMITS_LEAD_RATE": "0"}
        async with start_daemon(
            p, fake.url, workload, config_path, p.timeouts.embedded_start * 4, extra_env=no_limit
        ) as daemon:
            await post_load(f"{daemon.url}/webhook/evolution", body, connections=connections, duration=1.0)
            ours = await post_load(f"{daemon.url}/webhook/evolution", body, connections=connections, duration=duration)
    return IntakeResult(baseline, ours)
