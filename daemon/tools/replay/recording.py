"""The replay format: recorded conversations as JSONL, one message per line (README: Replay
format), read and checked line by line, and written back (`sdrctl export`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError
from daemon.identity import IDENTITY_HELP, parse_identity
from daemon.models import MEDIA_KINDS

REQUIRED = ("conversation", "phone", "direction", "text", "ts")
OPTIONAL = ("name", "media")
DIRECTIONS = ("in", "out")


@dataclass(frozen=True)
class Line:
    """One message of a recording; `where` ("FILE:N") points back at it."""

    conversation: str
    phone: str
    name: str | None
    direction: str
    text: str
    ts: datetime
    where: str
    media: dict[str, str] | None = None


@dataclass
class Burst:
    """The lead's consecutive messages, and the recorded reply parts that followed them."""

    messages: list[Line]
    recorded: list[Line] = field(default_factory=list)

    @property
    def expected(self) -> str | None:
        return "\n\n".join(r.text for r in self.recorded) if self.recorded else None


@dataclass
class Conversation:
    id: str
    phone: str
    bursts: list[Burst]


def parse_file(path: Path) -> list[Conversation]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return parse_lines(text.splitlines(), str(path))


def parse_lines(lines: Iterable[str], source: str) -> list[Conversation]:
    """JSONL text (blank lines allowed) as conversations, in the order they first appear."""
    docs: list[tuple[str, Any]] = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            docs.append((f"{source}:{n}", json.loads(raw)))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}:{n}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    return parse_docs(docs, source)


def parse_docs(docs: Iterable[tuple[str, Any]], source: str) -> list[Conversation]:
    conversations: dict[str, Conversation] = {}
    last_in: dict[str, datetime] = {}
    for where, doc in docs:
        line = _line(doc, where)
        conv = conversations.get(line.conversation)
        if conv is None:
            if line.direction == "out":
                raise ConfigError(
                    f'{where}: conversation {line.conversation!r} starts with an "out" line; a '
                    'replay re-sends the lead\'s messages, so each conversation starts with an "in" line'
                )
            conv = conversations[line.conversation] = Conversation(line.conversation, line.phone, [])
        elif line.phone != conv.phone:
            raise ConfigError(f"{where}: conversation {line.conversation!r} was with {conv.phone}, not {line.phone}")
        if line.direction == "out":
            conv.bursts[-1].recorded.append(line)
            continue
        before = last_in.get(line.conversation)
        if before is not None and line.ts < before:
            raise ConfigError(
                f"{where}: ts {line.ts.isoformat()} is earlier than the conversation's previous "
                '"in" line; the lines of a conversation go in time order'
            )
        last_in[line.conversation] = line.ts
        if conv.bursts and not conv.bursts[-1].recorded:
            conv.bursts[-1].messages.append(line)
        else:
            conv.bursts.append(Burst([line]))
    if not conversations:
        raise ConfigError(f"{source}: no conversations in it (one JSON object per line expected)")
    return list(conversations.values())


def _line(doc: Any, where: str) -> Line:
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a JSON object (one message per line)")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise ConfigError(f"{where}: missing field {missing[0]!r} (every line has {', '.join(REQUIRED)})")
    unknown = sorted(set(doc) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        allowed = ", ".join(REQUIRED + OPTIONAL)
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; allowed: {allowed}")
    for key in REQUIRED:
        if not isinstance(doc[key], str):
            raise ConfigError(f"{where}: {key} must be a string, not {json.dumps(doc[key])}")
    direction, phone, text = doc["direction"], doc["phone"], doc["text"]
    if direction not in DIRECTIONS:
        raise ConfigError(
            f'{where}: unknown direction {direction!r}; use "in" (the lead\'s message) or "out" (the bot\'s reply)'
        )
    if not isinstance(phone, str) or parse_identity(phone) != phone:
        raise ConfigError(f"{where}: phone {phone!r} must be {IDENTITY_HELP}")
    name = doc.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where}: name must be a string or null")
    media = _media(doc.get("media"), direction, where)
    if not text.strip() and media is None:
        raise ConfigError(f"{where}: text is empty (only a media line may have no text: its caption)")
    return Line(doc["conversation"], phone, name, direction, text, _ts(doc["ts"], where), where, media)


def _media(value: Any, direction: str, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if direction != "in":
        raise ConfigError(f'{where}: media is for the lead\'s ("in") messages only')
    if not isinstance(value, dict) or value.get("kind") not in MEDIA_KINDS:
        kinds = ", ".join(sorted(MEDIA_KINDS))
        raise ConfigError(f'{where}: media must be {{"kind": one of {kinds}, "ref": "..."}}')
    return {"kind": value["kind"], "ref": str(value.get("ref", ""))}


def _ts(value: str, where: str) -> datetime:
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        ts = None
    if ts is None or ts.tzinfo is None:
        raise ConfigError(
            f"{where}: ts {value!r} must be an ISO 8601 time with its offset, e.g. 2026-11-20T14:03:05-03:00"
        )
    return ts


def select(conversations: list[Conversation], ids: list[str] | None, source: str) -> list[Conversation]:
    """Only the conversations named (all when none are)."""
    if not ids:
        return conversations
    known = {c.id for c in conversations}
    unknown = [i for i in ids if i not in known]
    if unknown:
        shown = ", ".join(sorted(known)[:10]) + (", ..." if len(known) > 10 else "")
        raise ConfigError(f"{source}: no conversation {unknown[0]!r}; it has {shown}")
    return [c for c in conversations if c.id in ids]


def dumps_line(doc: dict[str, Any]) -> str:
    return json.dumps(doc, ensure_ascii=False)
