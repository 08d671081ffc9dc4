"""One daemon under test: a real `sdrctl serve` subprocess on its own throw-away embedded
PostgreSQL and Redis, the simulated agent (unless `extra_env` names another: `bench --agent
fake-llm` gives the openai backend and a fake model's URL), and a profile whose waits are
scaled with the workload's time scale."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Profile, Timeouts
from daemon.embedded import postgres_url
from daemon.errors import SdrError
from daemon.latency import parse_latency
from daemon.testing.servers import free_port, wait_ready
from daemon.tools.workload import Workload


def scaled_overrides(profile: Profile, factor: float) -> dict[str, str]:
    """SDR_ variables that scale a profile's waits by `factor` (infrastructure timeouts —
    database, redis, embedded start, shutdown — are left alone)."""
    keep = {"database", "redis", "embedded_start", "shutdown_grace"}
    env: dict[str, str] = {"SDR_FEATURES_TYPING_AFTER": repr(profile.features.typing_after * factor)}
    for section, names in (
        ("timeouts", [f.name for f in dataclasses.fields(Timeouts) if f.name not in keep]),
        # settle_window, presence_settle and typing_ttl are waits of the speculative buffer.
        ("buffer", ["min_window", "quiet_window", "extended_window", "settle_window", "presence_settle", "typing_ttl"]),
        ("limits", ["lock_backoff", "send_backoff"]),
    ):
        part = getattr(profile, section)
        for name in names:
            if not hasattr(part, name):  # a knob this version of the config does not have
                continue
            env[f"SDR_{section.upper()}_{name.upper()}"] = repr(getattr(part, name) * factor)
    return env


def embedded_database_url(folder: Path) -> str:
    """The URL of the embedded PostgreSQL running in `folder`, as daemon/embedded.py builds
    it: the socket folder and port its postmaster.pid holds (pgserver moves the socket out
    of a folder whose path is too long for one; the port is not always 5432)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns at import when XDG_RUNTIME_DIR is unset
        from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(folder)
    if info is None or info.socket_dir is None:
        raise SdrError(f"no embedded PostgreSQL runs in {folder} (does the config give a database.url?)")
    return postgres_url(info.socket_dir, info.port)


@dataclass
class DaemonUnderTest:
    profile: Profile
    url: str
    data_dir: Path
    process: asyncio.subprocess.Process

    @functools.cached_property
    def database_url(self) -> str:
        """Its embedded PostgreSQL's (read once the daemon is ready, when it runs)."""
        return embedded_database_url(self.data_dir / "var" / "pg")


@contextlib.asynccontextmanager
async def start_daemon(
    profile: Profile,
    evolution_url: str,
    workload: Workload,
    config_path: str | None,
    ready_timeout: float,
    *,
    extra_env: Mapping[str, str] | None = None,
) -> AsyncIterator[DaemonUnderTest]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"sdrctl-bench-{profile.name}-", dir="/tmp"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDR_")}
    env.update(
        SDR_DAEMON_DATA_DIR=str(data_dir / "var"),
        SDR_DAEMON_PORT=str(port),
        SDR_DAEMON_HOST="127.0.0.1",
        SDR_DAEMON_LOG_LEVEL="warning",
        SDR_EVOLUTION_BASE_URL=evolution_url,
        SDR_AGENT_BACKEND="simulated",
        SDR_AGENT_SIMULATED_LATENCY=scaled_spec(workload.agent_latency, workload.time_scale),
        **scaled_overrides(profile, workload.time_scale),
    )
    env.update(extra_env or {})
    args = [sys.executable, "-m", "sdrctl", "serve", "--profile", profile.source]
    if config_path:
        args += ["--config", config_path]
    log = (data_dir / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(*args, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT)
    daemon = DaemonUnderTest(profile, f"http://127.0.0.1:{port}", data_dir, proc)
    try:
        if not await wait_ready(daemon.url, proc, ready_timeout):
            log_text = (data_dir / "serve.log").read_text(errors="replace")[-2000:]
            raise SdrError(f"the daemon for profile {profile.name} did not become ready:\n{log_text}")
        yield daemon
    finally:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ready_timeout):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        log.close()
        if os.environ.get("SDRCTL_BENCH_KEEP"):  # for a post-mortem of a run
            print(f"kept {data_dir}", file=sys.stderr)
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


def scaled_spec(spec: str, factor: float) -> str:
    """A latency spec (daemon/latency.py) with its times multiplied by `factor`, written back
    as a spec: what the simulated agent of a daemon under a time-scaled workload gets."""
    lat = parse_latency(spec).scaled(factor)
    if lat.kind == "fixed":
        return f"fixed:{lat.a!r}"
    if lat.kind == "uniform":
        return f"uniform:min={lat.a!r},max={lat.b!r}"
    return f"lognormal:median={lat.a!r},p95={lat.b!r}"
