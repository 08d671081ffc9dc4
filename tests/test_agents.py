"""The `openai` backend against a fake OpenAI-compatible server over real HTTP, the
`simulated` backend's latencies, and `make_agent`."""

from __future__ import annotations

import random
import socket
import statistics
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from daemon.agents import TurnInput, make_agent
from daemon.agents.openai import OpenAIAgent
from daemon.agents.playbook import Playbook
from daemon.agents.simulated import SimulatedAgent
from daemon.config import Config
from daemon.embedded import Endpoints
from daemon.errors import AgentError
from daemon.latency import parse_latency
from daemon.models import KbEntry
from daemon.testing.fake_openai import FakeOpenAI, run_fake_openai
from tests.helpers import make_config

# The agents touch neither database nor Redis; make_config only needs their addresses.
UNUSED = Endpoints("postgresql://unused", "unix:///unused")
KEY = "sk-test-0123456789"
KB = [
    KbEntry(1, "produto", "Financiamento", "Financiamos em até 120 parcelas.", 0.9),
    KbEntry(2, "produto", "Garantia", "Os painéis têm 25 anos de garantia.", 0.5),
]


class Turn:
    """A TurnInput whose knowledge() counts its calls."""

    def __init__(
        self,
        texts: list[str],
        lead: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
        entries: list[KbEntry] | None = None,
    ) -> None:
        self.knowledge_calls = 0
        self.entries = entries or []
        self.input = TurnInput(lead or {"stage": "new"}, texts, history or [], self.knowledge)

    async def knowledge(self) -> list[KbEntry]:
        self.knowledge_calls += 1
        return self.entries


def config_for(**env: str) -> Config:
    return make_config(UNUSED, **env)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with run_fake_openai() as server:
        yield server


@pytest.fixture
async def agent(fake: FakeOpenAI) -> AsyncIterator[OpenAIAgent]:
    cfg = config_for(
        SDR_AGENT_BACKEND="openai",
        SDR_AGENT_BASE_URL=fake.url,
        SDR_AGENT_MODEL="test-model",
        OPENAI_API_KEY=KEY,
    )
    bot = OpenAIAgent(cfg)
    yield bot
    await bot.close()


# --- openai ---------------------------------------------------------------------------


async def test_openai_sends_the_conversation_and_returns_the_content(fake: FakeOpenAI, agent: OpenAIAgent) -> None:
    fake.content = "  Financiamos em até 120 parcelas, Ana! Quer agendar uma conversa?\n"
    history = [
        {"direction": "in", "kind": "text", "body": "oi"},
        {"direction": "out", "kind": "text", "body": "Olá! Como posso te chamar?"},
        {"direction": "in", "kind": "image", "body": ""},  # media without caption: skipped
        {"direction": "in", "kind": "text", "body": "Ana"},
    ]
    lead = {"name": "Ana", "bill_value": 487.35, "stage": "offer_meeting", "solution": None}
    turn = Turn(["vocês financiam", "em quantas vezes?"], lead, history, KB)

    reply = await agent.respond(turn.input)

    assert reply.text == "Financiamos em até 120 parcelas, Ana! Quer agendar uma conversa?"
    assert reply.lead_updates == {}  # the name is known; no bill value in the burst
    assert turn.knowledge_calls == 1
    [request] = fake.requests
    body = request["body"]
    assert request["authorization"] == f"Bearer {KEY}"
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("test-model", 0.3, 400)
    messages = body["messages"]
    assert messages[0]["role"] == "system"
    assert "Sol Nascente Energia Solar" in messages[0]["content"]
    assert "20 minutos" in messages[0]["content"]
    known = messages[1]
    assert known["role"] == "system"
    assert "Nome: Ana" in known["content"] and "R$ 487,35" in known["content"]
    assert "Etapa: offer_meeting" in known["content"] and "Solução" not in known["content"]
    assert "Financiamento" in known["content"] and "120 parcelas" in known["content"]
    assert "25 anos de garantia" in known["content"]
    assert [(m["role"], m["content"]) for m in messages[2:]] == [
        ("user", "oi"),
        ("assistant", "Olá! Como posso te chamar?"),
        ("user", "Ana"),
        ("user", "vocês financiam\nem quantas vezes?"),
    ]


async def test_openai_records_name_and_bill_value(fake: FakeOpenAI, agent: OpenAIAgent) -> None:
    reply = await agent.respond(Turn(["oi, me chamo João", "minha conta vem uns R$ 450"]).input)
    assert reply.lead_updates == {"name": "João", "bill_value": Decimal("450.00")}
    known = fake.requests[0]["body"]["messages"][1]["content"]
    assert "Etapa: new" in known and "Nome" not in known and "nada relevante" in known

    # A name we already have is kept; a bare number is not taken for a bill value.
    reply = await agent.respond(Turn(["me chamo João", "uns 380"], {"name": "Maria"}).input)
    assert reply.lead_updates == {}


async def test_openai_http_error_raises_agent_error(fake: FakeOpenAI, agent: OpenAIAgent) -> None:
    fake.status = 500
    with pytest.raises(AgentError) as err:
        await agent.respond(Turn(["oi"]).input)
    message = str(err.value)
    assert "HTTP 500" in message and "fake failure" in message
    assert "\n" not in message and KEY not in message


