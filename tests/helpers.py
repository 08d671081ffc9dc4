"""Test helpers: an in-process daemon on a real port, a fake Evolution API (a real HTTP
server speaking its wire format), and waits that poll instead of sleeping blindly."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemon.config import Config, load_config
from daemon.embedded import Endpoints
from daemon.evolution import text_event
from daemon.runtime import Runtime
from daemon.server import uvicorn_server
from daemon.store import init_connection

FAST_PROFILE = str(Path(__file__).with_name("fast.toml"))
T = TypeVar("T")
_ids = itertools.count(1)


def make_config(endpoints: Endpoints, **env: str) -> Config:
    base = {"SDR_DATABASE_URL": endpoints.database_url, "SDR_REDIS_URL": endpoints.redis_url}
    return load_config(None, FAST_PROFILE, {**base, **env})


def event(phone: str, text: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("message_id", f"TEST{next(_ids):08d}")
    kw.setdefault("instance", "sdr")
    return text_event(phone, text, **kw)


async def _serve(server: uvicorn.Server) -> AsyncIterator[str]:
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


@dataclass
class Daemon:
    url: str
    runtime: Runtime


@contextlib.asynccontextmanager
async def run_daemon(config: Config, endpoints: Endpoints | None = None) -> AsyncIterator[Daemon]:
    """The real runtime and ASGI app behind uvicorn on a free loopback port."""
    endpoints = endpoints or Endpoints(config.database.url, config.redis.url)
    rt = Runtime(config, endpoints, auto_migrate=False)
    await rt.start()
    try:
        async with contextlib.asynccontextmanager(_serve)(
            uvicorn_server(config, rt, "127.0.0.1", 0)
        ) as url:
            yield Daemon(url, rt)
    finally:
        await rt.stop()


@dataclass
class FakeEvolution:
    """Records every sendText; answers with the statuses queued in `answers` first."""

    sent: list[dict[str, Any]] = field(default_factory=list)
    presences: list[dict[str, Any]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    url: str = ""

    def app(self) -> Starlette:
        async def send_text(request: Request) -> Response:
            body = await request.json()
            status = self.answers.pop(0) if self.answers else 201
            if status >= 400:
                return JSONResponse({"status": status, "error": "fake failure"}, status_code=status)
            self.sent.append(
                {"instance": request.path_params["instance"], "apikey": request.headers.get("apikey"),
                 "number": body["number"], "text": body["text"], "at": time.time()}
            )  # fmt: skip
            return JSONResponse(
                {"key": {"remoteJid": f"{body['number']}@s.whatsapp.net", "fromMe": True,
                         "id": f"BAE5{len(self.sent):012d}"},
                 "message": {"conversation": body["text"]}, "messageTimestamp": int(time.time()),
                 "status": "PENDING"},
                status_code=201,
            )  # fmt: skip

        async def send_presence(request: Request) -> Response:
            self.presences.append({**await request.json(), "at": time.time()})
            return JSONResponse({"presence": "composing"}, status_code=201)

        return Starlette(
            routes=[
                Route("/message/sendText/{instance}", send_text, methods=["POST"]),
                Route("/chat/sendPresence/{instance}", send_presence, methods=["POST"]),
            ]
        )


@contextlib.asynccontextmanager
async def run_fake_evolution() -> AsyncIterator[FakeEvolution]:
    fake = FakeEvolution()
    config = uvicorn.Config(
        fake.app(), host="127.0.0.1", port=0, loop="none", lifespan="off", log_config=None,
        access_log=False, ws="none",
    )  # fmt: skip
    async with contextlib.asynccontextmanager(_serve)(uvicorn.Server(config)) as url:
        fake.url = url
        yield fake


async def wait_for(check: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    """Polls `check` until it returns something truthy; fails the test at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(0.02)


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        await init_connection(conn)
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


REPO = Path(__file__).resolve().parent.parent


@dataclass
class ServeProcess:
    """A real `sdrctl serve` in a subprocess, its log in a file (not a pipe nobody reads)."""

    proc: asyncio.subprocess.Process
    url: str
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    async def wait_ready(self, timeout: float = 60) -> None:
        async with httpx.AsyncClient(base_url=self.url) as http:

            async def ready() -> bool:
                assert self.proc.returncode is None, self.log
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, timeout=timeout)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_serve(env: dict[str, str], log_path: Path, profile: str = FAST_PROFILE) -> ServeProcess:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("SDR_")}
    full.update(env, SDR_DAEMON_PORT=str(port))
    with log_path.open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sdrctl", "serve", "--profile", profile,
            cwd=REPO, env=full, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    return ServeProcess(proc, f"http://127.0.0.1:{port}", log_path)
