"""The pipeline's domain types: what a lead sent, what a turn read and wrote. Plain frozen
dataclasses, so the Evolution client, the agents and the store share them without
importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

# The kinds of media message the intake stores (besides 'text' and 'edit'), and the ones
# the media processor reads (photos, voice notes); the rest are answered by their caption.
MEDIA_KINDS = frozenset({"image", "audio", "video", "document", "sticker"})
ANALYSED_KINDS = frozenset({"image", "audio"})


@dataclass(frozen=True)
class Inbound:
    """One lead message as the intake stores it."""

    phone: str
    push_name: str | None
    provider_id: str
    kind: str
    body: str
    media: dict[str, Any] | None
    provider_ts: datetime
    lid: str | None = None  # the lead's LID jid, when the event gave it
    trace: str | None = None  # the webhook's span (W3C traceparent) with tracing on (daemon.telemetry)


@dataclass(frozen=True)
class Takeover:
    """A message to the lead from the business's own number that the API did not send: a
    person (a consultant on the phone or WhatsApp Web) wrote to the lead. Evolution's
    Baileys runs with emitOwnEvents off, so our API sends come back as `send.message`, not
    as `messages.upsert`; the id is still checked against our sends (daemon.runtime)."""

    phone: str
    lid: str | None
    provider_id: str
    body: str
    provider_ts: datetime


@dataclass(frozen=True)
class PendingMessage:
    id: int
    lead_id: int
    conversation_id: int
    kind: str
    body: str
    provider_ts: datetime
    received_at: datetime
    media: dict[str, Any] | None = None  # image/audio: mimetype, seconds, key, base64 when sent
    trace: str | None = None  # the span of the webhook that stored it (W3C traceparent), if traced


@dataclass(frozen=True)
class KbEntry:
    id: int
    category: str
    title: str
    content: str
    rank: float
    key: str = ""  # the stable key `sdrctl kb` imports by


@dataclass(frozen=True)
class TurnRecord:
    """What a turn writes. `of(burst, ...)` fills in what the burst says; the rest defaults
    to a turn without stages or reply (a silent one)."""

    lead_id: int
    conversation_id: int
    message_ids: list[int]
    first_message_at: datetime
    last_message_at: datetime
    started_at: datetime
    finished_at: datetime
    phone: str
    outbox_status: str  # daemon.outbox.Status: PENDING (to be sent), LOCAL (`sdrctl chat`), SUPPRESSED
    buffer_wait_ms: float = 0.0
    window_ms: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    timeouts: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    agent_backend: str = "none"
    outcome: str = "ok"
    reply: str = ""
    parts: list[str] = field(default_factory=list)  # the reply as WhatsApp messages (split on sentence boundaries)
    response_ms: float | None = None  # known now for local replies; set on delivery otherwise
    lead_updates: dict[str, Any] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    prompt_tokens: int | None = None  # what the agent's model billed (None: no model)
    completion_tokens: int | None = None
    cost: float | None = None  # at [agent] price_in/price_out; None when not priced

    @classmethod
    def of(
        cls, burst: list[PendingMessage], phone: str, started: datetime, finished: datetime, status: str, **rest: Any
    ) -> TurnRecord:
        first, last = burst[0], burst[-1]
        return cls(
            lead_id=first.lead_id,
            conversation_id=first.conversation_id,
            message_ids=[m.id for m in burst],
            first_message_at=first.received_at,
            last_message_at=last.received_at,
            started_at=started,
            finished_at=finished,
            phone=phone,
            outbox_status=status,
            **rest,
        )


# Why a turn's write was refused: its fencing token is not the lead's newest, or another
# turn answered its messages ('fenced'); a newer message of the lead is waiting and the
# reply was speculative ('newer_message'); a person took over the lead, or it is ignored
# ('paused').
Refused = Literal["fenced", "newer_message", "paused"]


@dataclass(frozen=True)
class FinishedTurn:
    turn_id: int
    outbox_ids: list[int]
    lead: dict[str, Any]  # the lead as stored after the turn's updates
    reply_id: int | None = None  # the reply's row in messages (a streamed reply grows on it)
