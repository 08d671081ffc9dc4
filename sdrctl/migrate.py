"""`sdrctl migrate` (apply pending migrations) and `sdrctl migrate status`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import asyncpg
import typer
from rich.table import Table

from daemon import migrations
from daemon.config import Config
from daemon.embedded import services
from daemon.errors import UnavailableError
from sdrctl.common import ConfigOpt, ProfileOpt, friendly_errors, load, out, setup_logging

app = typer.Typer(help="Apply sql/ migrations, or show their status.", invoke_without_command=True)
T = TypeVar("T")


def with_connection(cfg: Config, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    async def run(url: str) -> T:
        try:
            conn = await asyncpg.connect(url, timeout=cfg.profile.timeouts.database)
        except (OSError, asyncpg.PostgresError) as exc:
            raise UnavailableError(f"cannot connect to PostgreSQL: {exc}") from None
        try:
            return await work(conn)
        finally:
            await conn.close()

    with services(cfg, redis=False) as endpoints:
        return asyncio.run(run(endpoints.database_url))


@app.callback()
@friendly_errors
def up(ctx: typer.Context, config: ConfigOpt = None, profile: ProfileOpt = None) -> None:
    """Apply every pending migration, each in its own transaction."""
    if ctx.invoked_subcommand is not None:
        return
    cfg = load(ctx, config, profile)
    setup_logging(cfg.daemon.log_level)
    applied = with_connection(cfg, migrations.migrate)
    for m in applied:
        out.print(f"applied {m.version:04d}_{m.name}")
    out.print(f"{len(applied)} migration(s) applied; the schema is up to date")


@app.command()
@friendly_errors
def status(
    ctx: typer.Context,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show applied and pending migrations."""
    cfg = load(ctx, config, profile)
    states = with_connection(cfg, migrations.status)
    if as_json:
        rows = [
            {"version": s.version, "name": s.name,
             "applied_at": s.applied_at.isoformat() if s.applied_at else None}
            for s in states
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return
    table = Table("version", "name", "status")
    for s in states:
        when = f"applied {s.applied_at:%Y-%m-%d %H:%M:%S}" if s.applied_at else "[yellow]pending[/]"
        table.add_row(f"{s.version:04d}", s.name, when)
    out.print(table)
