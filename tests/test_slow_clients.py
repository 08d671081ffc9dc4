"""Slow and idle clients against a real daemon: a slowloris on loopback must not stop the
intake, its connections are closed at [timeouts] request_read, and [pools]
webhooks_in_flight counts requests being handled, not open connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import resource
from dataclasses import dataclass, field

import httpx
import pytest

from daemon.embedded import Endpoints
from daemon.httpguard import raise_fd_limit
from tests.helpers import event, fetch, make_config, metric, run_daemon, wait_for

PHONE = "5511987654321"
SLOW = 2100  # slow connections: more than the in-flight bound below, as in the incident
IN_FLIGHT = 500
DEADLINE = 2.0  # [timeouts] request_read in these tests


@dataclass
class Slowloris:
    """What the slow clients saw, from their side of the connection."""

    open: int = 0  # connections open now
    lives: list[float] = field(default_factory=list)  # seconds from connecting to the server's close
    answered: int = 0  # connections that got bytes back (a slowloris should get none)


async def slow_client(
    port: int, seen: Slowloris, stop: asyncio.Event, gate: asyncio.Semaphore, rng: random.Random
) -> None:
    """Sends half a request line, then a header line every 1-2 s, never the blank line
    that ends the headers; reconnects when the server closes, until `stop`."""
    loop = asyncio.get_running_loop()
    for _ in range(20):  # bounded: 20 lives of a few seconds at most
        if stop.is_set():
            return
        async with gate:  # not every SYN at once: the listen backlog is finite
            started = loop.time()  # before the server can have seen the connection
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        seen.open += 1
        try:
            writer.write(b"POST /webhook/evo")
            lines = [b"lution HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n"]
            lines += [b"X-Trickle-%d: a\r\n" % i for i in range(30)]
            for line in lines:
                try:
                    async with asyncio.timeout(rng.uniform(1.0, 2.0)):
                        data = await reader.read(4096)
                except TimeoutError:
                    writer.write(line)
                    continue
                if data:
                    seen.answered += 1
                break  # EOF: the server closed it
            else:
                raise AssertionError("a slow connection was never closed by the server")
        except ConnectionResetError:
            pass  # closed by the server while our last line was on its way: closed all the same
        finally:
            seen.lives.append(loop.time() - started)
            seen.open -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def enough_fds(needed: int) -> None:
    raise_fd_limit()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Not a skip: with too few file descriptors the promise cannot be checked, so say so.
    assert soft >= needed, f"the slowloris test needs {needed} open files; the hard limit allows {soft} (ulimit -Hn)"


async def test_a_slowloris_neither_stops_the_intake_nor_keeps_its_connections(clean: Endpoints) -> None:
    enough_fds(2 * SLOW + 1000)  # both ends of each connection are in this process
    cfg = make_config(clean, SDR_TIMEOUTS_REQUEST_READ=str(DEADLINE), SDR_POOLS_WEBHOOKS_IN_FLIGHT=str(IN_FLIGHT))
    seen, stop, gate, rng = Slowloris(), asyncio.Event(), asyncio.Semaphore(256), random.Random(7)
    sent: list[str] = []
    answers: list[httpx.Response] = []
    open_when_posted: list[int] = []
    async with run_daemon(cfg) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as http:
        port = httpx.URL(d.url).port
        assert port is not None
        async with asyncio.timeout(120), asyncio.TaskGroup() as tg:
            for _ in range(SLOW):
                tg.create_task(slow_client(port, seen, stop, gate, rng))

            async def all_open() -> bool:
                return seen.open >= SLOW - 50

            try:
                await wait_for(all_open, timeout=30)
                # Real webhooks for a few deadlines, while the slow ones close and reconnect.
                for i in range(30):
                    open_when_posted.append(seen.open)
                    body = event(PHONE, f"mensagem {i}", message_id=f"REAL{i:03d}")
                    answers.append(await http.post("/webhook/evolution", json=body))
                    sent.append(body["data"]["key"]["id"])
                    await asyncio.sleep(0.15)
            finally:
                stop.set()  # each slow client ends with its connection's current life
        metrics = (await http.get("/metrics")).text

    assert [(a.status_code, a.json()) for a in answers] == [(200, {"status": "stored"})] * 30
    assert min(open_when_posted) > IN_FLIGHT  # the old bound counted these: it answered 503
    rows = await fetch(clean.database_url, "SELECT provider_id FROM messages WHERE direction = 'in'")
    assert sorted(r["provider_id"] for r in rows) == sorted(sent)

    assert seen.answered == 0 and seen.open == 0
    assert len(seen.lives) >= SLOW  # every one was closed by the server, none got an answer
    assert min(seen.lives) >= DEADLINE  # not before the deadline
    assert max(seen.lives) < DEADLINE + 20  # and not long after (a generous bound)
    assert metric(metrics, "sdr_http_read_timeouts_total") == len(seen.lives)


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    return reader, writer


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    fields = (line.partition(b":") for line in head.split(b"\r\n"))
    length = next(int(v) for k, _, v in fields if k.lower() == b"content-length")
    return status, await reader.readexactly(length)


def webhook_head(length: int) -> bytes:
    return (
        b"POST /webhook/evolution HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


async def closed_by_server(reader: asyncio.StreamReader, since: float, timeout: float = 10) -> float:
    """Seconds from `since` (loop time) to EOF; fails on any byte (the server answers
    nothing to a late request)."""
    async with asyncio.timeout(timeout):
        try:
            assert await reader.read(4096) == b""
        except ConnectionResetError:
            pass
    return asyncio.get_running_loop().time() - since


async def test_webhooks_past_the_in_flight_bound_get_503_and_open_connections_do_not_count(
    clean: Endpoints,
) -> None:
    cfg = make_config(clean, SDR_POOLS_WEBHOOKS_IN_FLIGHT="1")
    writers: list[asyncio.StreamWriter] = []
    try:
        async with run_daemon(cfg) as d, httpx.AsyncClient(base_url=d.url, timeout=30) as http:
            port = httpx.URL(d.url).port
            assert port is not None
            # Idle connections and finished keep-alive ones: none of them is a webhook in flight.
            for _ in range(5):
                writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
            for _ in range(3):
                reader, writer = await raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                writers.append(writer)
                assert (await read_response(reader))[0] == 200
            first = await http.post("/webhook/evolution", json=event(PHONE, "primeira", message_id="IN1"))

            # One webhook in flight: its body arrives in two parts, and meanwhile a second is refused.
            held = json.dumps(event(PHONE, "devagar", message_id="HELD")).encode()
            half = len(held) // 2
            reader, writer = await raw_request(port, webhook_head(len(held)), held[:half])
            writers.append(writer)
            tried: list[str] = []

            async def refused() -> httpx.Response | None:
                tried.append(f"TRY{len(tried)}")
                resp = await http.post("/webhook/evolution", json=event(PHONE, "x", message_id=tried[-1]))
                return resp if resp.status_code == 503 else None

            busy = await wait_for(refused, timeout=10)
            writer.write(held[half:])
            status, answer = await read_response(reader)
            after = await http.post("/webhook/evolution", json=event(PHONE, "depois", message_id="IN2"))
            metrics = (await http.get("/metrics")).text
    finally:
        for w in writers:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()

    assert first.status_code == 200 and first.json() == {"status": "stored"}
    assert "in flight" in busy.json()["error"] and "retry" in busy.json()["error"]
    assert (status, json.loads(answer)) == (200, {"status": "stored"})
    assert after.status_code == 200
    assert metric(metrics, "sdr_webhooks_total", outcome="overloaded") >= 1
    rows = await fetch(clean.database_url, "SELECT provider_id FROM messages WHERE direction = 'in'")
    ids = {r["provider_id"] for r in rows}
    assert {"IN1", "HELD", "IN2"} <= ids and tried[-1] not in ids  # refused, so not stored


async def test_idle_keep_alive_late_bodies_and_stray_bytes_are_closed(
    clean: Endpoints, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config(clean, SDR_TIMEOUTS_REQUEST_READ="1", SDR_TIMEOUTS_KEEP_ALIVE="0.5")
    async with run_daemon(cfg) as d, httpx.AsyncClient(base_url=d.url) as http:
        port = httpx.URL(d.url).port
        assert port is not None
        loop = asyncio.get_running_loop()
        # A finished request, then nothing: uvicorn's keep-alive timer closes it.
        idle_since = loop.time()
        idle_r, idle_w = await raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(idle_r))[0] == 200
        # Headers, half the body, then nothing: the deadline closes it; the handler sees a
        # disconnect (no 500, no traceback).
        body = json.dumps(event(PHONE, "pela metade", message_id="HALF")).encode()
        late_since = loop.time()
        late_r, late_w = await raw_request(port, webhook_head(len(body)), body[: len(body) // 2])
        # Bytes that start no request (blank lines) keep no connection open either.
        stray_since = loop.time()
        stray_r, stray_w = await raw_request(port, b"\r\n")

        async def stray() -> None:
            with contextlib.suppress(OSError):
                for _ in range(40):
                    await asyncio.sleep(0.25)
                    stray_w.write(b"\r\n")

        trickle = asyncio.create_task(stray())
        try:
            lives = await asyncio.gather(
                closed_by_server(idle_r, idle_since),
                closed_by_server(late_r, late_since),
                closed_by_server(stray_r, stray_since),
            )
        finally:
            trickle.cancel()
            for w in (idle_w, late_w, stray_w):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()

        async def handler_saw_the_disconnect() -> str:
            text = (await http.get("/metrics")).text
            return text if metric(text, "sdr_webhooks_total", outcome="disconnected") == 1 else ""

        metrics = await wait_for(handler_saw_the_disconnect)
    assert lives[0] >= 0.5 and lives[1] >= 1 and lives[2] >= 1  # none before its time
    assert metric(metrics, "sdr_http_read_timeouts_total") == 2  # keep-alive is uvicorn's own timer
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    rows = await fetch(clean.database_url, "SELECT provider_id FROM messages WHERE direction = 'in'")
    assert rows == []
