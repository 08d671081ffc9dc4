"""Agent backends: given a lead, its history and the burst it just sent, write the reply.

A backend awaits `knowledge()` only when it needs the knowledge base; the turn started
that search in parallel, so the wait is short or nothing. The runtime makes one agent at
start and closes it at shutdown (backends may hold pooled connections)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from daemon.config import Config
from daemon.errors import ConfigError
from daemon.followups.calendar import BusinessHours, Clock, utc_now
from daemon.media.result import MediaResult
from daemon.models import KbEntry

if TYPE_CHECKING:
    from daemon.agents.tools import ToolBox

# A streamed reply's parts go here, each the moment it is complete (the turn sends it).
PartSink = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class TurnInput:
    lead: dict[str, Any]
    texts: list[str]  # the burst, in the order the lead wrote it
    history: list[dict[str, Any]]
    knowledge: Callable[[], Awaitable[list[KbEntry]]]
    media: list[MediaResult] = field(default_factory=list)  # the burst's photos and voice notes
    tools: ToolBox | None = None  # what the agent may do besides replying (None: nothing)
    parts: PartSink | None = None  # given: the reply may be streamed, part by part, into it


@dataclass(frozen=True)
class AgentReply:
    text: str
    lead_updates: dict[str, Any] = field(default_factory=dict)
    usage: Usage | None = None  # what the model billed for this reply (None: no model)


@dataclass(frozen=True)
class Usage:
    """Tokens of one agent call: from the API's `usage`, or counted (about 4 characters a
    token, `estimated`) when the answer has none."""

    prompt: int
    completion: int
    estimated: bool = False

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt + other.prompt, self.completion + other.completion, self.estimated or other.estimated)

    def cost(self, price_in: float, price_out: float) -> float | None:
        """At [agent] price_in/price_out per million tokens; None when neither is set."""
        if not (price_in or price_out):
            return None
        return (self.prompt * price_in + self.completion * price_out) / 1_000_000


class Agent(Protocol):
    name: str

    def knowledge_query(self, texts: list[str]) -> str | None:
        """What to search the knowledge base for in this burst; None = no search (so none
        is run in vain)."""
        ...

    async def respond(self, turn: TurnInput) -> AgentReply: ...

    async def close(self) -> None: ...


def make_agent(config: Config, clock: Clock = utc_now) -> Agent:
    """`clock`: the playbook reads meeting days ("sexta às 15h") on it; default the real one."""
    # Imported here: the backends import TurnInput/AgentReply from this module.
    backend = config.agent.backend
    if backend == "playbook":
        from daemon.agents.playbook import Playbook

        return Playbook(config.agent, BusinessHours.from_settings(config.followups), clock)
    if backend == "openai":
        from daemon.agents.openai import OpenAIAgent

        return OpenAIAgent(config)
    if backend == "simulated":
        from daemon.agents.simulated import SimulatedAgent

        return SimulatedAgent(config)
    # The config refuses other values when it loads; this guards hand-built configs.
    raise ConfigError(f"[agent] backend = {backend!r}: must be one of playbook, openai, simulated")
