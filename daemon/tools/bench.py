"""`sdrctl bench`: simulated leads against the real pipeline, end to end over real HTTP.

Each profile under test runs as a real `sdrctl serve` subprocess on its own throw-away
embedded PostgreSQL and Redis, with the `simulated` agent, replying to a fake Evolution API
that runs here and notes when each reply arrives. Leads type bursts at human speed (or the
quick gaps of the `quick-typers` scenario), wait for a reply, think, and write again.
Several profiles run at the same time on the same workload and seed, so their figures are
comparable. After the run every burst is accounted for from the daemon's database and the
fake's arrivals (whole, split, lost, unanswered: daemon/tools/bursts.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import random
import shutil
import sys
import tempfile
import time
import tomllib
import warnings
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import msgspec

from daemon.config import Profile, Timeouts, load_profile
from daemon.embedded import postgres_url
from daemon.errors import ConfigError, SdrError
from daemon.evolution import presence_event, text_event
from daemon.latency import parse_latency
from daemon.outbox import OPEN, Status
from daemon.store import init_connection
from daemon.testing.fake_evolution import FakeEvolution, run_fake_evolution
from daemon.testing.servers import free_port, wait_ready
from daemon.tools.bursts import BurstFigures, SentBurst, account, spread
from daemon.tools.loadgen import LoadResult, RawClient, post_load

# What leads write: pt-BR, from 2 to ~90 characters, as people write on WhatsApp. The mix
# (by list entry): statements ~40 % short (2-15 chars: "Oi", "Ok", a name), ~35 % medium
# (16-45: one fact), ~25 % long (46-90: a sentence or two); questions mostly medium, a
# quarter long. Questions come from a small set, as in real traffic (and so the
# knowledge-base cache sees repeats); statements vary.
QUESTIONS = [
    # short
    "Quanto custa?",
    "E à noite?",
    "Qual a garantia?",
    "Tem desconto?",
    # medium
    "quanto custa a instalação?",
    "Tem financiamento?",
    "Funciona em dia nublado?",
    "Quanto tempo demora a instalação?",
    "Precisa de manutenção?",
    "Quanto vou economizar?",
    "O que é a lei 14.300?",
    "Vocês instalam em telhado de metal?",
    "E se faltar luz?",
    "Quanto tempo para pagar o investimento?",
    "Vocês atendem empresas?",
    "Precisa de bateria?",
    # long
    "Vocês fazem a visita técnica de graça ou cobram alguma coisa?",
    "Dá pra parcelar no cartão ou só financiando pelo banco?",
    "Se eu mudar de casa daqui uns anos eu consigo levar as placas comigo?",
    "Quanto tempo depois da instalação a conta de luz já começa a baixar?",
    "Meu telhado é de telha colonial, tem algum problema pra instalar as placas?",
    "Vocês cuidam da papelada com a distribuidora ou eu preciso ir lá resolver alguma coisa?",
]
STATEMENTS = [
    # short
    "Oi",
    "Ok",
    "Sim",
    "Entendi",
    "Legal",
    "Olá, boa tarde",
    "{name}",
    "É casa",
    "Vou ver aqui",
    "uns {value} reais",
    "Bom dia!",
    "Ah sim",
    "Certo",
    "Quero saber mais",
    # medium
    "Vi o anúncio de vocês",
    "Meu nome é {name}",
    "Minha conta vem uns R$ {value}",
    "Moro em apartamento",
    "Tenho um comércio",
    "Sou eu que decido",
    "Eu e minha esposa",
    "Pode ser amanhã de manhã",
    "Moro em Campinas, interior de SP",
    "A casa é própria, faz 10 anos",
    "Tenho interesse sim",
    "Depois das 18h é melhor pra mim",
    # long
    "Oi, boa tarde! Vi o anúncio de vocês no Instagram",
    "Minha conta de luz vem uns R$ {value} por mês, às vezes mais no verão",
    "Eu tenho uma padaria e o forno elétrico gasta muito, a conta tá pesada",
    "Meu vizinho instalou ano passado e disse que a conta caiu bastante",
    "Eu queria entender melhor como funciona antes de fechar qualquer coisa",
    "Trabalho o dia todo, então só consigo ver as mensagens à noite, tudo bem?",
    "A casa é térrea, o telhado é grande e bate sol a tarde inteira",
    "Já pedi orçamento em outra empresa mas achei caro, por isso tô pesquisando",
    "Boa noite, desculpa a demora pra responder, tava no trabalho. Ainda tenho interesse sim",
]
NAMES = ["Ana", "Bruno", "Carla", "Diego", "Eduarda", "Felipe", "Gabriela", "Heitor", "Isabela", "João"]

TYPING_MODELS = ("human", "quick")
WPM_MIN, WPM_MAX = 10.0, 100.0  # a lead's typing speed is clamped to this (words per minute)
CHARS_PER_WORD = 5  # the text-entry literature's "word"
# A lead still typing re-posts "composing" this often. An assumption: WhatsApp clients
# re-send their chat state while typing, but we found no published interval.
PRESENCE_REFRESH = 10.0


@dataclass(frozen=True)
class Workload:
    """What the simulated leads do. Two typing models (`typing`):

    - "human" (the default): the gap before each message of a burst after the first is a
      reaction time (`reaction`: the pause between sending one message and starting to
      type the next; lognormal, median 1 s, P95 3 s: an assumption of ours, a knob, not a
      measured figure) plus the time to type that message, len(text) / the lead's typing
      speed. The first message of a burst is typed too (after `think`). Each lead draws
      its speed once from `typing_wpm` (words per minute, 1 word = 5 characters), clamped
      to 10-100 WPM. The default, lognormal median 34 WPM, P95 60 WPM (mean 36.1, SD
      12.8), fits the phone typists of Palin et al., "How do People Type on Mobile Devices?
      Observations from a Study with 37,000 Volunteers", MobileHCI 2019 (mean 36.2 WPM,
      SD 13.2). Bursts of 1-5 messages.
    - "quick": the fixed gaps benches used before (`typing_gap`, 0.2-0.9 s, nothing for
      typing); with bursts of 1-4 it is the named scenario `quick-typers`.

    With `presence` the lead also posts WhatsApp's "composing" when it starts typing each
    message (again every 10 s while it types) and "paused" once the message is posted, as
    Evolution forwards them for instances that subscribe to presence.update.

    A lead types its whole burst whatever replies arrive meanwhile, then waits (up to the
    patience) for a reply after its last message, thinks (`think`), and writes again.
    All randomness comes from a per-lead RNG seeded from `seed`: the same seed gives every
    profile the same leads, texts and gaps. `time_scale` scales reaction, typing, think and
    the agent's latency alike (and the daemon's windows and timeouts)."""

    leads: int = 100
    duration: float = 60.0  # seconds of load after the ramp starts; no message is sent after it
    ramp: float = 10.0  # leads start spread over this long
    seed: int = 1
    typing: str = "human"  # the typing model: human | quick
    burst_min: int = 1
    burst_max: int = 5
    reaction: str = "lognormal:median=1.0,p95=3.0"  # human: sent -> starts typing the next (assumed)
    typing_wpm: str = "lognormal:median=34,p95=60"  # human: a lead's speed, words/min (Palin et al. 2019)
    typing_gap: str = "uniform:min=0.2,max=0.9"  # quick: between the messages of a burst
    presence: bool = False  # post "composing"/"paused" presence webhooks around each message
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
            (self.typing in TYPING_MODELS, f"typing must be one of {', '.join(TYPING_MODELS)} (got {self.typing!r})"),
            (1 <= self.burst_min <= self.burst_max <= 20, "need 1 <= burst_min <= burst_max <= 20"),
            (isinstance(self.presence, bool), "presence must be true or false"),
            (0 <= self.question_share <= 1, "question_share must be from 0 to 1"),
            (0 <= self.duplicate_share <= 1, "duplicate_share must be from 0 to 1"),
            (0.01 <= self.time_scale <= 1, "time_scale must be from 0.01 to 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"workload: {message}")
        for name in ("typing_gap", "reaction", "typing_wpm", "think", "agent_latency"):
            try:
                parse_latency(getattr(self, name))
            except (ValueError, AttributeError) as exc:
                unit = " (here in words per minute)" if name == "typing_wpm" else ""
                raise ConfigError(f"workload: {name}: {exc}{unit}") from None
        return self


SCENARIOS = resources.files("daemon.tools") / "scenarios"  # named scenarios, shipped in the package


def named_scenarios() -> list[str]:
    return sorted(f.name.removesuffix(".toml") for f in SCENARIOS.iterdir() if f.name.endswith(".toml"))


def load_scenario(scenario: Path | str, **overrides: Any) -> Workload:
    """A scenario: a TOML table with Workload's keys (unknown keys refused), from a file or
    by the name of one shipped in daemon/tools/scenarios (`quick-typers`). Overrides that are not
    None win over the file."""
    path = Path(scenario)
    source: Path | Traversable = path
    if not path.is_file():
        named = SCENARIOS / f"{scenario}.toml"
        if "/" in str(scenario) or not named.is_file():
            raise ConfigError(
                f"scenario {str(scenario)!r}: no such file, nor a named scenario ({', '.join(named_scenarios())})"
            )
        source = named
    try:
        doc = tomllib.loads(source.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{scenario}: {exc}") from None
    known = {f.name: f for f in dataclasses.fields(Workload)}
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise ConfigError(f"{scenario}: unknown key {unknown[0]}; allowed: {', '.join(known)}")
    values = {**doc, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return Workload(**values).validated()
    except TypeError as exc:
        raise ConfigError(f"{scenario}: {exc}") from None


def scaled_overrides(profile: Profile, factor: float) -> dict[str, str]:
    """SDR_ variables that scale a profile's waits by `factor` (infrastructure timeouts —
    database, redis, embedded start, shutdown — are left alone)."""
    keep = {"database", "redis", "embedded_start", "shutdown_grace"}
    env: dict[str, str] = {"SDR_FEATURES_TYPING_AFTER": repr(profile.features.typing_after * factor)}
    for section, names in (
        ("timeouts", [f.name for f in dataclasses.fields(Timeouts) if f.name not in keep]),
        # settle_window, presence_settle and typing_ttl are waits of the speculative buffer.
        ("buffer", ["min_window", "quiet_window", "extended_window", "settle_window", "presence_settle", "typing_ttl"]),
        ("limits", ["lock_backoff", "send_backoff"]),
    ):
        part = getattr(profile, section)
        for name in names:
            if not hasattr(part, name):  # a knob this version of the config does not have
                continue
            env[f"SDR_{section.upper()}_{name.upper()}"] = repr(getattr(part, name) * factor)
    return env


# --- one daemon under test --------------------------------------------------------------


def embedded_database_url(folder: Path) -> str:
    """The URL of the embedded PostgreSQL running in `folder`, as daemon/embedded.py builds
    it: the socket folder and port its postmaster.pid holds (pgserver moves the socket out
    of a folder whose path is too long for one; the port is not always 5432)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns at import when XDG_RUNTIME_DIR is unset
        from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(folder)
    if info is None or info.socket_dir is None:
        raise SdrError(f"no embedded PostgreSQL runs in {folder} (does the config give a database.url?)")
    return postgres_url(info.socket_dir, info.port)


