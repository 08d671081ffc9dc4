"""What an agent may do besides writing its reply: the tools, their schemas (OpenAI function
calling) and their rules, checked here, server-side, whatever the model or the lead asks.

A tool call never writes by itself. It is validated, then its effect is kept on the turn's
`Effects` and written with the turn's reply, in the turn's one fenced statement: a turn that
loses its lead (or is thrown away) leaves no meeting, no lead update and no follow-up behind.
A refused call goes back to the model as `{"error": ...}` saying what is allowed, so it can
try again; no tool takes a phone number, so nothing a lead writes can reach another lead."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from daemon import telemetry
from daemon.config import FollowUpSettings, parse_durations
from daemon.followups.calendar import BusinessHours
from daemon.followups.planner import Planned
from daemon.followups.templates import meeting_phrase
from daemon.models import KbEntry

log = logging.getLogger("sdr.agent")

# The qualification fields a model may set, and what each may hold (checked below).
PROPERTY_TYPES = ("casa", "apartamento", "comercial", "rural")
DECISION = ("lead", "compartilhada", "outra_pessoa")
SOLUTIONS = ("assinatura", "residencial", "projeto_sob_medida")
BILL_RANGE = (Decimal(30), Decimal(200_000))  # a month's bill, R$: below 30 is not a real bill
KWH_RANGE = (10, 2_000_000)  # a month's consumption
NAME = re.compile(r"[^\W\d_]+(?:[ '’-][^\W\d_]+){0,5}")
AGENT_FOLLOWUP = "agent_followup"  # the follow-up kind schedule_followup plans

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "search_knowledge",
            "description": "Busca na base de conhecimento da empresa (preços, prazos, financiamento, garantia, "
            "instalação). Use antes de responder sobre esses assuntos.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "description": "a pergunta, em português"}},
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "update_lead",
            "description": "Registra o que o lead contou sobre si. Só os campos abaixo; valores fora das faixas "
            "são recusados.",
            "parameters": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "primeiro nome (ou nome e sobrenome)"},
                    "bill_value": {"type": "number", "description": "conta de luz média por mês, em R$ (30 a 200000)"},
                    "consumption_kwh": {"type": "integer", "description": "consumo médio por mês, kWh"},
                    "property_type": {"type": "string", "enum": list(PROPERTY_TYPES)},
                    "decision_maker": {"type": "string", "enum": list(DECISION)},
                    "solution": {"type": "string", "enum": list(SOLUTIONS)},
                },
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_meeting",
            "description": "Agenda a conversa com um consultor. Só no horário comercial e no futuro, no fuso da "
            "empresa; confirme dia e hora com o lead antes.",
            "parameters": {
                "type": "object",
                "properties": {
                    "when": {
                        "type": "string",
                        "description": "data e hora locais, ISO 8601, como 2026-12-04T15:00",
                    },
                    "notes": {"type": "string", "description": "o que o consultor deve saber (até 500 caracteres)"},
                },
                "required": ["when"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "request_human",
            "description": "Passa a conversa para uma pessoa da equipe (o lead pediu, está irritado, ou o "
            "assunto foge do que você pode resolver). O robô para de responder a este lead.",
            "parameters": {
                "type": "object",
                "properties": {"reason": {"type": "string", "description": "por quê, em uma frase"}},
                "required": ["reason"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "schedule_followup",
            "description": "Combina de voltar a falar com o lead mais tarde (ex.: 'me chama semana que vem').",
            "parameters": {
                "type": "object",
                "properties": {
                    "after": {"type": "string", "description": "daqui a quanto tempo: 2h, 3d, 1w"},
                    "reason": {"type": "string", "description": "o combinado, em uma frase"},
                },
                "required": ["after", "reason"],
                "additionalProperties": False,
            },
        },
    },
]
NAMES = frozenset(t["function"]["name"] for t in TOOLS)


class Refused(ValueError):
    """A call outside its tool's rules: its message goes back to the model."""


