"""The `simulated` backend, for benches: a model's latency without a model.

Each call sleeps for a latency drawn from `[agent] simulated_latency`; questions await the
knowledge base first, as a real agent would, so benches exercise the search path too."""

from __future__ import annotations

import asyncio
import random

from daemon.agents import AgentReply, TurnInput
from daemon.agents.playbook import is_question, questions_in
from daemon.config import Config
from daemon.latency import parse_latency


class SimulatedAgent:
    name = "simulated"

    def __init__(self, config: Config, seed: int | None = None) -> None:
        self.latency = parse_latency(config.agent.simulated_latency)
        self.rng = random.Random(seed)  # a seed makes a bench's latencies repeatable

    async def close(self) -> None:
        """Nothing to release: no connections."""

    def knowledge_query(self, texts: list[str]) -> str | None:
        return questions_in(texts)

    async def respond(self, turn: TurnInput) -> AgentReply:
        burst = "\n".join(turn.texts)
        entries = await turn.knowledge() if burst and is_question(burst) else []
        await asyncio.sleep(self.latency.sample(self.rng))
        if entries:
            return AgentReply(f"Boa pergunta! Sobre {entries[0].title}: já te passo os detalhes.")
        return AgentReply("Obrigada pela mensagem! Já te respondo com os detalhes.")