@dataclass
class DaemonUnderTest:
    profile: Profile
    url: str
    data_dir: Path
    process: asyncio.subprocess.Process

    @functools.cached_property
    def database_url(self) -> str:
        """Its embedded PostgreSQL's (read once the daemon is ready, when it runs)."""
        return embedded_database_url(self.data_dir / "var" / "pg")


@contextlib.asynccontextmanager
async def start_daemon(
    profile: Profile,
    evolution_url: str,
    workload: Workload,
    config_path: str | None,
    ready_timeout: float,
    *,
    extra_env: Mapping[str, str] | None = None,
) -> AsyncIterator[DaemonUnderTest]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"sdrctl-bench-{profile.name}-", dir="/tmp"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDR_")}
    env.update(
        SDR_DAEMON_DATA_DIR=str(data_dir / "var"),
        SDR_DAEMON_PORT=str(port),
        SDR_DAEMON_HOST="127.0.0.1",
        SDR_DAEMON_LOG_LEVEL="warning",
        SDR_EVOLUTION_BASE_URL=evolution_url,
        SDR_AGENT_BACKEND="simulated",
        SDR_AGENT_SIMULATED_LATENCY=scaled_spec(workload.agent_latency, workload.time_scale),
        **scaled_overrides(profile, workload.time_scale),
    )
    env.update(extra_env or {})
    args = [sys.executable, "-m", "sdrctl", "serve", "--profile", profile.source]
    if config_path:
        args += ["--config", config_path]
    log = (data_dir / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(*args, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT)
    daemon = DaemonUnderTest(profile, f"http://127.0.0.1:{port}", data_dir, proc)
    try:
        if not await wait_ready(daemon.url, proc, ready_timeout):
            log_text = (data_dir / "serve.log").read_text(errors="replace")[-2000:]
            raise SdrError(f"the daemon for profile {profile.name} did not become ready:\n{log_text}")
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


def scaled_spec(spec: str, factor: float) -> str:
    """A latency spec (daemon/latency.py) with its times multiplied by `factor`, written back
    as a spec: what the simulated agent of a daemon under a time-scaled workload gets."""
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

    responses: list[float] = field(default_factory=list)  # lead waits seen live (progress), seconds
    bursts: int = 0
    messages: int = 0  # accepted (200)
    missing: int = 0  # bursts after which no reply came within the patience
    errors: int = 0  # message webhooks not answered 200 (duplicates included)
    duplicates: int = 0  # messages delivered a second time (a retried webhook)
    presence_posts: int = 0
    presence_errors: int = 0  # presence webhooks not answered 200 (not the lead's errors)
    sent: list[SentBurst] = field(default_factory=list)  # every burst, for the per-burst accounting


@dataclass(frozen=True)
class BurstPlan:
    """One burst, drawn before it is sent (so the draws do not depend on timing)."""

    texts: list[str]
    waits: list[tuple[float, float]]  # per message: (reaction, typing) before it is sent; scaled seconds
    duplicate: int | None  # the message delivered twice (a retried webhook), if any
    think: float  # after the reply, before the next burst; scaled seconds


class LeadSimulator:
    def __init__(self, index: int, run_id: int, workload: Workload, patience: float) -> None:
        # 13 digits, unique per run and lead: 55 + area + 9 + run (2) + lead (6).
        self.phone = f"55{11 + index % 80:02d}9{run_id % 100:02d}{index % 10**6:06d}"
        self.rng = random.Random(workload.seed * 1_000_003 + index)  # same per lead, any profile
        self.w = workload
        self.patience = patience
        f = workload.time_scale
        self.scale = f
        self.gap = parse_latency(workload.typing_gap).scaled(f)
        self.reaction = parse_latency(workload.reaction).scaled(f)
        self.think = parse_latency(workload.think).scaled(f)
        self.refresh = PRESENCE_REFRESH * f
        self.wpm: float | None = None
        if workload.typing == "human":  # drawn once: a lead types at its own speed all along
            drawn = parse_latency(workload.typing_wpm).sample(self.rng)
            self.wpm = min(max(drawn, WPM_MIN), WPM_MAX)
        self.count = 0

    @property
    def chars_per_second(self) -> float | None:
        return None if self.wpm is None else self.wpm * CHARS_PER_WORD / 60

    def typing_time(self, text: str) -> float:
        """Seconds (scaled) this lead takes to type `text`; 0 for quick typers."""
        cps = self.chars_per_second
        return 0.0 if cps is None else len(text) / cps * self.scale

    def _statement(self) -> str:
        return self.rng.choice(STATEMENTS).format(name=self.rng.choice(NAMES), value=self.rng.randrange(150, 2500, 10))

    def plan(self) -> BurstPlan:
        size = self.rng.randint(self.w.burst_min, self.w.burst_max)
        texts = [self._statement() for _ in range(size)]
        if self.rng.random() < self.w.question_share:
            texts[-1] = self.rng.choice(QUESTIONS)  # a question ends a burst, as people write
        waits: list[tuple[float, float]] = []
        for i, text in enumerate(texts):
            if self.w.typing == "quick":
                waits.append((0.0, 0.0 if i == 0 else self.gap.sample(self.rng)))
            else:  # the first message is typed after thinking; the others after a reaction
                waits.append((0.0 if i == 0 else self.reaction.sample(self.rng), self.typing_time(text)))
        duplicate = self.rng.randrange(size) if self.rng.random() < self.w.duplicate_share else None
        return BurstPlan(texts, waits, duplicate, self.think.sample(self.rng))

    async def run(self, http: RawClient, fake: FakeEvolution, tally: Tally, start_at: float, stop_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        while time.monotonic() < stop_at:
            plan = self.plan()
            burst = await self.send_burst(http, plan, tally, stop_at)
            tally.bursts += 1
            tally.sent.append(burst)
            last = burst.last
            if last is not None:  # a reply after its last message, whatever it answers
                arrived = await fake.wait_replies(self.phone, 1, last[1], self.patience)
                if arrived is None:
                    tally.missing += 1
                    fake.forget(self.phone)
                else:
                    tally.responses.append(arrived[0] - last[1])
            await asyncio.sleep(plan.think)

    async def send_burst(self, http: RawClient, plan: BurstPlan, tally: Tally, stop_at: float) -> SentBurst:
        """Types and posts the burst's messages (with presence around each, if asked); no
        message after `stop_at` but the first (the burst ends with what was sent)."""
        burst = SentBurst(self.phone)
        events: list[dict[str, Any]] = []
        for i, (text, (reaction, typing)) in enumerate(zip(plan.texts, plan.waits, strict=True)):
            if i and time.monotonic() + reaction + typing > stop_at:
                break
            await asyncio.sleep(reaction)
            await self._type(http, typing, tally)
            self.count += 1
            message_id = f"B{self.phone}{self.count:06d}"
            events.append(text_event(self.phone, text, message_id=message_id, instance="sdr"))
            ok = await self._post(http, events[-1], tally)
            burst.add(message_id, time.time() if ok else None)
            if ok:
                tally.messages += 1
            if self.w.presence:  # sending a message ends WhatsApp's typing state
                await self._presence(http, "paused", tally)
        if plan.duplicate is not None and plan.duplicate < len(events):
            tally.duplicates += 1
            await self._post(http, events[plan.duplicate], tally)  # a retried delivery
        return burst

    async def _type(self, http: RawClient, seconds: float, tally: Tally) -> None:
        """Typing one message for `seconds`: "composing" at the start and every 10 s
        (scaled) while it lasts, with presence on."""
        end = time.monotonic() + seconds
        if self.w.presence:
            await self._presence(http, "composing", tally)
            while end - time.monotonic() > self.refresh:
                await asyncio.sleep(self.refresh)
                await self._presence(http, "composing", tally)
        await asyncio.sleep(max(0.0, end - time.monotonic()))

    async def _presence(self, http: RawClient, state: str, tally: Tally) -> None:
        tally.presence_posts += 1
        try:
            ok = (
                await http.post("/webhook/evolution", _encode(presence_event(self.phone, state, instance="sdr"))) == 200
            )
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            ok = False
        if not ok:
            tally.presence_errors += 1

    async def _post(self, http: RawClient, event: dict[str, Any], tally: Tally) -> bool:
        try:
            ok = await http.post("/webhook/evolution", _encode(event)) == 200
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            ok = False
        if not ok:
            tally.errors += 1
        return ok


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
