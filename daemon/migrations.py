"""Applies sql/NNNN_name.sql in order, each in its own transaction, and records it.

An advisory lock serialises concurrent runs (two daemons starting on one embedded
database, two deploys), so a migration is never applied twice."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from daemon.config import shipped_path
from daemon.errors import MigrationError

FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
LOCK_KEY = 7_305_514_121  # advisory lock id: any constant unique to sdrctl

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
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class MigrationState:
    version: int
    name: str
    applied_at: datetime | None  # None = pending


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


async def _applied(conn: asyncpg.Connection) -> dict[int, datetime]:
    await conn.execute(BOOTSTRAP)
    rows = await conn.fetch("SELECT version, applied_at FROM schema_migrations")
    return {r["version"]: r["applied_at"] for r in rows}


async def status(conn: asyncpg.Connection, folder: Path | None = None) -> list[MigrationState]:
    applied = await _applied(conn)
    return [MigrationState(m.version, m.name, applied.get(m.version)) for m in discover(folder)]


async def pending(conn: asyncpg.Connection, folder: Path | None = None) -> list[Migration]:
    applied = await _applied(conn)
    return [m for m in discover(folder) if m.version not in applied]


async def migrate(conn: asyncpg.Connection, folder: Path | None = None) -> list[Migration]:
    """Applies what is pending; returns what this call applied."""
    done: list[Migration] = []
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        for m in await pending(conn, folder):
            try:
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        m.version, m.name, m.checksum,
                    )  # fmt: skip
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{m.path.name}: {exc.__class__.__name__}: {exc}") from None
            done.append(m)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    return done
