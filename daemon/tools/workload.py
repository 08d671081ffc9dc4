"""The people a bench simulates: what leads write (pt-BR), how fast they type and think,
and the simulated lead that sends its bursts to a daemon and waits for the reply. The
figures behind each default are in `Workload`'s comments (and README, "Whole bursts at
human typing speed"); named scenarios live in scenarios/."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import msgspec

from daemon.errors import ConfigError
from daemon.evolution import presence_event, text_event
from daemon.latency import parse_latency
from daemon.testing.fake_evolution import FakeEvolution
from daemon.tools.bursts import SentBurst
from daemon.tools.loadgen import RawClient

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


_encode = msgspec.json.Encoder().encode


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
