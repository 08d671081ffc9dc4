"""A whole daemon inside this process, for the engineer commands (replay, profile) and the
tests: the runtime and uvicorn on a free loopback port, on the embedded PostgreSQL and
Redis in a throw-away folder (unless URLs are configured), or on endpoints already running."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config
from daemon.embedded import Endpoints, services
from daemon.runtime import Runtime
from daemon.server import uvicorn_server
from daemon.testing.servers import background_server


@dataclass
class InProcessDaemon:
    url: str
    runtime: Runtime
    endpoints: Endpoints
    config: Config


def with_changes(config: Config, section: str, **values: object) -> Config:
    """A copy of the config with some keys of one section changed (configs are frozen)."""
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})


@contextlib.asynccontextmanager
async def inprocess_daemon(
    config: Config, *, evolution_url: str | None = None, endpoints: Endpoints | None = None
) -> AsyncIterator[InProcessDaemon]:
    """Runs a daemon in this event loop until the block ends. With `evolution_url`, replies
    go there (e.g. a fake Evolution API); else to the outbox table. With `endpoints`, it
    uses those servers as they are (already migrated: the tests' shared ones); else it
    starts the embedded ones the config leaves to it, and migrates those it made fresh."""
    if evolution_url is not None:
        config = with_changes(config, "evolution", base_url=evolution_url)
    scratch: Path | None = None
    if endpoints is None and not (config.database.url and config.redis.url):
        scratch = Path(tempfile.mkdtemp(prefix="sdrctl-run-", dir="/tmp"))
        config = with_changes(config, "daemon", data_dir=str(scratch))
    stack = contextlib.ExitStack()
    try:
        if endpoints is None:
            # The embedded servers start and stop synchronously: keep that off the event loop.
            endpoints = await asyncio.to_thread(stack.enter_context, services(config))
        rt = Runtime(config, endpoints, auto_migrate=scratch is not None)
        await rt.start()
        try:
            async with background_server(uvicorn_server(config, rt, "127.0.0.1", 0)) as url:
                yield InProcessDaemon(url, rt, endpoints, config)
        finally:
            await rt.stop()
    finally:
        await asyncio.to_thread(stack.close)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
