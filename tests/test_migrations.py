"""sql/ migrations: applied in order, once, recorded; `serve` refuses a stale schema."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from daemon import migrations
from daemon.embedded import Endpoints
from daemon.errors import MigrationError
from daemon.runtime import Runtime
from tests.helpers import make_config

REPO = Path(__file__).resolve().parent.parent
SHIPPED = [m.version for m in migrations.discover()]


@pytest.fixture
async def empty_db(endpoints: Endpoints) -> AsyncIterator[str]:
    """A new, empty database on the suite's PostgreSQL; its URL."""
    name = f"mig_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(endpoints.database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield endpoints.database_url.replace("/sdr?", f"/{name}?")
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def test_migrations_apply_in_order_once_and_seed_the_knowledge_base(empty_db: str) -> None:
    conn = await asyncpg.connect(empty_db)
    try:
        before = await migrations.status(conn)
        applied = await migrations.migrate(conn)
        again = await migrations.migrate(conn)
        after = await migrations.status(conn)
        kb = await conn.fetchval("SELECT count(*) FROM knowledge_base")
        categories = await conn.fetchval("SELECT count(DISTINCT category) FROM knowledge_base")
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    finally:
        await conn.close()
    assert [s.applied_at for s in before] == [None] * len(before)
    assert [m.version for m in applied] == SHIPPED == sorted(SHIPPED)
    assert again == []
    assert all(s.applied_at is not None for s in after)
    assert kb >= 30 and categories >= 8
    assert tables >= {"leads", "conversations", "messages", "knowledge_base", "follow_ups", "turns",
                      "outbox", "schema_migrations"}  # fmt: skip


async def test_concurrent_runs_apply_each_migration_once(empty_db: str) -> None:
    conns = [await asyncpg.connect(empty_db) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrations.migrate(c) for c in conns))
        recorded = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
    finally:
        for c in conns:
            await c.close()
    assert sorted(len(r) for r in results) == [0, 0, len(SHIPPED)]
    assert recorded == len(SHIPPED)


async def test_a_failing_migration_names_the_file_and_rolls_back(empty_db: str, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE a (id int);")
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE b (id int); SELECT * FROM nope;")
    conn = await asyncpg.connect(empty_db)
    try:
        with pytest.raises(MigrationError, match="0002_broken.sql: UndefinedTableError"):
            await migrations.migrate(conn, tmp_path)
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        b_exists = await conn.fetchval("SELECT to_regclass('b') IS NOT NULL")
    finally:
        await conn.close()
    assert versions == [1] and not b_exists


async def test_serve_refuses_an_external_database_with_pending_migrations(
    empty_db: str, endpoints: Endpoints
) -> None:
    cfg = make_config(endpoints, SDR_DATABASE_URL=empty_db)
    rt = Runtime(cfg, Endpoints(empty_db, endpoints.redis_url), auto_migrate=False)
    with pytest.raises(MigrationError, match=rf"{len(SHIPPED)} migration\(s\) pending .*run `sdrctl migrate` first"):
        await rt.start()


def sdrctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdrctl", *args], cwd=REPO, capture_output=True, text=True,
        timeout=60, env={**os.environ, **env},
    )  # fmt: skip


async def test_migrate_and_status_commands(empty_db: str, endpoints: Endpoints) -> None:
    env = {"SDR_DATABASE_URL": empty_db, "SDR_REDIS_URL": endpoints.redis_url}
    pending = await asyncio.to_thread(sdrctl, "migrate", "status", "--json", env=env)
    up = await asyncio.to_thread(sdrctl, "migrate", env=env)
    table = await asyncio.to_thread(sdrctl, "migrate", "status", env=env)
    assert pending.returncode == 0, pending.stderr
    assert [(m["version"], m["applied_at"]) for m in json.loads(pending.stdout)] == [(v, None) for v in SHIPPED]
    assert up.returncode == 0, up.stderr
    assert "applied 0001_schema" in up.stdout and f"{len(SHIPPED)} migration(s) applied" in up.stdout
    assert "0002" in table.stdout and "pending" not in table.stdout and "applied" in table.stdout


async def test_serve_command_with_pending_migrations_exits_with_the_fix(
    empty_db: str, endpoints: Endpoints
) -> None:
    env = {"SDR_DATABASE_URL": empty_db, "SDR_REDIS_URL": endpoints.redis_url}
    result = await asyncio.to_thread(sdrctl, "serve", env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "run `sdrctl migrate` first" in result.stderr


async def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    env = {"SDR_DATABASE_URL": f"postgresql://postgres@/sdr?host={tmp_path}&port=1"}
    result = await asyncio.to_thread(sdrctl, "migrate", "status", env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot connect to PostgreSQL" in result.stderr
