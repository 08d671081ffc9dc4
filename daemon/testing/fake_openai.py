"""A fake OpenAI-compatible API (chat completions and audio transcriptions): a real HTTP
server (Starlette behind uvicorn on a free loopback port) that answers in OpenAI's wire
format and records what it received.

Chat completions speak the real protocol: plain JSON answers or server-sent events when the
request says `"stream": true`, function calling (`tool_calls`, streamed as argument
fragments), `usage` (in a stream only with `stream_options.include_usage`), OpenAI's error
bodies and `Retry-After`. A test scripts the answers with `Step`s, taken one per request in
order; when the script is empty the knobs (`content`, `status`, `raw`, ...) answer."""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from daemon.testing.servers import background_server, quiet_server

_ids = itertools.count(1)
_call_ids = itertools.count(1)
# Token-like pieces of streamed text, the way a BPE tokenizer cuts it: a word with the
# space before it (" world"), or a run of spaces alone. JSON arguments are cut between word
# and non-word runs (`{"`, `city`, `": "`, `Paris`, `"}`), as OpenAI's fragments look.
_CONTENT_PIECES = re.compile(r"\s*\S+|\s+")
_ARGUMENT_PIECES = re.compile(r"\w+|\W+")
_Call = tuple[str, str, str]  # a tool call as sent: (call id, function name, arguments)


@dataclass
class Step:
    """One scripted answer to one POST /v1/chat/completions (taken in order; when the script is empty the
    existing knobs answer as today)."""

    content: str | None = None  # the assistant text (of a status >= 400 step: the error's message)
    # (function name, arguments): a dict is JSON-encoded as a model would; a str is sent
    # verbatim (so tests can send malformed JSON)
    tool_calls: list[tuple[str, Any]] = field(default_factory=list)
    status: int = 200  # >= 400: OpenAI's error body {"error": {"message","type","param","code"}} with that status
    retry_after: float | None = None  # sent as the Retry-After header (seconds, as OpenAI does on 429)
    # Streamed: the connection is closed abruptly after this many chunks of content or tool
    # calls (the role chunk not counted; no finish_reason, no [DONE]); the client reads an
    # incomplete chunked body (httpx.RemoteProtocolError). Not streamed: the JSON body is
    # cut in the middle (fewer bytes than its Content-Length).
    cut_after: int | None = None
    # include `usage` (in a stream: only when the request has stream_options.include_usage, as OpenAI does)
    usage: bool = True
    ttft: float | None = None  # seconds before the first chunk / the answer (None: FakeOpenAI.ttft; errors: 0)
    token_interval: float | None = None  # seconds between streamed chunks (None: FakeOpenAI.token_interval)
    # Streamed: before chunk number `hold_after`, wait until `hold` is set (a test orders the
    # stream's rest after something else happened, such as the first WhatsApp message).
    hold: asyncio.Event | None = None
    hold_after: int = 0


class _Cut(Exception):
    """Raised inside a response body to make uvicorn close the connection mid-body."""


def _not_a_cut(record: logging.LogRecord) -> bool:
    """uvicorn logs every exception out of the app; a cut is on purpose, not worth a traceback."""
    return not (record.exc_info and isinstance(record.exc_info[1], _Cut))


