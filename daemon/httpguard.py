"""What keeps slow clients from stopping the intake: a deadline for a request to arrive
whole, and enough file descriptors for the connections they hold meanwhile.

uvicorn times out idle keep-alive connections, but nothing else: a client that sends half
a request line and then a header every few seconds (a slowloris) holds its connection for
as long as it likes. The in-flight bound on webhooks lives in the app (daemon/app.py) and
counts requests being handled, so such connections cost a file descriptor each, never a
real webhook's place."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("sdr.server")


class _RequestDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a deadline per request: from the connection's
    opening, or from the first byte of a later request, to the request's last byte. A
    request not whole by then has its connection closed (no answer: the client is not
    sending one). Idle keep-alive connections stay on uvicorn's own timer.

    One timer per connection, moved when it fires rather than armed and cancelled per
    request: a busy keep-alive connection pays two attribute writes per request."""

    seconds: float = 10.0
    on_expired: Callable[[], object] = staticmethod(lambda: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._began: float | None = None  # when the request being read began; None between requests
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._began = self.loop.time()
        self._timer = self.loop.call_later(self.seconds, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Bytes that start no request (stray CRLFs between requests) also start the clock,
        # or they could hold a connection open for ever by resetting the keep-alive timer.
        if self._began is None:
            self._began = self.loop.time()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._began is None:  # a pipelined request after a whole one, in the same read
            self._began = self.loop.time()

    def on_message_complete(self) -> None:
        self._began = None
        super().on_message_complete()

    def _check(self) -> None:
        """The timer fires at most `seconds` after any request began, so a late request
        is closed on time; otherwise the timer moves to that request's deadline."""
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._began is not None and now - self._began >= self.seconds:
            self._expired()
            return
        due = self.seconds if self._began is None else self._began + self.seconds - now
        self._timer = self.loop.call_later(due, self._check)

    def _expired(self) -> None:
        self.on_expired()
        log.debug(
            "closing the connection from %s: no whole request within %gs",
            f"{self.client[0]}:{self.client[1]}" if self.client else "?",
            self.seconds,
        )
        # abort, not close: close would wait to flush what we owe a client that may not read.
        self.transport.abort()


def http_protocol(seconds: float, on_expired: Callable[[], object] | None = None) -> type[HttpToolsProtocol] | str:
    """The `http` of uvicorn.Config: httptools with a request deadline of `seconds`
    (0 = none: uvicorn's own protocol); `on_expired` counts the connections it closes."""
    if seconds <= 0:
        return "httptools"
    attrs: dict[str, object] = {"seconds": seconds}
    if on_expired is not None:
        attrs["on_expired"] = staticmethod(on_expired)
    return type("RequestDeadlineProtocol", (_RequestDeadline,), attrs)


def raise_fd_limit() -> tuple[int, int]:
    """Raises this process's soft limit of open files to its hard limit, so thousands of
    connections (slow ones included, until their deadline) do not run out of descriptors
    (a soft limit of 1,024 is common). Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is not a valid soft one for files on Linux (nr_open caps it).
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft >= target:
        log.debug("open files limit: %d (already the hard limit)", soft)
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.debug("open files limit stays at %d: raising it to %d failed: %s", soft, target, exc)
        return soft, soft
    log.debug("open files limit raised from %d to %d", soft, target)
    return soft, target
