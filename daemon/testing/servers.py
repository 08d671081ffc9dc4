"""Servers the tools and the tests start on loopback: an ASGI app behind uvicorn in this
event loop (a fake, or a daemon in this process), a free port for a server started as a
subprocess, and the wait for a daemon's /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette


def free_port() -> int:
    """A loopback port free right now. Another process may take it before ours binds it:
    only for servers that cannot be given port 0 (a subprocess whose URL we must know)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    """uvicorn for a fake: no logs, no lifespan, no websockets."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        ws="none",
        http="httptools",
    )
    return uvicorn.Server(config)


async def wait_ready(url: str, process: asyncio.subprocess.Process, timeout: float) -> bool:
    """Polls the daemon at `url` until its /readyz answers 200 (True), or until `process`
    (the daemon's) ends or `timeout` seconds pass (False: the caller shows the log)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url) as http:
        while process.returncode is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/readyz")).status_code == 200:
                    return True
            await asyncio.sleep(0.05)
    return False