async def test_openai_timeout_raises_agent_error(fake: FakeOpenAI) -> None:
    fake.delay = 30  # far beyond the timeout, so "not waited for" needs no tight bound
    cfg = config_for(SDR_AGENT_BACKEND="openai", SDR_AGENT_BASE_URL=fake.url, SDR_TIMEOUTS_AGENT="0.2")
    bot = OpenAIAgent(cfg)
    start = time.monotonic()
    try:
        with pytest.raises(AgentError, match=r"no answer within 0\.2s"):
            await bot.respond(Turn(["oi"]).input)
    finally:
        await bot.close()
    assert time.monotonic() - start < 10  # cut at 0.2 s, not after the 30 s answer
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    ("raw", "content", "why"),
    [
        ("<html>Bad Gateway</html>", None, "not JSON"),
        ('{"choices": []}', None, "no choices"),
        ('{"choices": [{"index": 0, "message": {"role": "assistant"}}]}', None, "content is empty"),
        ('["chat.completion"]', None, "no choices"),
        (None, None, "content is empty"),  # null content, as with a tool call
        (None, "  \n ", "content is empty"),
    ],
)
async def test_openai_malformed_answer_raises_agent_error(
    fake: FakeOpenAI, agent: OpenAIAgent, raw: str | None, content: str | None, why: str
) -> None:
    fake.raw, fake.content = raw, content
    with pytest.raises(AgentError, match=why):
        await agent.respond(Turn(["oi"]).input)


async def test_openai_unreachable_raises_agent_error() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bot = OpenAIAgent(config_for(SDR_AGENT_BASE_URL=f"http://127.0.0.1:{port}/v1", OPENAI_API_KEY=KEY))
    try:
        with pytest.raises(AgentError, match="request failed") as err:
            await bot.respond(Turn(["oi"]).input)
    finally:
        await bot.close()
    assert KEY not in str(err.value)


async def test_openai_without_key_sends_no_authorization(fake: FakeOpenAI) -> None:
    bot = OpenAIAgent(config_for(SDR_AGENT_BASE_URL=fake.url))
    try:
        reply = await bot.respond(Turn(["oi"]).input)
    finally:
        await bot.close()
    assert reply.text == fake.content
    assert fake.requests[0]["authorization"] is None
    assert fake.requests[0]["body"]["model"] == "gpt-4o-mini"  # the default model


# --- simulated ------------------------------------------------------------------------


async def test_simulated_honours_a_fixed_latency() -> None:
    bot = SimulatedAgent(config_for(SDR_AGENT_SIMULATED_LATENCY="fixed:0.05"))
    start = time.monotonic()
    reply = await bot.respond(Turn(["oi, tudo bem"]).input)
    assert time.monotonic() - start >= 0.05
    assert reply.text == "Obrigada pela mensagem! Já te respondo com os detalhes."
    assert reply.lead_updates == {}
    await bot.close()


async def test_simulated_awaits_knowledge_only_for_questions() -> None:
    bot = SimulatedAgent(config_for(SDR_AGENT_SIMULATED_LATENCY="fixed:0"))
    statement = Turn(["meu nome é Ana", "minha conta é R$ 400"], entries=KB)
    question = Turn(["vocês financiam", "em quantas vezes?"], entries=KB)
    no_answer = Turn(["quanto custa?"])

    assert (await bot.respond(statement.input)).text.startswith("Obrigada pela mensagem!")
    assert "Financiamento" in (await bot.respond(question.input)).text
    assert (await bot.respond(no_answer.input)).text.startswith("Obrigada pela mensagem!")
    assert (statement.knowledge_calls, question.knowledge_calls, no_answer.knowledge_calls) == (0, 1, 1)


def test_simulated_latency_is_repeatable_with_a_seed() -> None:
    latency = parse_latency("lognormal:median=1.5,p95=4")
    rng_a, rng_b = random.Random(42), random.Random(42)
    first = [latency.sample(rng_a) for _ in range(100)]
    assert first == [latency.sample(rng_b) for _ in range(100)]
    assert first != [latency.sample(random.Random(43)) for _ in range(100)]
    # The agent draws from a generator seeded with its `seed`.
    bot = SimulatedAgent(config_for(SDR_AGENT_SIMULATED_LATENCY="lognormal:median=1.5,p95=4"), seed=42)
    assert [bot.latency.sample(bot.rng) for _ in range(100)] == first


def test_lognormal_latency_has_the_configured_median_and_p95() -> None:
    latency = parse_latency("lognormal:median=1.5,p95=4")
    rng = random.Random(7)
    samples = sorted(latency.sample(rng) for _ in range(20000))
    assert statistics.median(samples) == pytest.approx(1.5, rel=0.05)
    assert samples[int(0.95 * len(samples))] == pytest.approx(4.0, rel=0.07)
    assert min(samples) > 0


# --- make_agent -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "cls"),
    [
        ("playbook", Playbook),
        ("openai", OpenAIAgent),
        ("simulated", SimulatedAgent),
    ],
)
async def test_make_agent_picks_the_backend(backend: str, cls: type) -> None:
    bot = make_agent(config_for(SDR_AGENT_BACKEND=backend))
    try:
        assert isinstance(bot, cls)
        assert bot.name == backend
    finally:
        await bot.close()
