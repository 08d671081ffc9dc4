"""One real PostgreSQL and one real Redis (the embedded ones) for the whole suite, migrated
once; every test starts from empty tables and an empty Redis."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from daemon import migrations
from daemon.config import Config
from daemon.embedded import EmbeddedPostgres, EmbeddedRedis, Endpoints
from tests.helpers import is_shell_setting, make_config

TABLES = "leads, conversations, messages, turns, outbox, follow_ups, crm_sync, kb_embeddings"


@pytest.fixture(scope="session", autouse=True)
def shell_settings_ignored() -> Iterator[None]:
    """The operator's shell settings (an exported SDRCTL_WEBHOOK_TOKEN, a PGPORT, a proxy)
    reach neither the code under test nor the processes it starts itself (`bench` starts
    daemons from this process's environment); autouse, so before the embedded services."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if is_shell_setting(n)]:
            mp.delenv(name)
        yield


@pytest.fixture(scope="session")
def services_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="sdrctl-test-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def endpoints(services_root: Path) -> Iterator[Endpoints]:
    pg = EmbeddedPostgres(services_root / "pg")
    rd = EmbeddedRedis(services_root / "redis", start_timeout=15)
    try:
        db_url = pg.start()
        redis_url = rd.start()

        async def migrate() -> None:
            conn = await asyncpg.connect(db_url)
            try:
                await migrations.migrate(conn)
            finally:
                await conn.close()

        asyncio.run(migrate())
        yield Endpoints(db_url, redis_url)
    finally:
        rd.stop()
        pg.stop()


@pytest.fixture
async def clean(endpoints: Endpoints) -> AsyncIterator[Endpoints]:
    """Empty tables (the knowledge base stays) and an empty Redis."""
    conn = await asyncpg.connect(endpoints.database_url)
    try:
        await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    r = aioredis.Redis.from_url(endpoints.redis_url)
    await r.flushdb()
    await r.aclose()
    yield endpoints


@pytest.fixture
def config(clean: Endpoints) -> Config:
    return make_config(clean)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault suite's table, one row per scenario, at the end of the run."""
    from tests.faults import SUMMARY

    if not SUMMARY:
        return
    keys = [k for k in dict.fromkeys(k for r in SUMMARY for k in r) if k != "scenario"]
    terminalreporter.section("fault suite summary")
    width = max(len(r["scenario"]) for r in SUMMARY)
    terminalreporter.line(f"{'scenario':<{width}}  " + "  ".join(keys))
    for row in SUMMARY:
        cells = "  ".join(f"{row.get(k, '-')!s:>{len(k)}}" for k in keys)
        terminalreporter.line(f"{row['scenario']:<{width}}  {cells}")