@dataclass
class FakeOpenAI:
    """Knobs: `status` (>= 400 answers an OpenAI-style error), `delay` (seconds before
    answering), `content` (the reply; None sends `null` like a tool call), `transcript`
    (the text of every voice note) and `raw` (sent verbatim instead of a completion or a
    transcription, for malformed answers). `status`, `delay` and `raw` apply to both routes.

    `script`: `Step`s answering the next completions, first in first out (see `then`); the
    knobs answer when it is empty (a streamed request is then streamed with `content`).
    `ttft`/`token_interval` pace every completion, `events` times each one: ("request" on
    arrival, "first_chunk" when the first chunk or the answer goes out, then "done" after
    the last byte, "cut" when the connection was cut on purpose, "error" for an error
    answer, or "disconnect" when the client hung up first)."""

    url: str = ""  # base URL, ending in /v1
    requests: list[dict[str, Any]] = field(default_factory=list)  # {"body", "authorization"}
    # the `usage` of each completion answered ({"prompt_tokens", "completion_tokens"}; only
    # when it was sent: not for a step with usage=False nor a stream without include_usage)
    usages: list[dict[str, int]] = field(default_factory=list)
    status: int = 200
    delay: float = 0.0
    content: str | None = "Olá! Eu sou a Sol ☀️ Como posso te chamar?"
    raw: str | None = None
    # /audio/transcriptions: {"model", "language", "response_format", "file_bytes",
    # "filename", "content_type", "authorization"}
    transcriptions: list[dict[str, Any]] = field(default_factory=list)
    transcript: str = "Oi, minha conta de luz vem uns 400 reais por mês"
    script: list[Step] = field(default_factory=list)
    # Pacing of every completion: seconds before the first chunk (or before a non-streamed
    # answer), and between streamed chunks (a non-streamed answer also waits for all of
    # them, as the model generates the whole text first). Tests keep both at 0. These are
    # knobs, not measurements: for realistic runs, typical hosted small models answer with
    # a time-to-first-token of a few hundred ms and then emit 50-100 tokens/s (ttft ≈ 0.3,
    # token_interval ≈ 0.01-0.02).
    ttft: float = 0.0
    token_interval: float = 0.0
    events: list[tuple[float, str]] = field(default_factory=list)  # (time.monotonic(), what)

    def then(self, *steps: Step) -> FakeOpenAI:
        """Appends `steps` to the script; returns the fake, so calls chain."""
        self.script.extend(steps)
        return self

    def event(self, what: str) -> None:
        self.events.append((time.monotonic(), what))

    def app(self) -> Starlette:
        logging.getLogger("uvicorn.error").addFilter(_not_a_cut)  # once: the same filter is not added twice

        async def completions(request: Request) -> Response:
            body = await request.json()
            self.requests.append({"body": body, "authorization": request.headers.get("authorization")})
            self.event("request")
            step = self.script.pop(0) if self.script else None
            if self.delay and await _wait_or_disconnect(request, self.delay):
                self.event("disconnect")
                return Response(status_code=499)  # nobody reads it
            if step is None:
                if (canned := self.canned()) is not None:
                    self.event("error" if self.status >= 400 else "done")
                    return canned
                step = Step(content=self.content)
            if step.status >= 400:
                if step.ttft and await _wait_or_disconnect(request, step.ttft):
                    self.event("disconnect")
                    return Response(status_code=499)
                self.event("error")
                return openai_error(step.status, step.content or "fake failure", step.retry_after)
            calls = _calls(step)
            if body.get("stream") is True:
                return self.stream(body, step, calls)
            return await self.answer(request, body, step, calls)

        async def transcriptions(request: Request) -> Response:
            form = _multipart(await request.body(), request.headers.get("content-type", ""))
            filename, file_type, file_bytes = form.get("file", (None, None, b""))
            self.transcriptions.append(
                {
                    **{k: form[k][2].decode() for k in ("model", "language", "response_format") if k in form},
                    "file_bytes": file_bytes,
                    "filename": filename,
                    "content_type": file_type,
                    "authorization": request.headers.get("authorization"),
                }
            )
            if self.delay:
                await _wait_or_disconnect(request, self.delay)
            if (canned := self.canned()) is not None:
                return canned
            return JSONResponse({"text": self.transcript})

        return Starlette(
            routes=[
                Route("/v1/chat/completions", completions, methods=["POST"]),
                Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
            ]
        )

    def canned(self) -> Response | None:
        """The error or malformed answer the knobs ask for, if any."""
        if self.status >= 400:
            return openai_error(self.status, "fake failure")
        if self.raw is not None:
            return Response(self.raw, media_type="application/json")
        return None

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """The knobs' answer to `body`, as a chat.completion object (its usage recorded)."""
        return self.message(body, Step(content=self.content), [])

    def message(self, body: dict[str, Any], step: Step, calls: list[_Call]) -> dict[str, Any]:
        """`step` as a chat.completion object (its usage recorded when it has one)."""
        message: dict[str, Any] = {"role": "assistant", "content": step.content}
        if calls:
            message["tool_calls"] = [
                {"id": i, "type": "function", "function": {"name": name, "arguments": arguments}}
                for i, name, arguments in calls
            ]
        answer = {
            **_header(body, "chat.completion"),
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
        }
        if step.usage:
            answer["usage"] = self.usage(body, step, calls)
        return answer

    def usage(self, body: dict[str, Any], step: Step, calls: list[_Call]) -> dict[str, int]:
        """Words, not a tokenizer's tokens: enough to check that usage is read and priced."""
        prompt = sum(len(str(m.get("content") or "").split()) for m in body.get("messages", []))
        answer = len((step.content or "").split()) + sum(len(a.split()) for _, _, a in calls)
        self.usages.append({"prompt_tokens": prompt, "completion_tokens": answer})
        return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}

    async def answer(self, request: Request, body: dict[str, Any], step: Step, calls: list[_Call]) -> Response:
        """A non-streamed answer, after the time the model takes to write all of it."""
        content, fragments = _pieces(step, calls)
        pieces = len(content) + sum(1 + len(f) for f in fragments)
        wait = self._ttft(step) + self._interval(step) * max(pieces - 1, 0)
        if wait and await _wait_or_disconnect(request, wait):
            self.event("disconnect")
            return Response(status_code=499)
        encoded = json.dumps(self.message(body, step, calls), ensure_ascii=False).encode()
        self.event("first_chunk")
        if step.cut_after is None:
            self.event("done")
            return Response(encoded, media_type="application/json")

        async def cut() -> AsyncIterator[bytes]:
            yield encoded[: len(encoded) // 2]
            self.event("cut")
            raise _Cut

        length = {"content-length": str(len(encoded))}
        return StreamingResponse(cut(), headers=length, media_type="application/json")

    def stream(self, body: dict[str, Any], step: Step, calls: list[_Call]) -> Response:
        """Server-sent chat.completion.chunk events; Starlette stops the generator (cancels
        its wait) when the client hangs up."""
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        header = _header(body, "chat.completion.chunk")
        content, fragments = _pieces(step, calls)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data: dict[str, Any] = {**header, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if include_usage:
                data["usage"] = None  # as OpenAI: null on every chunk but the last
            return _event(data)

        payload = [chunk({"content": piece}) for piece in content]
        for index, ((call_id, name, _), pieces) in enumerate(zip(calls, fragments, strict=True)):
            first = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
            payload.append(chunk({"tool_calls": [first]}))
            payload += [chunk({"tool_calls": [{"index": index, "function": {"arguments": p}}]}) for p in pieces]
        if step.cut_after is not None:
            payload = payload[: step.cut_after]

        async def events() -> AsyncIterator[bytes]:
            finished = False  # done or cut on purpose, not left by a client that hung up
            try:
                if ttft := self._ttft(step):
                    await asyncio.sleep(ttft)
                self.event("first_chunk")
                yield chunk({"role": "assistant", "content": ""})
                for n, data in enumerate(payload):
                    if n and (interval := self._interval(step)):
                        await asyncio.sleep(interval)
                    if step.hold is not None and n == step.hold_after:
                        self.event("hold")
                        await step.hold.wait()
                    yield data
                if step.cut_after is not None:
                    self.event("cut")
                    finished = True
                    raise _Cut
                yield chunk({}, "tool_calls" if calls else "stop")
                if include_usage and step.usage:
                    yield _event({**header, "choices": [], "usage": self.usage(body, step, calls)})
                yield b"data: [DONE]\n\n"
                self.event("done")
                finished = True
            finally:
                if not finished:
                    self.event("disconnect")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    def _ttft(self, step: Step) -> float:
        return self.ttft if step.ttft is None else step.ttft

    def _interval(self, step: Step) -> float:
        return self.token_interval if step.token_interval is None else step.token_interval


def _header(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-fake{next(_ids):08d}",
        "object": kind,
        "created": int(time.time()),
        "model": body.get("model"),
    }


def _calls(step: Step) -> list[_Call]:
    """The tool calls of `step`, each with a new id; arguments JSON-encoded unless a str."""
    return [
        (
            f"call_fake{next(_call_ids):08d}",
            name,
            arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
        )
        for name, arguments in step.tool_calls
    ]


def _pieces(step: Step, calls: list[_Call]) -> tuple[list[str], list[list[str]]]:
    """The content's token-like pieces, and each tool call's argument fragments."""
    return _CONTENT_PIECES.findall(step.content or ""), [_ARGUMENT_PIECES.findall(a) for _, _, a in calls]


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def openai_error(status: int, message: str, retry_after: float | None = None, *, param: str | None = None) -> Response:
    """OpenAI's error body (type and code as OpenAI sends them for that status)."""
    if status == 429:
        kind, code = "requests", "rate_limit_exceeded"
    elif status == 401:
        kind, code = "invalid_request_error", "invalid_api_key"
    elif status < 500:
        kind, code = "invalid_request_error", None
    else:
        kind, code = "server_error", None
    error = {"message": message, "type": kind, "param": param, "code": code}
    headers = {} if retry_after is None else {"retry-after": f"{retry_after:g}"}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, str | None, bytes]]:
    """name -> (filename, content type, bytes) of a multipart/form-data body. Starlette's
    request.form() needs python-multipart, which the project does not depend on; httpx's
    bodies are simple enough to split on the boundary (binary-safe, unlike text parsers)."""
    header = email.parser.HeaderParser().parsestr(f"Content-Type: {content_type}\n\n")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str):
        return {}
    form: dict[str, tuple[str | None, str | None, bytes]] = {}
    for part in body.split(b"--" + boundary.encode())[1:-1]:  # drop the preamble and the "--" end
        head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = email.parser.BytesHeaderParser().parsebytes(head)
        name = headers.get_param("name", header="content-disposition")
        if isinstance(name, str):
            form[name] = (headers.get_filename(), headers.get("content-type"), content.removesuffix(b"\r\n"))
    return form


async def _wait_or_disconnect(request: Request, seconds: float) -> bool:
    """Sleeps, but stops when the client hangs up (a client that timed out), so the server
    shuts down at once instead of waiting for an answer nobody reads. True if it hung up."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(disconnected(), seconds)
    except TimeoutError:
        return False
    return True


@contextlib.asynccontextmanager
async def run_fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    async with background_server(quiet_server(fake.app())) as url:
        fake.url = f"{url}/v1"
        yield fake
