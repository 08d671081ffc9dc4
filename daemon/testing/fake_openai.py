"""A fake OpenAI-compatible API (chat completions and audio transcriptions): a real HTTP
server (Starlette behind uvicorn on a free loopback port) that answers in OpenAI's wire
format and records what it received."""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemon.testing.servers import background_server, quiet_server

_ids = itertools.count(1)


@dataclass
class FakeOpenAI:
    """Knobs: `status` (>= 400 answers an OpenAI-style error), `delay` (seconds before
    answering), `content` (the reply; None sends `null` like a tool call), `transcript`
    (the text of every voice note) and `raw` (sent verbatim instead of a completion or a
    transcription, for malformed answers). `status`, `delay` and `raw` apply to both routes."""

    url: str = ""  # base URL, ending in /v1
    requests: list[dict[str, Any]] = field(default_factory=list)  # {"body", "authorization"}
    usages: list[dict[str, int]] = field(default_factory=list)  # the `usage` of each completion answered
    status: int = 200
    delay: float = 0.0
    content: str | None = "Olá! Eu sou a Sol ☀️ Como posso te chamar?"
    raw: str | None = None
    # /audio/transcriptions: {"model", "language", "response_format", "file_bytes",
    # "filename", "content_type", "authorization"}
    transcriptions: list[dict[str, Any]] = field(default_factory=list)
    transcript: str = "Oi, minha conta de luz vem uns 400 reais por mês"

    def app(self) -> Starlette:
        async def completions(request: Request) -> Response:
            body = await request.json()
            self.requests.append({"body": body, "authorization": request.headers.get("authorization")})
            if self.delay:
                await _wait_or_disconnect(request, self.delay)
            if (canned := self.canned()) is not None:
                return canned
            return JSONResponse(self.completion(body))

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
            error = {"message": "fake failure", "type": "server_error", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=self.status)
        if self.raw is not None:
            return Response(self.raw, media_type="application/json")
        return None

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        # Words, not a tokenizer's tokens: enough to check that usage is read and priced.
        prompt = sum(len(str(m.get("content") or "").split()) for m in body.get("messages", []))
        answer = len((self.content or "").split())
        self.usages.append({"prompt_tokens": prompt, "completion_tokens": answer})
        return {
            "id": f"chatcmpl-fake{next(_ids):08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": self.content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer},
        }


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


async def _wait_or_disconnect(request: Request, seconds: float) -> None:
    """Sleeps, but stops when the client hangs up (a client that timed out), so the server
    shuts down at once instead of waiting for an answer nobody reads."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(disconnected(), seconds)


@contextlib.asynccontextmanager
async def run_fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    async with background_server(quiet_server(fake.app())) as url:
        fake.url = f"{url}/v1"
        yield fake
