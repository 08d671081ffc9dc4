"""Applies sql/NNNN_name.sql in order and records each with its checksum.

- A file runs in one transaction, statement by statement (so an error names the
  statement), unless its header says `-- sdrctl: no-transaction`: then each statement runs
  on its own, which `CREATE INDEX CONCURRENTLY` needs to build on a live database.
- An applied file that was edited afterwards stops `migrate` (it is never re-run).
- A concurrent index build that failed leaves an INVALID index behind; `migrate` drops it
  and builds it again.
- An advisory lock serialises concurrent runs (two deploys, two daemons starting): one
  applies, the others wait, then find nothing to do."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path

import asyncpg

from daemon.config import shipped_path
from daemon.errors import MigrationError

FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
NO_TRANSACTION = re.compile(r"^--\s*sdrctl:\s*no-transaction\s*$", re.IGNORECASE)
CONCURRENT_INDEX = re.compile(
    r"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.IGNORECASE
)
LOCK_KEY = 7_305_514_121  # advisory lock id: any constant unique to sdrctl
LOCK_POLL = 0.1  # seconds between tries while another run holds the lock

BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def file(self) -> str:
        return self.path.name

    @cached_property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @cached_property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    @cached_property
    def transactional(self) -> bool:
        """False when a header line (the leading comment lines) says no-transaction."""
        for line in self.sql.splitlines():
            line = line.strip()
            if not line:
                continue
            if not line.startswith("--"):
                return True
            if NO_TRANSACTION.match(line):
                return False
        return True

    @cached_property
    def statements(self) -> list[str]:
        return split_statements(self.sql)

    def concurrent_indexes(self) -> dict[str, str]:
        """Index name -> the statement that builds it, for CREATE INDEX CONCURRENTLY IF NOT EXISTS."""
        found = {}
        for stmt in self.statements:
            match = CONCURRENT_INDEX.match(_strip_comments(stmt))
            if match:
                found[match[1]] = stmt
        return found


@dataclass(frozen=True)
class MigrationState:
    version: int
    name: str
    applied_at: datetime | None  # None = pending
    state: str  # applied | pending | edited (applied, file changed since) | missing (no file)
    checksum: str | None  # of the file, when there is one
    applied_checksum: str | None  # as recorded when applied


@dataclass(frozen=True)
class Status:
    migrations: list[MigrationState]
    invalid_indexes: list[str]  # left by failed concurrent builds

    @property
    def drift(self) -> list[MigrationState]:
        return [m for m in self.migrations if m.state in ("edited", "missing")]

    @property
    def pending(self) -> list[MigrationState]:
        return [m for m in self.migrations if m.state == "pending"]


def discover(folder: Path | None = None) -> list[Migration]:
    folder = folder or shipped_path("sql")
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{folder}: two migration files share a version number")
    return found


# --- reading the state (never writes) -------------------------------------------------


async def _recorded(conn: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        return {}
    rows = await conn.fetch("SELECT version, name, checksum, applied_at FROM schema_migrations")
    return {r["version"]: r for r in rows}


async def invalid_indexes(conn: asyncpg.Connection) -> list[str]:
    """Indexes of the current schema that a failed CREATE INDEX CONCURRENTLY left INVALID."""
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid
            WHERE NOT i.indisvalid AND c.relnamespace = current_schema()::regnamespace
            ORDER BY c.relname"""
    )
    return [r["relname"] for r in rows]


async def status(conn: asyncpg.Connection, folder: Path | None = None) -> Status:
    files = {m.version: m for m in discover(folder)}
    recorded = await _recorded(conn)
    states = []
    for version in sorted(files.keys() | recorded.keys()):
        m, r = files.get(version), recorded.get(version)
        if r is None:
            assert m is not None
            states.append(MigrationState(version, m.name, None, "pending", m.checksum, None))
            continue
        if m is None:
            state = "missing"
        else:
            state = "applied" if m.checksum == r["checksum"] else "edited"
        states.append(
            MigrationState(version, r["name"], r["applied_at"], state, m.checksum if m else None, r["checksum"])
        )
    return Status(states, await invalid_indexes(conn))


async def pending(conn: asyncpg.Connection, folder: Path | None = None) -> list[Migration]:
    recorded = await _recorded(conn)
    return [m for m in discover(folder) if m.version not in recorded]


def check_drift(st: Status) -> None:
    """An applied migration must never change: refuse to go on, naming the file."""
    for m in st.drift:
        if m.state == "edited":
            raise MigrationError(
                f"{m.version:04d}_{m.name}.sql was edited after it was applied (checksum "
                f"{(m.applied_checksum or '')[:12]} applied, {(m.checksum or '')[:12]} now): restore "
                "the file and put the change in a new migration"
            )
        raise MigrationError(
            f"migration {m.version:04d}_{m.name} is applied but its file is missing: this build "
            "is older than the database, or the file was deleted"
        )