@dataclass(frozen=True)
class ToolRules:
    """The bounds the tools keep, from [followups] (business hours and delays)."""

    hours: BusinessHours
    meeting_notice: float  # seconds: the earliest meeting is this far from now
    meeting_horizon: float  # the latest, this far
    meeting_length: float  # a meeting must end inside business hours too
    followup_min: float
    followup_max: float

    @classmethod
    def from_settings(cls, s: FollowUpSettings) -> ToolRules:
        (notice,), (horizon,), (length,) = (
            parse_durations(x) for x in (s.meeting_notice, s.meeting_horizon, s.meeting_length)
        )
        (low,), (high,) = parse_durations(s.agent_followup_min), parse_durations(s.agent_followup_max)
        return cls(BusinessHours.from_settings(s), notice, horizon, length, low, high)


@dataclass
class Effects:
    """What the turn's accepted calls asked for, written with its reply."""

    updates: dict[str, Any] = field(default_factory=dict)
    handoff: str | None = None  # request_human's reason
    followup: Planned | None = None
    calls: list[tuple[str, bool]] = field(default_factory=list)  # (tool, accepted), in order


class ToolBox:
    """One turn's tools: `call(name, arguments)` validates and records; the result is the
    JSON text the model reads next."""

    def __init__(
        self,
        rules: ToolRules,
        now: datetime,
        search: Callable[[str], Awaitable[list[KbEntry]]],
    ) -> None:
        self.rules = rules
        self.now = now
        self.search = search
        self.effects = Effects()

    async def call(self, name: str, arguments: str) -> str:
        with telemetry.span(f"tool {name}", attributes={"gen_ai.tool.name": name}) as span:  # traced: a span each
            try:
                args = _arguments(arguments)
                if name not in NAMES:
                    raise Refused(f"unknown tool {name!r}: the tools are {', '.join(sorted(NAMES))}")
                result = await getattr(self, name)(**args) if _fits(name, args) else None
            except Refused as exc:
                self.effects.calls.append((name, False))
                telemetry.failed(span, f"refused: {exc}")
                log.info("tool %s refused: %s", name, exc)
                return json.dumps({"error": str(exc)}, ensure_ascii=False)
            self.effects.calls.append((name, True))
            return json.dumps(result, ensure_ascii=False, default=str)

    async def search_knowledge(self, query: str) -> dict[str, Any]:
        query = _text(query, "query", 2, 200)
        entries = await self.search(query)
        return {"entries": [{"title": e.title, "content": e.content} for e in entries]}

    async def update_lead(self, **fields: Any) -> dict[str, Any]:
        """All fields or none: one bad value refuses the call."""
        if not fields:
            raise Refused("update_lead needs at least one field")
        checked = {key: CHECKS[key](value) for key, value in fields.items()}
        self.effects.updates.update(checked)
        return {"ok": True, "updated": sorted(checked)}

    async def book_meeting(self, when: str, notes: str = "") -> dict[str, Any]:
        notes = _text(notes, "notes", 0, 500) if notes else ""
        return {**self.meeting(self._instant(when), when), "notes_saved": bool(notes)}

    def meeting(self, at: datetime, when: str | None = None) -> dict[str, Any]:
        """Books `at` if the rules allow it (the playbook's meetings go through here too)."""
        r = self.rules
        when = when or at.isoformat()
        if at < self.now + timedelta(seconds=r.meeting_notice):
            raise Refused(f"{when!r} is too soon: a meeting must be at least {_span(r.meeting_notice)} from now")
        if at > self.now + timedelta(seconds=r.meeting_horizon):
            raise Refused(f"{when!r} is too far: at most {_span(r.meeting_horizon)} from now")
        end = at + timedelta(seconds=r.meeting_length) - timedelta(minutes=1)
        if not (r.hours.is_open(at) and r.hours.is_open(end)):
            raise Refused(f"{when!r} is outside business hours: {_hours(r.hours)}")
        self.effects.updates.update({"meeting_at": at, "stage": "booked"})
        return {"ok": True, "meeting": meeting_phrase(at, r.hours)}

    async def request_human(self, reason: str) -> dict[str, Any]:
        self.effects.handoff = _text(reason, "reason", 1, 300)
        return {"ok": True, "note": "uma pessoa da equipe assume a conversa; avise o lead"}

    async def schedule_followup(self, after: str, reason: str) -> dict[str, Any]:
        r = self.rules
        try:
            (seconds,) = parse_durations(after)
        except ValueError:
            raise Refused(f"after {after!r}: a duration such as 2h, 3d or 1w") from None
        if not r.followup_min <= seconds <= r.followup_max:
            raise Refused(f"after {after!r}: between {_span(r.followup_min)} and {_span(r.followup_max)}")
        due = r.hours.next_opening(self.now + timedelta(seconds=seconds))
        reason = _text(reason, "reason", 1, 300)
        self.effects.followup = Planned(AGENT_FOLLOWUP, 1, due, {"reason": reason})
        return {"ok": True, "due": meeting_phrase(due, r.hours)}

    def _instant(self, when: str) -> datetime:
        """ISO 8601; without an offset, on the business's clock."""
        try:
            at = datetime.fromisoformat(str(when).strip())
        except ValueError:
            raise Refused(f"when {when!r}: use ISO 8601 local time, such as 2026-12-04T15:00") from None
        return at.replace(tzinfo=self.rules.hours.tz) if at.tzinfo is None else at


