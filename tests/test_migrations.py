"""sql/ migrations: applied in order, once, recorded; `serve` refuses a stale schema."""

from __future__ import annotations

import asyncio
import json
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
from tests.helpers import child_env, make_config

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
        tables = {
            r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    finally:
        await conn.close()
    assert [s.applied_at for s in before.migrations] == [None] * len(before.migrations)
    assert [m.version for m in applied] == SHIPPED == sorted(SHIPPED)
    assert again == []
    assert all(s.applied_at is not None and s.state == "applied" for s in after.migrations)
    assert kb >= 30 and categories >= 8
    assert tables >= {
        "leads",
        "conversations",
        "messages",
        "knowledge_base",
        "follow_ups",
        "turns",
        "outbox",
        "schema_migrations",
    }


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
        with pytest.raises(
            MigrationError, match=r"0002_broken.sql, statement 2 \(SELECT \* FROM nope\): UndefinedTableError"
        ):
            await migrations.migrate(conn, tmp_path)
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        b_exists = await conn.fetchval("SELECT to_regclass('b') IS NOT NULL")
    finally:
        await conn.close()
    assert versions == [1] and not b_exists


async def test_serve_refuses_an_external_database_with_pending_migrations(empty_db: str, endpoints: Endpoints) -> None:
    cfg = make_config(endpoints, SDR_DATABASE_URL=empty_db)
    rt = Runtime(cfg, Endpoints(empty_db, endpoints.redis_url), auto_migrate=False)
    with pytest.raises(MigrationError, match=rf"{len(SHIPPED)} migration\(s\) pending .*run `sdrctl migrate` first"):
        await rt.start()


def sdrctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdrctl", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(**env),
    )


async def test_migrate_and_status_commands(empty_db: str, endpoints: Endpoints) -> None:
    env = {"SDR_DATABASE_URL": empty_db, "SDR_REDIS_URL": endpoints.redis_url}
    pending = await asyncio.to_thread(sdrctl, "migrate", "status", "--json", env=env)
    up = await asyncio.to_thread(sdrctl, "migrate", env=env)
    table = await asyncio.to_thread(sdrctl, "migrate", "status", env=env)
    assert pending.returncode == 0, pending.stderr
    doc = json.loads(pending.stdout)
    assert [(m["version"], m["state"], m["applied_at"]) for m in doc["migrations"]] == [
        (v, "pending", None) for v in SHIPPED
    ]
    assert doc["pending"] == len(SHIPPED) and doc["drift"] == [] and doc["invalid_indexes"] == []
    assert up.returncode == 0, up.stderr
    assert "applied 0001_schema" in up.stdout and f"{len(SHIPPED)} migration(s) applied" in up.stdout
    assert "0002" in table.stdout and "pending" not in table.stdout and "applied" in table.stdout


async def test_serve_command_with_pending_migrations_exits_with_the_fix(empty_db: str, endpoints: Endpoints) -> None:
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


# --- deploy-grade migrate: checksums, --to, --dry-run, lock timeout, no-transaction, repair


async def test_an_applied_migration_edited_afterwards_stops_migrate_and_shows_in_status(
    empty_db: str, tmp_path: Path
) -> None:
    first = tmp_path / "0001_a.sql"
    first.write_text("CREATE TABLE a (id int);")
    conn = await asyncpg.connect(empty_db)
    try:
        await migrations.migrate(conn, tmp_path)
        first.write_text("CREATE TABLE a (id int, extra text);")
        (tmp_path / "0002_b.sql").write_text("CREATE TABLE b (id int);")
        with pytest.raises(MigrationError, match=r"0001_a.sql was edited after it was applied"):
            await migrations.migrate(conn, tmp_path)
        st = await migrations.status(conn, tmp_path)
        b_exists = await conn.fetchval("SELECT to_regclass('b') IS NOT NULL")
    finally:
        await conn.close()
    assert [(m.version, m.state) for m in st.migrations] == [(1, "edited"), (2, "pending")]
    assert not b_exists  # nothing after the drift ran


