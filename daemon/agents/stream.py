"""A chat completion as the model writes it: OpenAI's server-sent events read into one
answer (text, tool calls, usage), the text cut into WhatsApp messages on the way.

A stream is whole only when it says so (a `finish_reason`, or `data: [DONE]`): a connection
that ends before that is a cut stream, and its unfinished paragraph is never sent."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from daemon.errors import AgentError
from daemon.evolution import split_message

PARAGRAPH_END = re.compile(r"\n\s*\n")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it (validated by the tool)

    def as_message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Answer:
    """One completion: its text, the tools it calls, and OpenAI's `usage` if sent."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


class Paragraphs:
    """Cuts text that arrives in pieces into WhatsApp messages: a paragraph is a message once
    the blank line after it arrived; one shorter than `min_part` waits to travel with the
    next; one longer than `max_len` is cut on sentence boundaries. What is left at the end
    is the last message; what is left when the stream is cut is dropped."""

    def __init__(self, min_part: int, max_len: int) -> None:
        self.min_part = min_part
        self.max_len = max_len
        self.pending = ""  # text not yet in a message
        self.held = ""  # complete paragraphs too short to go alone

    def feed(self, text: str) -> list[str]:
        self.pending += text
        parts: list[str] = []
        while match := PARAGRAPH_END.search(self.pending):
            paragraph = self.pending[: match.start()].strip()
            self.pending = self.pending[match.end() :]
            if paragraph:
                parts += self._paragraph(paragraph)
        return parts

    def flush(self) -> list[str]:
        """The end of a whole reply: the rest goes, short or not."""
        rest = "\n\n".join(x for x in (self.held, self.pending.strip()) if x)
        self.pending = self.held = ""
        return split_message(rest, self.max_len) if rest else []

    def _paragraph(self, paragraph: str) -> list[str]:
        text = f"{self.held}\n\n{paragraph}" if self.held else paragraph
        if len(text) < self.min_part:
            self.held = text
            return []
        self.held = ""
        return split_message(text, self.max_len)


async def read_stream(lines: AsyncIterator[str], on_text: Callable[[str], Awaitable[None]] | None = None) -> Answer:
    """The answer of an SSE body (`aiter_lines()`); each piece of text also goes to `on_text`
    as it arrives. AgentError when the stream ends before it says it is whole."""
    answer = Answer()
    calls: dict[int, ToolCall] = {}
    done = False
    async for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, ": keep-alive" comments, "event:" lines
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            raise AgentError("openai backend: a streamed chunk is not JSON") from None
        if isinstance(chunk.get("usage"), dict):
            answer.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if text := delta.get("content"):
                answer.content += text
                if on_text is not None:
                    await on_text(text)
            for piece in delta.get("tool_calls") or []:
                _merge(calls, piece)
            if choice.get("finish_reason"):
                answer.finish_reason = choice["finish_reason"]
    if not done and answer.finish_reason is None:
        raise AgentError("openai backend: the stream was cut before its end")
    answer.tool_calls = [calls[i] for i in sorted(calls)]
    return answer


def _merge(calls: dict[int, ToolCall], piece: dict[str, Any]) -> None:
    """A tool call arrives in fragments: the first has its id and name, the rest add to the
    arguments' JSON text."""
    index = piece.get("index", 0)
    fn = piece.get("function") or {}
    call = calls.setdefault(index, ToolCall(piece.get("id") or f"call_{index}", "", ""))
    if piece.get("id"):
        call.id = piece["id"]
    call.name += fn.get("name") or ""
    call.arguments += fn.get("arguments") or ""


def answer_of(data: Any) -> Answer:
    """The answer of a non-streamed completion."""
    try:
        choice = data["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise AgentError("openai backend: the answer has no choices[0].message") from None
    calls = [
        ToolCall(c.get("id") or f"call_{i}", c["function"]["name"], c["function"].get("arguments") or "")
        for i, c in enumerate(message.get("tool_calls") or [])
        if isinstance(c, dict) and isinstance(c.get("function"), dict) and c["function"].get("name")
    ]
    content = message.get("content")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
    return Answer(content if isinstance(content, str) else "", calls, choice.get("finish_reason"), usage)
