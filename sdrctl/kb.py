"""`sdrctl kb`: the knowledge base as files a sales team edits (import, export, list, show)
and how well it answers (search --explain, eval). Reading and writing files is in
daemon/knowledge/files.py, the table in daemon/knowledge/sync.py; this module parses and
renders."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from zoneinfo import ZoneInfo

import asyncpg
import typer
from rich.table import Table
from rich.text import Text

from daemon.cache import REDIS_ERRORS
from daemon.config import Config
from daemon.connections import Redis, pg_options, redis_client
from daemon.embedded import Endpoints, services
from daemon.errors import ConfigError, DatabaseError, NotFoundError, UnavailableError
from daemon.knowledge import files, sync
from sdrctl.common import ConfigOpt, ProfileOpt, err, fail, friendly_errors, load, out

if TYPE_CHECKING:
    from daemon.knowledge.embeddings import Embedder
    from daemon.knowledge.evaluate import Score
    from daemon.knowledge.search import KnowledgeSearch, Ranked

app = typer.Typer(
    help="The knowledge base as Markdown/CSV files: import (dry run unless --apply), export, list, show; "
    "search it (--explain) and score it against questions (eval).",
    no_args_is_help=True,
)
T = TypeVar("T")
METHODS = ("fts", "vector", "hybrid")  # as daemon.knowledge.search.METHODS
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
FORMAT_HELP = (
    "Markdown: one entry per file, TOML front matter between +++ lines (title required; key, category, "
    "tags, questions optional), then the text. CSV: header key,title,category,tags,questions,content "
    "(title and content required; tags and questions separated by |). A folder is read recursively: "
    "*.md and *.csv; other files, and hidden files and folders, are ignored."
)


def say(message: str) -> None:
    """Our text with file or database values in it, never read as rich markup."""
    out.print(Text(message), soft_wrap=True)


def _local(when: datetime, tz: tzinfo) -> str:
    return f"{when.astimezone(tz):%Y-%m-%d %H:%M %Z}"


def _run(cfg: Config, work: Callable[[asyncpg.Pool, Redis | None], Awaitable[T]], *, redis: bool = False) -> T:
    """`work` on a small pool to the direct URL ([database] migrate_url, else url) and, with
    `redis`, a Redis client; embedded servers are started for URLs left empty."""

    async def run(ep: Endpoints) -> T:
        try:
            pool = await asyncpg.create_pool(
                ep.direct_url,
                min_size=1,
                max_size=2,
                timeout=cfg.profile.timeouts.database,
                **pg_options(ep.direct_pooled),
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise UnavailableError(f"cannot connect to PostgreSQL: {exc}") from None
        client = redis_client(ep.redis_url, ep.redis_cluster, cfg) if redis else None
        try:
            return await work(pool, client)
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"PostgreSQL failed: {type(exc).__name__}: {exc}") from None
        except (OSError, asyncpg.InterfaceError) as exc:
            raise UnavailableError(f"lost the connection to PostgreSQL: {exc}") from None
        finally:
            await pool.close()
            if client is not None:
                await client.aclose()

    with services(cfg, redis=redis) as endpoints:
        return asyncio.run(run(endpoints))


def _embedder(cfg: Config) -> Embedder | None:
    """The `[knowledge] embeddings_url` client, None without one."""
    from daemon.knowledge.embeddings import make_embedder

    return make_embedder(cfg)


# --- import, export ------------------------------------------------------------------------


@dataclass
class Imported:
    diff: sync.Diff
    written: bool
    cache_problem: str | None = None
    embedded: int | None = None  # None: no embeddings endpoint
    embed_problem: str | None = None


def _print_diff(diff: sync.Diff) -> None:
    for e in diff.added:
        say(f"+ {e.key}")
    for c in diff.changed:
        say(f"~ {c.key} ({', '.join(c.fields)})")
    for key in diff.removed:
        say(f"- {key}")
    n = diff.counts()
    say(f"{n['added']} to add, {n['changed']} to change, {n['removed']} to delete, {n['unchanged']} unchanged")
    if diff.kept:
        say(
            f"{n['kept']} entr{'y' if n['kept'] == 1 else 'ies'} in the database but not in the source: kept (--prune deletes them)"
        )


@app.command(
    "import",
    help=f"Import a file or folder: print what would change (+ added, ~ changed, - deleted) and, with --apply, write it in one transaction. {FORMAT_HELP} Entries are matched by key. A bad file is refused with its path and line (exit 2) and nothing is written.",
)
@friendly_errors
def import_cmd(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="a .md or .csv file, or a folder of them")],
    apply: Annotated[
        bool, typer.Option("--apply", help="write the changes (default: a dry run that writes nothing)")
    ] = False,
    prune: Annotated[
        bool, typer.Option("--prune", help="delete the entries the database holds and the source does not")
    ] = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    entries = files.read_source(source)  # a bad file exits 2 before any database is started
    cfg = load(ctx, config, profile)

    async def work(pool: asyncpg.Pool, redis: Redis | None) -> Imported:
        async with pool.acquire() as conn:
            diff = await sync.plan(conn, entries, prune)
            if not apply:
                return Imported(diff, written=False)
            await sync.apply(conn, diff, str(source.resolve()))
        done = Imported(diff, written=True)
        if not diff.empty and redis is not None:
            try:
                await sync.announce(redis)
            except REDIS_ERRORS as exc:
                done.cache_problem = (
                    f"imported, but Redis failed ({type(exc).__name__}): running daemons may answer from their "
                    "knowledge cache until their next knowledge refresh ([followups] kb_refresh_interval)"
                )
        embedder = _embedder(cfg)
        if embedder is not None:
            from daemon.knowledge.embeddings import ensure_embeddings

            try:
                done.embedded = await ensure_embeddings(pool, embedder)
            except Exception as exc:  # the import is written; the daemons embed what is missing later
                done.embed_problem = (
                    f"imported, but embedding the entries failed ({type(exc).__name__}: {exc}); the daemons embed "
                    "what is missing at start and at their next knowledge refresh"
                )
            finally:
                await embedder.close()
        return done

    done = _run(cfg, work, redis=apply)
    _print_diff(done.diff)
    if not done.written:
        say("dry run: nothing was written; --apply writes it")
        return
    say("nothing to change; the import is recorded" if done.diff.empty else "written in one transaction")
    if done.embedded is not None and not done.embed_problem:
        say(f"embedded {done.embedded} entr{'y' if done.embedded == 1 else 'ies'} for search by meaning")
    problems = [p for p in (done.cache_problem, done.embed_problem) if p]
    for problem in problems:
        fail(problem)
    if problems:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def export(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="a new or empty folder")],
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Write every entry as DIR/<category>/<key>.md (the format `import` reads: importing
    the folder back changes nothing). DIR must hold no .md or .csv file yet, so no stale
    entry survives in it."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder")
    if folder.is_dir() and (present := files.source_files(folder)):
        raise ConfigError(
            f"{folder}: already holds {len(present)} .md or .csv file(s) (e.g. {present[0]}); export into a new "
            "or empty folder, so that no stale entry is imported back with the others"
        )
    cfg = load(ctx, config, profile)
    entries = _run(cfg, lambda pool, _r: _with_conn(pool, sync.export_entries))
    if not entries:
        say("the knowledge base is empty: nothing written")
        return
    files.write_markdown(folder, entries)
    categories = len({e.category for e in entries})
    say(f"exported {len(entries)} entries in {categories} categor{'y' if categories == 1 else 'ies'} to {folder}")


async def _with_conn(pool: asyncpg.Pool, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    async with pool.acquire() as conn:
        return await work(conn)


# --- list, show ----------------------------------------------------------------------------


def _entry_doc(s: sync.StoredEntry) -> dict[str, Any]:
    e = s.entry
    return {
        "key": e.key,
        "title": e.title,
        "category": e.category,
        "tags": list(e.tags),
        "questions": list(e.questions),
        "content": e.content,
        "id": s.id,
        "content_hash": s.content_hash,
        "created_at": s.created_at.isoformat(timespec="seconds"),
        "updated_at": s.updated_at.isoformat(timespec="seconds"),
    }


@app.command("list")
@friendly_errors
def list_cmd(
    ctx: typer.Context,
    category: Annotated[str | None, typer.Option(help="only this category")] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """The entries by category and key: title, how many tags and questions, last change."""
    cfg = load(ctx, config, profile)
    rows = _run(cfg, lambda pool, _r: _with_conn(pool, lambda c: sync.list_entries(c, category)))
    if as_json:
        print(json.dumps([_entry_doc(s) for s in rows], indent=2, ensure_ascii=False))
        return
    if not rows:
        say(f"no entries{f' in category {category!r}' if category else ''}")
        return
    tz = ZoneInfo(cfg.followups.timezone)
    table = Table(title=f"{len(rows)} entries{f' in {category}' if category else ''}")
    for col in ("key", "category", "title", "tags", "questions", f"updated ({cfg.followups.timezone})"):
        table.add_column(col, justify="right" if col in ("tags", "questions") else "left")
    for s in rows:
        e = s.entry
        table.add_row(
            Text(e.key),
            Text(e.category),
            Text(e.title),
            str(len(e.tags)),
            str(len(e.questions)),
            _local(s.updated_at, tz),
        )
    out.print(table)


@app.command()
@friendly_errors
def show(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(metavar="KEY", help="the entry's key (see `kb list`)")],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """One entry as its Markdown file (what `export` writes); --json adds its id, content
    hash and times. An unknown KEY exits 2."""
    cfg = load(ctx, config, profile)
    try:
        s = _run(cfg, lambda pool, _r: _with_conn(pool, lambda c: sync.fetch_entry(c, key)))
    except NotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if as_json:
        print(json.dumps(_entry_doc(s), indent=2, ensure_ascii=False))
        return
    print(files.to_markdown(s.entry), end="")  # plain: the file as it is, never wrapped


# --- search, eval --------------------------------------------------------------------------


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: one of {', '.join(METHODS)}")


def _search(cfg: Config, pool: asyncpg.Pool, embedder: Embedder | None, *, measuring: bool = False) -> KnowledgeSearch:
    """A search as the daemon runs it (same profile timeouts and fusion), without its caches;
    `measuring` (eval): the question's embedding gets the import's timeout, so a slow
    endpoint does not count as a miss of the model."""
    from daemon.knowledge.search import KnowledgeSearch

    return KnowledgeSearch(
        pool,
        embedder=embedder,
        vectors=None,
        candidates=cfg.knowledge.candidates,
        rrf_k=cfg.knowledge.rrf_k,
        embeddings_timeout=cfg.profile.timeouts.embeddings_import if measuring else cfg.profile.timeouts.embeddings,
        timeout=cfg.profile.timeouts.database,
    )


@dataclass
class Found:
    results: list[Ranked]
    degraded: str | None  # why the vector half failed: the results are full-text only


def _ranked_doc(r: Ranked) -> dict[str, Any]:
    return {
        "key": r.key,
        "title": r.entry.title,
        "category": r.entry.category,
        "score": r.score,
        "signals": {name: {"rank": s.rank, "score": s.score} for name, s in r.signals.items()},
    }


@app.command()
@friendly_errors
def search(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(metavar="QUESTION", help="what a lead would ask, in quotes")],
    limit: Annotated[int, typer.Option(help="show this many entries", min=1, max=100)] = 5,
    method: Annotated[
        str,
        typer.Option(
            help="fts (full-text), vector (by meaning) or hybrid (both, fused by rank; fts without an embeddings endpoint)"
        ),
    ] = "hybrid",
    explain: Annotated[
        bool, typer.Option("--explain", help="per entry: the score that ordered it and each signal's rank and score")
    ] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """The entries the daemon's search finds for QUESTION, best first."""
    _check_method(method)
    cfg = load(ctx, config, profile)

    async def work(pool: asyncpg.Pool, _r: Redis | None) -> Found:
        from daemon.knowledge.search import Degraded

        embedder = _embedder(cfg)
        try:
            return Found(await _search(cfg, pool, embedder).search(question, limit, method), None)
        except Degraded as exc:
            return Found(exc.results, str(exc))
        except ValueError as exc:  # vector search without an endpoint or pgvector
            raise ConfigError(f"--method {method}: {exc}") from None
        finally:
            if embedder is not None:
                await embedder.close()

    found = _run(cfg, work)
    if found.degraded:
        err.print(Text(f"search by meaning failed ({found.degraded}): full-text results only"), soft_wrap=True)
    if as_json:
        print(json.dumps([_ranked_doc(r) for r in found.results], indent=2, ensure_ascii=False))
        return
    if not found.results:
        say("no entry found")
        return
    for n, r in enumerate(found.results, start=1):
        say(f"{n}. {r.key}: {r.entry.title}")
        if explain:
            signals = ", ".join(f"{name} #{s.rank} ({s.score:.4f})" for name, s in sorted(r.signals.items()))
            say(f"   score {r.score:.4f}; {signals or 'no signal'}")


