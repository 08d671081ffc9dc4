"""Agent backends: given a lead, its history and the burst it just sent, write the reply.

A backend awaits `knowledge()` only when it needs the knowledge base; the turn started
that search in parallel, so the wait is short or nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemon.config import AgentSettings
from daemon.store import KbEntry


@dataclass(frozen=True)
class TurnInput:
    lead: dict[str, Any]
    texts: list[str]  # the burst, in the order the lead wrote it
    history: list[dict[str, Any]]
    knowledge: Callable[[], Awaitable[list[KbEntry]]]


@dataclass(frozen=True)
class AgentReply:
    text: str
    lead_updates: dict[str, Any] = field(default_factory=dict)


class Agent(Protocol):
    name: str

    async def respond(self, turn: TurnInput) -> AgentReply: ...


def make_agent(settings: AgentSettings) -> Agent:
    from daemon.agents.playbook import Playbook

    # `backend` is validated against the implemented choices when the config loads.
    return Playbook(settings)