async def plan(conn: asyncpg.Connection, folder: Path | None = None, to: int | None = None) -> list[Migration]:
    """What `migrate --to` would apply, after the drift check. Read-only (for --dry-run)."""
    files = discover(folder)
    if to is not None and to not in {m.version for m in files}:
        known = ", ".join(f"{m.version:04d}" for m in files)
        raise MigrationError(f"--to {to:04d}: no such migration (known: {known})")
    check_drift(await status(conn, folder))
    waiting = await pending(conn, folder)
    return [m for m in waiting if to is None or m.version <= to]


# --- applying -------------------------------------------------------------------------


async def migrate(
    conn: asyncpg.Connection,
    folder: Path | None = None,
    *,
    to: int | None = None,
    lock_timeout: float | None = None,
    on_wait: Callable[[], None] | None = None,
) -> list[Migration]:
    """Applies what is pending (up to `to`); returns what this call applied. Waits for a
    concurrent run up to `lock_timeout` seconds (None: as long as it takes)."""
    await _lock(conn, lock_timeout, on_wait)
    try:
        await conn.execute(BOOTSTRAP)
        todo = await plan(conn, folder, to)
        await _repair_invalid_indexes(conn, folder, todo)
        for m in todo:
            await _apply(conn, m)
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


async def _lock(conn: asyncpg.Connection, timeout: float | None, on_wait: Callable[[], None] | None) -> None:
    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        return
    if on_wait is not None:
        on_wait()
    deadline = None if timeout is None else time.monotonic() + timeout
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        if deadline is not None and time.monotonic() >= deadline:
            raise MigrationError(
                f"another `sdrctl migrate` held the migration lock for more than {timeout:g}s; "
                "try again when it has finished, or raise --lock-timeout"
            )
        await asyncio.sleep(LOCK_POLL)


async def _repair_invalid_indexes(conn: asyncpg.Connection, folder: Path | None, todo: list[Migration]) -> None:
    """Drops indexes a failed concurrent build left INVALID; builds again those of
    migrations already applied (pending ones build theirs when they run)."""
    broken = set(await invalid_indexes(conn))
    if not broken:
        return
    waiting = {m.version for m in todo}
    for m in discover(folder):
        for name, stmt in m.concurrent_indexes().items():
            if name not in broken:
                continue
            await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
            if m.version not in waiting:
                await _run(conn, m, m.statements.index(stmt), stmt)


async def _apply(conn: asyncpg.Connection, m: Migration) -> None:
    record = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
    if m.transactional:
        async with conn.transaction():
            for number, stmt in enumerate(m.statements):
                await _run(conn, m, number, stmt)
            await conn.execute(record, m.version, m.name, m.checksum)
        return
    for number, stmt in enumerate(m.statements):
        match = CONCURRENT_INDEX.match(_strip_comments(stmt))
        if match and match[1] in await invalid_indexes(conn):
            await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{match[1]}"')
        await _run(conn, m, number, stmt)
    await conn.execute(record, m.version, m.name, m.checksum)


async def _run(conn: asyncpg.Connection, m: Migration, number: int, stmt: str) -> None:
    try:
        await conn.execute(stmt)
    except asyncpg.PostgresError as exc:
        first = _strip_comments(stmt).strip().splitlines()[0][:100]
        raise MigrationError(f"{m.file}, statement {number + 1} ({first}): {exc.__class__.__name__}: {exc}") from None


# --- SQL text -------------------------------------------------------------------------

_TOKEN = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$(\w*)\$|;", re.DOTALL)


def split_statements(sql: str) -> list[str]:
    """Splits a script on top-level semicolons, skipping those in comments, quoted strings,
    quoted identifiers and dollar-quoted bodies (functions). Empty statements are dropped."""
    statements, start, pos = [], 0, 0
    while True:
        match = _TOKEN.search(sql, pos)
        if match is None:
            break
        token = match.group(0)
        if token == ";":
            statements.append(sql[start : match.start()])
            start = pos = match.end()
        elif token.startswith("$"):
            close = sql.find(token, match.end())
            pos = len(sql) if close < 0 else close + len(token)
        else:
            pos = match.end()
    statements.append(sql[start:])
    return [s.strip() for s in statements if _strip_comments(s).strip()]


def _strip_comments(stmt: str) -> str:
    return re.sub(r"--[^\n]*|/\*.*?\*/", "", stmt, flags=re.DOTALL)
