"""`sdrctl migrate` (up, --to, --dry-run), `migrate status` and `migrate verify`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import asyncpg
import typer
from rich.markup import escape
from rich.table import Table

from daemon import migrations
from daemon.config import Config
from daemon.connections import pg_options
from daemon.embedded import Endpoints, services
from daemon.errors import ConfigError, UnavailableError
from daemon.tools import verify
from sdrctl.common import ConfigOpt, ProfileOpt, err, friendly_errors, load, out, setup_logging

app = typer.Typer(
    help="Apply sql/ migrations, show their status, check the hot queries' plans.", invoke_without_command=True
)
T = TypeVar("T")


def with_connection(cfg: Config, work: Callable[[asyncpg.Connection], Awaitable[T]], *, session: bool = False) -> T:
    """Runs `work` on one connection to the direct URL ([database] migrate_url, else url).
    `session`: the work needs session state (migrate's advisory lock, verify's search_path),
    which a transaction pooler does not keep."""

    async def run(endpoints: Endpoints) -> T:
        if session and endpoints.direct_pooled:
            raise ConfigError(
                "[database] url is a transaction pooler, which keeps no session state (the "
                "migration lock); set [database] migrate_url (SDR_DATABASE_MIGRATE_URL) to a "
                "direct connection, e.g. Supabase's port 5432"
            )
        try:
            conn = await asyncpg.connect(
                endpoints.direct_url,
                timeout=cfg.profile.timeouts.database,
                **pg_options(endpoints.direct_pooled),
            )
        except asyncpg.InvalidPasswordError as exc:
            raise UnavailableError(f"PostgreSQL refused the credentials: {exc}") from None
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise UnavailableError(f"cannot connect to PostgreSQL: {exc}") from None
        try:
            return await work(conn)
        except (OSError, asyncpg.InterfaceError) as exc:
            raise UnavailableError(f"lost the connection to PostgreSQL: {exc}") from None
        finally:
            await conn.close()

    with services(cfg, redis=False) as endpoints:
        return asyncio.run(run(endpoints))


def _version(value: str | None) -> int | None:
    if value is None:
        return None
    digits = value.split("_", 1)[0]
    if not digits.isdigit():
        raise typer.BadParameter(f"{value!r}: a migration version is its number, e.g. 3 or 0003")
    return int(digits)


ToOpt = Annotated[str | None, typer.Option("--to", help="stop after this version (e.g. 0002)")]


@app.callback()
@friendly_errors
def up(
    ctx: typer.Context,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    to: ToOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the SQL that would run; change nothing")] = False,
    lock_timeout: Annotated[
        float, typer.Option(help="seconds to wait for a concurrent migrate before giving up", min=0)
    ] = 60.0,
) -> None:
    """Apply pending migrations in order (each file in its own transaction unless its
    header says `-- sdrctl: no-transaction`)."""
    if ctx.invoked_subcommand is not None:
        return
    cfg = load(ctx, config, profile)
    setup_logging(cfg.daemon.log_level)
    target = _version(to)
    if dry_run:
        todo = with_connection(cfg, lambda c: migrations.plan(c, to=target))
        for m in todo:
            mode = "" if m.transactional else " (no transaction: statement by statement)"
            print(f"-- {m.file}{mode}")  # plain print: SQL must not be wrapped or styled
            for stmt in m.statements:
                print(f"{stmt};\n")
        err.print(f"dry run: {len(todo)} migration(s) would be applied; nothing was changed")
        return

    def waiting() -> None:
        err.print(f"another migrate holds the lock; waiting up to {lock_timeout:g}s")

    applied = with_connection(
        cfg,
        lambda c: migrations.migrate(c, to=target, lock_timeout=lock_timeout, on_wait=waiting),
        session=True,
    )
    for m in applied:
        out.print(f"applied {m.file}")
    where = f"up to {target:04d}" if target is not None else "the schema is up to date"
    out.print(f"{len(applied)} migration(s) applied; {where}")


@app.command()
@friendly_errors
def status(
    ctx: typer.Context,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Applied and pending migrations, and drift: applied files edited since, applied
    versions with no file, INVALID indexes left by a failed concurrent build."""
    cfg = load(ctx, config, profile)
    st = with_connection(cfg, migrations.status)
    if as_json:
        doc = {
            "migrations": [
                {
                    "version": s.version,
                    "name": s.name,
                    "state": s.state,
                    "applied_at": s.applied_at.isoformat() if s.applied_at else None,
                    "checksum": s.checksum,
                    "applied_checksum": s.applied_checksum,
                }
                for s in st.migrations
            ],
            "pending": len(st.pending),
            "drift": [f"{s.version:04d}_{s.name}" for s in st.drift],
            "invalid_indexes": st.invalid_indexes,
        }
        print(json.dumps(doc, indent=2))
        return
    colour = {"applied": "green", "pending": "yellow", "edited": "red", "missing": "red"}
    table = Table("version", "name", "state", "applied at")
    for s in st.migrations:
        when = f"{s.applied_at:%Y-%m-%d %H:%M:%S}" if s.applied_at else ""
        label = {"edited": "edited since applied", "missing": "applied, file missing"}.get(s.state, s.state)
        table.add_row(f"{s.version:04d}", s.name, f"[{colour[s.state]}]{label}[/]", when)
    out.print(table)
    for name in st.invalid_indexes:
        out.print(f"[red]INVALID index {escape(name)}[/]: a concurrent build failed; `sdrctl migrate` rebuilds it")
    if st.drift:
        out.print("[red]drift:[/] an applied migration must never change; restore it and add a new one")