def _daemon_method(methods: tuple[str, ...]) -> str:
    return "hybrid" if "hybrid" in methods else "fts"


@app.command("eval")
@friendly_errors
def eval_cmd(
    ctx: typer.Context,
    cases_file: Annotated[
        Path, typer.Argument(metavar="FILE", help='JSON lines: {"question": "...", "expected": ["key", ...]}')
    ],
    check: Annotated[
        float | None,
        typer.Option(
            "--check",
            metavar="MIN",
            min=0.0,
            max=1.0,
            help="exit 1 when the daemon's method (hybrid with an embeddings endpoint, else fts) finds an expected entry in its top 3 for less than this share of the questions (0-1)",
        ),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Score the search on questions with known answers: per method, recall@1, recall@3
    (the agent gets the top 3 entries) and the mean reciprocal rank."""
    from daemon.knowledge.evaluate import evaluate, read_cases

    cases = read_cases(cases_file)
    cfg = load(ctx, config, profile)

    async def work(pool: asyncpg.Pool, _r: Redis | None) -> list[Score]:
        from daemon.knowledge.embeddings import ensure_embeddings, has_vectors

        embedder = _embedder(cfg)
        try:
            methods = METHODS if embedder is not None and await has_vectors(pool) else ("fts",)
            if embedder is not None and methods != ("fts",):
                await ensure_embeddings(pool, embedder)  # entries imported without the endpoint
            return await evaluate(_search(cfg, pool, embedder, measuring=True), cases, methods)
        finally:
            if embedder is not None:
                await embedder.close()

    scores = _run(cfg, work)
    checked = next(s for s in scores if s.method == _daemon_method(tuple(s.method for s in scores)))
    if as_json:
        print(
            json.dumps(
                {"scores": [s.as_dict() for s in scores], "checked": checked.method}, indent=2, ensure_ascii=False
            )
        )
    else:
        table = Table(title=f"{len(cases)} question(s) from {cases_file}")
        for col in ("method", "recall@1", "recall@3", "MRR", "misses@1"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for s in scores:
            table.add_row(s.method, f"{s.recall_1:.3f}", f"{s.recall_3:.3f}", f"{s.mrr:.3f}", str(len(s.misses)))
        out.print(table)
    if check is not None:
        if checked.recall_3 < check:
            fail(f"{checked.method}: recall@3 {checked.recall_3:.3f} is below --check {check:g}")
            raise typer.Exit(1)
        err.print(f"{checked.method}: recall@3 {checked.recall_3:.3f} >= {check:g}")
