"""A small, fast HTTP/1.1 load generator for `bench --intake`: keep-alive connections on raw
asyncio streams, so the client is not what limits the figures (httpx costs several times
more CPU per request). Loopback only; bounded in time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0  # non-2xx answers and broken connections
    latencies: list[float] = field(default_factory=list)  # seconds, a sample of them
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def post_load(
    url: str,
    body: Callable[[int], bytes],
    *,
    connections: int,
    duration: float,
    headers: dict[str, str] | None = None,
    sample_every: int = 10,
) -> LoadResult:
    """POSTs `body(n)` (n counts requests) as fast as `connections` keep-alive connections
    allow, for `duration` seconds."""
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n{extra}"
    result = LoadResult()
    counter = 0
    stop_at = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal counter
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < stop_at:
                counter += 1
                payload = body(counter)
                request = f"{head}content-length: {len(payload)}\r\n\r\n".encode() + payload
                start = time.perf_counter()
                writer.write(request)
                try:
                    status = await _read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    result.errors += 1
                    return
                result.requests += 1
                if not 200 <= status < 300:
                    result.errors += 1
                if counter % sample_every == 0:
                    result.latencies.append(time.perf_counter() - start)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    began = time.perf_counter()
    tasks = [asyncio.create_task(worker()) for _ in range(connections)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result.elapsed = time.perf_counter() - began
    return result


class RawClient:
    """A pool of keep-alive HTTP/1.1 connections for many concurrent simulated leads: a
    fraction of httpx's CPU per request, so the load generator is not what saturates."""

    def __init__(self, url: str, size: int, timeout: float) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.size = size
        self.timeout = timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(size)

    async def post(self, path: str, payload: bytes) -> int:
        """The response status; raises OSError/TimeoutError when the request failed. A
        kept-alive connection the server closed meanwhile is retried once on a new one
        (the webhook de-duplicates, so a repeat is harmless)."""
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
        ).encode()
        async with self._slots:
            while self._idle:
                try:
                    return await self._exchange(self._idle.pop(), head + payload)
                except (ConnectionError, asyncio.IncompleteReadError):
                    continue  # closed by the server while idle
            return await self._exchange(await asyncio.open_connection(self.host, self.port), head + payload)

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes) -> int:
        reader, writer = conn
        try:
            writer.write(request)
            async with asyncio.timeout(self.timeout):
                status = await _read_response(reader)
        except BaseException:
            writer.close()  # a connection in an unknown state is never reused
            raise
        self._idle.append(conn)
        return status

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