def _arguments(text: str) -> dict[str, Any]:
    try:
        args = json.loads(text or "{}")
    except ValueError:
        raise Refused("the arguments are not valid JSON") from None
    if not isinstance(args, dict):
        raise Refused("the arguments must be a JSON object")
    return args


def _fits(name: str, args: dict[str, Any]) -> bool:
    """The call's argument names against its schema (values are checked by the tool)."""
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)
    unknown = sorted(set(args) - set(schema["properties"]))
    if unknown:
        raise Refused(f"{name}: unknown argument(s) {', '.join(unknown)}; allowed: {', '.join(schema['properties'])}")
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        raise Refused(f"{name}: missing {', '.join(missing)}")
    return True


def _text(value: Any, what: str, low: int, high: int) -> str:
    if not isinstance(value, str) or not low <= len(value.strip()) <= high:
        raise Refused(f"{what}: text of {low} to {high} characters")
    return value.strip()


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise Refused(f"{value!r}: one of {', '.join(options)}")
        return str(value)

    return check


def _name(value: Any) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value.strip()) or len(value.strip()) > 60:
        raise Refused("name: letters only (a first name, or first and last), at most 60 characters")
    return value.strip()


def _bill(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Refused("bill_value: a number of reais")
    amount = Decimal(str(value)).quantize(Decimal("0.01"))
    low, high = BILL_RANGE
    if not low <= amount <= high:
        raise Refused(f"bill_value {value}: a month's bill is between R$ {low} and R$ {high}")
    return amount


def _kwh(value: Any) -> int:
    low, high = KWH_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Refused(f"consumption_kwh {value!r}: a whole number of kWh from {low} to {high}")
    return value


CHECKS: dict[str, Callable[[Any], Any]] = {
    "name": _name,
    "bill_value": _bill,
    "consumption_kwh": _kwh,
    "property_type": _choice(PROPERTY_TYPES),
    "decision_maker": _choice(DECISION),
    "solution": _choice(SOLUTIONS),
}


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


DAYS = ("seg", "ter", "qua", "qui", "sex", "sáb", "dom")


def _hours(h: BusinessHours) -> str:
    days = ",".join(DAYS[d] for d in sorted(h.days))
    return f"{days} {h.opens // 60:02d}:{h.opens % 60:02d}-{h.closes // 60:02d}:{h.closes % 60:02d} ({h.tz.key})"


def business_context(rules: ToolRules, now: datetime) -> str:
    """The date, time and hours the model needs to book ("sexta às 15h"), in pt-BR."""
    here = rules.hours.local(now)
    return (
        f"Agora: {meeting_phrase(now, rules.hours)} ({here:%Y-%m-%d %H:%M}). Horário comercial: {_hours(rules.hours)}."
    )