def test_migrate_to_and_dry_run_commands(empty_db: str, endpoints: Endpoints) -> None:
    env = {"SDR_DATABASE_URL": empty_db, "SDR_REDIS_URL": endpoints.redis_url}
    dry = sdrctl("migrate", "--dry-run", env=env)
    after_dry = sdrctl("migrate", "status", "--json", env=env)
    to = sdrctl("migrate", "--to", "0002", env=env)
    status = json.loads(sdrctl("migrate", "status", "--json", env=env).stdout)
    rest = sdrctl("migrate", "--dry-run", env=env)
    bad = sdrctl("migrate", "--to", "0099", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "-- 0001_schema.sql" in dry.stdout and "CREATE TABLE leads" in dry.stdout
    assert "-- 0003_hot_path_indexes.sql (no transaction" in dry.stdout
    assert "would be applied; nothing was changed" in dry.stderr
    assert all(m["state"] == "pending" for m in json.loads(after_dry.stdout)["migrations"])
    assert to.returncode == 0 and "up to 0002" in to.stdout
    assert [m["state"] for m in status["migrations"]] == ["applied", "applied"] + ["pending"] * (len(SHIPPED) - 2)
    assert "CREATE TABLE leads" not in rest.stdout and "CONCURRENTLY" in rest.stdout
    assert (
        bad.returncode == 1
        and f"--to 0099: no such migration (known: {', '.join(f'{v:04d}' for v in SHIPPED)})" in bad.stderr
    )


async def test_a_second_migrate_waits_for_the_lock_then_gives_up_clearly(empty_db: str, endpoints: Endpoints) -> None:
    holder = await asyncpg.connect(empty_db)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", migrations.LOCK_KEY)
        env = {"SDR_DATABASE_URL": empty_db, "SDR_REDIS_URL": endpoints.redis_url}
        result = await asyncio.to_thread(sdrctl, "migrate", "--lock-timeout", "0.5", env=env)
        applied = await holder.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    finally:
        await holder.close()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "another migrate holds the lock; waiting up to 0.5s" in result.stderr
    assert "held the migration lock for more than 0.5s" in result.stderr
    assert not applied


async def test_a_waiting_migrate_finds_nothing_to_do_once_the_first_finished(empty_db: str) -> None:
    holder, waiter = await asyncpg.connect(empty_db), await asyncpg.connect(empty_db)
    waited: list[bool] = []
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", migrations.LOCK_KEY)
        second = asyncio.create_task(migrations.migrate(waiter, lock_timeout=30, on_wait=lambda: waited.append(True)))
        await asyncio.sleep(0.3)
        assert not second.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", migrations.LOCK_KEY)
        first = await migrations.migrate(holder)
        # the waiter may have won the race after the unlock: exactly one of them applied all
        done = await second
    finally:
        await holder.close()
        await waiter.close()
    assert waited == [True]
    assert sorted([len(first), len(done)]) == [0, len(SHIPPED)]


async def test_a_no_transaction_migration_builds_indexes_concurrently(empty_db: str, tmp_path: Path) -> None:
    (tmp_path / "0001_t.sql").write_text("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 100);")
    (tmp_path / "0002_idx.sql").write_text(
        "-- sdrctl: no-transaction\n-- an index on a live table\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_x_idx ON t (x);\n"
    )
    (tmp_path / "0003_idx_in_tx.sql").write_text("CREATE INDEX CONCURRENTLY IF NOT EXISTS t_x2_idx ON t (x);")
    conn = await asyncpg.connect(empty_db)
    try:
        with pytest.raises(
            MigrationError, match=r"0003_idx_in_tx.sql, statement 1 .*cannot run inside a transaction block"
        ):
            await migrations.migrate(conn, tmp_path)
        valid = await conn.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x_idx'::regclass")
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
    finally:
        await conn.close()
    assert valid is True and versions == [1, 2]


async def test_an_invalid_index_from_a_failed_concurrent_build_is_dropped_and_rebuilt(
    empty_db: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_t.sql").write_text("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (1), (2);")
    (tmp_path / "0002_idx.sql").write_text(
        "-- sdrctl: no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_x_key ON t (x);\n"
    )
    conn = await asyncpg.connect(empty_db)
    try:
        with pytest.raises(MigrationError, match=r"0002_idx.sql, statement 1 .*UniqueViolationError"):
            await migrations.migrate(conn, tmp_path)
        broken = await migrations.status(conn, tmp_path)
        await conn.execute("DELETE FROM t WHERE ctid = (SELECT max(ctid) FROM t WHERE x = 1)")
        await migrations.migrate(conn, tmp_path)
        repaired = await migrations.status(conn, tmp_path)
        valid = await conn.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x_key'::regclass")
        # An applied migration's index found INVALID later is rebuilt too.
        await conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 't_x_key'::regclass")
        assert await migrations.invalid_indexes(conn) == ["t_x_key"]
        assert await migrations.migrate(conn, tmp_path) == []
        rebuilt = await conn.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x_key'::regclass")
    finally:
        await conn.close()
    assert broken.invalid_indexes == ["t_x_key"] and [m.state for m in broken.migrations] == ["applied", "pending"]
    assert repaired.invalid_indexes == [] and [m.state for m in repaired.migrations] == ["applied", "applied"]
    assert valid is True and rebuilt is True


def test_statements_are_split_outside_strings_comments_and_function_bodies() -> None:
    sql = (
        "CREATE TABLE a (s text DEFAULT 'x;y'); -- a comment; with a semicolon\n"
        "/* block; comment */ CREATE FUNCTION f() RETURNS int AS $body$ BEGIN; RETURN 1; END $body$ LANGUAGE plpgsql;\n"
        'SELECT "odd;name" FROM a; ;\n-- trailing comment only\n'
    )
    parts = migrations.split_statements(sql)
    assert len(parts) == 3
    assert parts[0] == "CREATE TABLE a (s text DEFAULT 'x;y')"
    assert parts[1].endswith("END $body$ LANGUAGE plpgsql")
    assert parts[2].endswith('SELECT "odd;name" FROM a')


def test_status_table_shows_drift_and_invalid_indexes(empty_db: str, endpoints: Endpoints) -> None:
    env = {"SDR_DATABASE_URL": empty_db, "SDR_REDIS_URL": endpoints.redis_url}
    assert sdrctl("migrate", env=env).returncode == 0

    async def tamper() -> None:
        conn = await asyncpg.connect(empty_db)
        try:
            await conn.execute("UPDATE schema_migrations SET checksum = 'abc' WHERE version = 1")
            await conn.execute(
                "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'follow_ups_due_idx'::regclass"
            )
        finally:
            await conn.close()

    asyncio.run(tamper())
    table = sdrctl("migrate", "status", env=env)
    up = sdrctl("migrate", env=env)
    assert "edited since applied" in table.stdout and "INVALID index follow_ups_due_idx" in table.stdout
    assert up.returncode == 1 and "Traceback" not in up.stderr
    assert "0001_schema.sql was edited after it was applied" in up.stderr


def test_wrong_credentials_are_a_clear_error(endpoints: Endpoints) -> None:
    env = {"SDR_DATABASE_URL": endpoints.database_url.replace("postgres@", "nobody@")}
    result = sdrctl("migrate", "status", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert 'role "nobody" does not exist' in result.stderr


def test_verify_shows_the_index_migration_on_sample_data_and_fails_on_a_big_seq_scan(
    empty_db: str, endpoints: Endpoints
) -> None:
    env = {"SDR_DATABASE_URL": empty_db, "SDR_REDIS_URL": endpoints.redis_url}
    assert sdrctl("migrate", env=env).returncode == 0
    sample = sdrctl("migrate", "verify", "--sample-data", "1000", "--json", env=env)
    assert sample.returncode == 0, sample.stderr
    doc = json.loads(sample.stdout)
    before = {p["query"]: p for p in doc["before"]}
    after = {p["query"]: p for p in doc["plans"]}
    history = "last N messages of a conversation"
    assert doc["sample_leads"] == 1000 and doc["sample_messages"] == 20_000
    assert "Seq Scan on messages" in before[history]["access"] and not before[history]["ok"]
    assert any("messages_conversation_id_idx" in a for a in after[history]["access"]) and doc["ok"]
    assert any("follow_ups_due_idx" in a for a in after["due follow-ups"]["access"])
    assert after[history]["rows"] == 1 and after["lead by phone"]["rows"] == 1
    # the throw-away schema is gone
    leftovers = asyncio.run(_schemas(empty_db))
    assert not [s for s in leftovers if s.startswith("sdrctl_verify")]

    # The live database, without the phone index and more leads than the threshold: exit 1.
    async def break_it() -> None:
        conn = await asyncpg.connect(empty_db)
        try:
            await conn.execute("ALTER TABLE leads DROP CONSTRAINT leads_phone_number_key")
            await conn.execute(
                "INSERT INTO leads (phone_number) SELECT '55119' || g FROM generate_series(1, 500) g; ANALYZE leads"
            )
        finally:
            await conn.close()

    asyncio.run(break_it())
    live = sdrctl("migrate", "verify", "--seq-scan-rows", "100", env=env)
    assert live.returncode == 1, live.stdout
    assert "FAIL lead by phone: sequential scan on leads (500 rows > 100)" in live.stdout


async def _schemas(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return [r[0] for r in await conn.fetch("SELECT nspname FROM pg_namespace")]
    finally:
        await conn.close()
