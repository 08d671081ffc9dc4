"""Test helpers: an in-process daemon on a real port (daemon/tools/inprocess.py, as the
tools run one), a fake Evolution API (a real HTTP server speaking its wire format), a real
`sdrctl serve` in a subprocess, and waits that poll instead of sleeping blindly."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from daemon.agents.playbook import Playbook
from daemon.config import (
    AgentSettings,
    Config,
    EvolutionSettings,
    WebhookSettings,
    load_config,
)
from daemon.embedded import Endpoints
from daemon.evolution import text_event
from daemon.followups.calendar import Clock
from daemon.runtime import Runtime
from daemon.store import init_connection
from daemon.testing.fake_evolution import run_fake_evolution
from daemon.testing.servers import free_port, wait_ready
from daemon.tools.inprocess import InProcessDaemon, inprocess_daemon

__all__ = ["run_fake_evolution"]  # re-exported for the tests

FAST_PROFILE = str(Path(__file__).with_name("fast.toml"))
T = TypeVar("T")
_ids = itertools.count(1)

# --- the environment the tests run in ---------------------------------------------------

# What a process started by a test keeps from the shell that runs the suite: what Python,
# ffmpeg, Tesseract and the embedded PostgreSQL need (search path, home, user, locale,
# temporary folder, the dynamic loader: LD_PRELOAD, so `faketime` reaches them too), and
# which Python code runs (PYTHONPATH, PYTHONHOME: the same as in the test process).
INHERITED = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TMPDIR",
        "LD_LIBRARY_PATH",
        "LD_PRELOAD",
        "PYTHONPATH",
        "PYTHONHOME",
    }
)
INHERITED_PREFIXES = ("LC_", "XDG_", "FAKETIME", "DONT_FAKE_")  # the last two: libfaketime's
# The secrets the config reads from the environment, by their default variable names.
SECRETS = frozenset({WebhookSettings.token_env, EvolutionSettings.api_key_env, AgentSettings.api_key_env})
PROXIES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


def is_shell_setting(name: str) -> bool:
    """A variable of the operator's shell that changes what the code under test does: the
    daemon's settings and secrets (the README has operators export SDRCTL_WEBHOOK_TOKEN,
    which turns every unauthenticated webhook into a 401), Python's switches
    (PYTHONWARNINGS, PYTHONOPTIMIZE...), libpq's defaults (asyncpg reads PGPORT,
    PGSSLMODE...), OpenTelemetry's (OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES
    change what a traced daemon sends) and proxies (httpx would send requests for
    127.0.0.1 to them)."""
    if name in ("PYTHONPATH", "PYTHONHOME"):
        return False
    prefixes = ("SDR_", "SDRCTL_", "PYTHON", "PG", "OTEL_")
    return name.startswith(prefixes) or name in SECRETS or name.lower() in PROXIES


def child_env(**env: str) -> dict[str, str]:
    """The environment of every process a test starts: the shell's basics (INHERITED),
    then `env`. A child never sees the shell's settings, keys or tokens, so the suite
    gives the same results whatever the operator exported."""
    kept = {k: v for k, v in os.environ.items() if k in INHERITED or k.startswith(INHERITED_PREFIXES)}
    return {**kept, **env}


def pin_clock(rt: Runtime, clock: Clock) -> None:
    """Runs the daemon's date- and hour-dependent decisions on `clock`: the turn's time
    (follow-ups are planned from it), the day a meeting phrase means, what is due.
    Runtime takes no clock (yet): its parts are given it after start."""
    rt.runner.clock = clock
    rt.followups.clock = clock
    if isinstance(rt.agent, Playbook):
        rt.agent.clock = clock


class FixedClock:
    """A clock that shows `now` until a test moves it (`clock.now = ...`)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make_config(endpoints: Endpoints, **env: str) -> Config:
    base = {"SDR_DATABASE_URL": endpoints.database_url, "SDR_REDIS_URL": endpoints.redis_url}
    return load_config(None, FAST_PROFILE, {**base, **env})


def event(phone: str, text: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("message_id", f"TEST{next(_ids):08d}")
    kw.setdefault("instance", "sdr")
    return text_event(phone, text, **kw)


@contextlib.asynccontextmanager
async def run_daemon(config: Config, endpoints: Endpoints | None = None) -> AsyncIterator[InProcessDaemon]:
    """The real runtime and ASGI app behind uvicorn on a free loopback port, on the suite's
    servers (the config's URLs unless `endpoints` are given): `d.url`, `d.runtime`."""
    endpoints = endpoints or Endpoints(config.database.url, config.redis.url)
    async with inprocess_daemon(config, endpoints=endpoints) as d:
        yield d


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
        assert await wait_ready(self.url, self.proc, timeout), f"not ready within {timeout}s, or ended:\n{self.log}"

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout=timeout)


async def start_serve(
    env: dict[str, str], log_path: Path, profile: str = FAST_PROFILE, *, own_group: bool = False
) -> ServeProcess:
    """`own_group`: the daemon leads its own process group, as in a terminal (Ctrl-C
    signals the whole group)."""
    port = free_port()
    full = child_env(**{**env, "SDR_DAEMON_PORT": str(port)})
    with log_path.open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdrctl",
            "serve",
            "--profile",
            profile,
            cwd=REPO,
            env=full,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=own_group,
        )
    return ServeProcess(proc, f"http://127.0.0.1:{port}", log_path)


async def sdrctl(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Runs the CLI as a user would, in `child_env(**env)`; (code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sdrctl",
        *args,
        cwd=REPO,
        env=child_env(**(env or {})),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.terminate()  # it stops the embedded services it started
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
