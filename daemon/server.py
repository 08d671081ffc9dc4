"""`serve`: the embedded services (when no URL is set), the runtime, and uvicorn.

We own the signals: the first SIGTERM/SIGINT stops intake and drains, a second one forces
exit. uvicorn's own handlers would re-raise the signal after serving, killing the process
before the runtime drained and the embedded servers stopped."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Generator

import uvicorn

from daemon.app import create_app
from daemon.config import Config
from daemon.embedded import Endpoints, services
from daemon.errors import UnavailableError
from daemon.httpguard import http_protocol, raise_fd_limit
from daemon.runtime import Runtime
from daemon.tasks import run_fast

log = logging.getLogger("sdr.server")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # signals are handled by serve_forever()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_host(config: Config) -> str:
    host = config.daemon.host
    if config.webhook_token is None and not is_loopback(host):
        log.warning(
            "no webhook token set (%s is empty): binding 127.0.0.1 instead of %s; "
            "set the token to accept webhooks from other hosts",
            config.webhook.token_env,
            host,
        )
        return "127.0.0.1"
    return host


def uvicorn_server(config: Config, rt: Runtime, host: str, port: int) -> _Server:
    """The one place uvicorn is configured (serve, the tests, the in-process daemon).

    No `limit_concurrency`: uvicorn counts open connections in it, so idle and half-sent
    connections (a slowloris) made it answer 503 to every real webhook. The app bounds
    webhooks in flight instead ([pools] webhooks_in_flight), and a request must arrive
    whole within [timeouts] request_read."""
    t = config.profile.timeouts
    uv = uvicorn.Config(
        create_app(rt),
        host=host,
        port=port,
        loop="none",  # we run inside the caller's loop
        http=http_protocol(t.request_read, rt.metrics.read_timeouts.inc),
        ws="none",
        lifespan="off",  # the runtime is started and stopped around the server
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=t.webhook,  # type: ignore[arg-type]  # uvicorn says int; any float works
        timeout_keep_alive=t.keep_alive,  # type: ignore[arg-type]  # uvicorn says int; any float works
    )
    return _Server(uv)


def listen(host: str, port: int) -> socket.socket:
    """The daemon's listening socket, bound before anything starts: a port someone else
    holds is one clear error, not uvicorn's log line after the runtime started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UnavailableError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; stop what holds the port, or set [daemon] port"
        ) from None
    return sock


async def serve_forever(config: Config, endpoints: Endpoints, sock: socket.socket, *, auto_migrate: bool) -> None:
    raise_fd_limit()  # thousands of connections, slow ones included, need as many fds
    host, port = sock.getsockname()[:2]
    rt = Runtime(config, endpoints, auto_migrate=auto_migrate)
    await rt.start()
    server = uvicorn_server(config, rt, host, port)

    def on_signal() -> None:
        rt.accepting = False  # webhooks still arriving get 503, so Evolution retries elsewhere
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        replies = (
            f"Evolution API at {config.evolution.base_url}"
            if config.evolution.base_url
            else "the outbox table (`sdrctl chat` shows them)"
        )
        log.info(
            "serving on http://%s:%d (profile %s); replies go to %s",
            host,
            port,
            config.profile.name,
            replies,
        )
        await server.serve(sockets=[sock])
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await rt.stop()
        log.info("stopped")


def serve(config: Config) -> None:
    # The port first: taken, nothing else is started (the embedded servers take seconds).
    with listen(bind_host(config), config.daemon.port) as sock, services(config) as endpoints:
        run_fast(serve_forever(config, endpoints, sock, auto_migrate=not config.database.url))
