"""A fake Evolution API: a real HTTP server speaking its sendText/sendPresence wire format.

WhatsApp cannot run here, so benches (and tests) point the daemon at this instead; it
records each reply's arrival time by the same clock the load generator uses."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@contextlib.asynccontextmanager
async def background_server(server: uvicorn.Server) -> AsyncIterator[str]:
    """Runs a uvicorn server (port 0 = any free port) in this loop; yields its URL."""
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server stopped before it started")
        await asyncio.sleep(0.01)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task


def quiet_server(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> uvicorn.Server:
    config = uvicorn.Config(
        app, host=host, port=port, loop="none", lifespan="off", log_config=None,
        access_log=False, ws="none", http="httptools",
    )  # fmt: skip
    return uvicorn.Server(config)


@dataclass
class FakeEvolution:
    """Records every sendText; answers with the statuses queued in `answers` first."""

    keep_bodies: bool = True  # benches keep only arrival times
    sent: list[dict[str, Any]] = field(default_factory=list)
    presences: list[dict[str, Any]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    arrivals: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    url: str = ""
    # Media the fake can hand out by message id, as base64 (getBase64FromMediaMessage).
    media: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (base64, mimetype)
    media_requests: list[dict[str, Any]] = field(default_factory=list)
    # Fault injection (the fault suite): until `failing_until` (a time.time()), every
    # sendText answers `failing_status`, or with 0 stalls `stall` seconds and answers 504
    # without delivering (a timeout on the caller's side).
    failing_until: float = 0.0
    failing_status: int = 503
    stall: float = 0.0
    _signals: dict[str, asyncio.Event] = field(default_factory=dict)
    _count: int = 0

    async def wait_replies(self, phone: str, count: int, after: float, timeout: float) -> list[float] | None:
        """Waits for `count` replies to `phone` that arrive after `after` (a time.time());
        consumes them and drops earlier ones. None at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.arrivals[phone] = [t for t in self.arrivals[phone] if t >= after]
            if len(self.arrivals[phone]) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            signal = self._signals.setdefault(phone, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await signal.wait()
            signal.clear()
        got, self.arrivals[phone] = self.arrivals[phone][:count], self.arrivals[phone][count:]
        return got

    def forget(self, phone: str) -> list[float]:
        """Drops (and returns) replies nobody waited for: late or extra ones."""
        self._signals.pop(phone, None)
        return self.arrivals.pop(phone, [])

    def app(self) -> Starlette:
        async def send_text(request: Request) -> Response:
            now = time.time()
            body = await request.json()
            if now < self.failing_until:
                if self.failing_status == 0:
                    await asyncio.sleep(self.stall)
                    return JSONResponse({"status": 504, "error": "stalled"}, status_code=504)
                return JSONResponse({"status": self.failing_status, "error": "injected"}, status_code=self.failing_status)
            status = self.answers.pop(0) if self.answers else 201
            if status >= 400:
                return JSONResponse({"status": status, "error": "fake failure"}, status_code=status)
            self._count += 1
            number = str(body["number"])
            message_id = f"BAE5{self._count:012d}"
            self.arrivals[number].append(now)
            if number in self._signals:
                self._signals[number].set()
            if self.keep_bodies:
                self.sent.append(
                    {"instance": request.path_params["instance"], "apikey": request.headers.get("apikey"),
                     "number": number, "text": body["text"], "at": now, "id": message_id}
                )  # fmt: skip
            return JSONResponse(
                {"key": {"remoteJid": f"{number}@s.whatsapp.net", "fromMe": True, "id": message_id},
                 "message": {"conversation": body["text"]}, "messageTimestamp": int(now),
                 "status": "PENDING"},
                status_code=201,
            )  # fmt: skip

        async def send_presence(request: Request) -> Response:
            try:
                body = await request.json()
            except ClientDisconnect:  # the sender gave up on it: nothing to answer
                return Response(status_code=499)
            if self.keep_bodies:
                self.presences.append({**body, "at": time.time()})
            return JSONResponse({"presence": body.get("presence")}, status_code=201)

        async def get_base64(request: Request) -> Response:
            body = await request.json()
            self.media_requests.append({"instance": request.path_params["instance"], **body})
            key = (body.get("message") or {}).get("key") or {}
            found = self.media.get(str(key.get("id")))
            if found is None:
                return JSONResponse({"status": 400, "error": "Bad Request",
                                     "response": {"message": ["Message not found"]}}, status_code=400)  # fmt: skip
            b64, mimetype = found
            return JSONResponse({"mediaType": mimetype.split("/")[0] + "Message", "fileName": None,
                                 "caption": None, "size": {}, "mimetype": mimetype, "base64": b64},
                                status_code=201)  # fmt: skip

        async def find_messages(request: Request) -> Response:
            # Evolution v2's message search, for what we sent to one chat (fromMe).
            where = (await request.json()).get("where") or {}
            jid = str((where.get("key") or {}).get("remoteJid", ""))
            number = jid.split("@", 1)[0]
            records = [
                {"key": {"remoteJid": jid, "fromMe": True, "id": s["id"]},
                 "message": {"conversation": s["text"]}, "messageTimestamp": int(s["at"])}
                for s in self.sent if s["number"] == number
            ]  # fmt: skip
            return JSONResponse({"messages": {"total": len(records), "pages": 1, "currentPage": 1, "records": records}})

        return Starlette(
            routes=[
                Route("/chat/findMessages/{instance}", find_messages, methods=["POST"]),
                Route("/chat/getBase64FromMediaMessage/{instance}", get_base64, methods=["POST"]),
                Route("/message/sendText/{instance}", send_text, methods=["POST"]),
                Route("/chat/sendPresence/{instance}", send_presence, methods=["POST"]),
            ]
        )


@contextlib.asynccontextmanager
async def run_fake_evolution(keep_bodies: bool = True, port: int = 0) -> AsyncIterator[FakeEvolution]:
    fake = FakeEvolution(keep_bodies=keep_bodies)
    async with background_server(quiet_server(fake.app(), port=port)) as url:
        fake.url = url
        yield fake