@app.command("verify")
@friendly_errors
def verify_cmd(
    ctx: typer.Context,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    sample_data: Annotated[
        int,
        typer.Option("--sample-data", help="fill a throw-away schema with N leads (~20 messages each) first", min=0),
    ] = 0,
    seq_scan_rows: Annotated[
        int, typer.Option(help="fail on a sequential scan of a table with more rows than this", min=0)
    ] = 10_000,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) the pipeline's hot queries; exit 1 when one scans a big
    table sequentially. With --sample-data, show the plans before and after the index
    migration on generated data."""
    cfg = load(ctx, config, profile)
    p = cfg.profile
    limits = {
        "history_limit": p.limits.history_limit,
        "kb_results": p.limits.kb_results,
        "claim_batch": p.buffer.claim_batch,
    }

    async def work(conn: asyncpg.Connection) -> tuple[list[verify.PlanResult], Any]:
        if sample_data:
            err.print(f"verify: generating {sample_data:,} leads in a throw-away schema")
            run = await verify.with_sample_data(conn, sample_data, limits, seq_scan_rows)
            return run.after, run
        args = await verify.sample_args(conn, limits)
        return await verify.explain_all(conn, args, seq_scan_rows), None

    results, run = with_connection(cfg, work, session=True)
    if as_json:
        doc: dict[str, Any] = {"ok": all(r.ok for r in results), "plans": [r.as_dict() for r in results]}
        if run is not None:
            doc.update(sample_leads=run.leads, sample_messages=run.messages, before=[r.as_dict() for r in run.before])
        print(json.dumps(doc, indent=2))
    else:
        if run is not None:
            out.print(f"sample data: {run.leads:,} leads, {run.messages:,} messages (schema {run.schema}, dropped)")
            _plans_table("before the index migration", run.before)
            _plans_table("after the index migration", results)
            for b, a in zip(run.before, results, strict=True):
                out.print(f"{escape(a.query)}: {b.time_ms:.2f} ms -> {a.time_ms:.2f} ms")
        else:
            _plans_table("hot queries", results)
        for r in results:
            for problem in r.problems:
                out.print(f"[red]FAIL[/] {escape(r.query)}: {escape(problem)}")
        if all(r.ok for r in results):
            out.print(f"[green]ok[/]: no hot query scans a table over {seq_scan_rows:,} rows sequentially")
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def _plans_table(title: str, results: list[verify.PlanResult]) -> None:
    table = Table(title=title)
    table.add_column("query")
    table.add_column("access path")
    table.add_column("rows", justify="right")
    table.add_column("time (ms)", justify="right")
    for r in results:
        access = "\n".join(
            f"[red]{escape(str(s))}[/]" if s.node == "Seq Scan" and s.table_rows else escape(str(s)) for s in r.scans
        )
        table.add_row(escape(r.query), access, f"{r.rows:,}", f"{r.time_ms:.2f}")
    out.print(table)
