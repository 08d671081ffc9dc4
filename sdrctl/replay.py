"""`sdrctl replay`: replay recorded conversations through the pipeline and diff the replies."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from daemon.config import Config
from daemon.errors import ConfigError
from daemon.tools.replay import (
    Conversation,
    ConversationResult,
    ReplayReport,
    TurnResult,
    check_speed,
    from_database,
    parse_file,
    parse_since,
    select,
)
from daemon.tools.replay import (
    replay as run_replay,
)
from sdrctl.common import ConfigOpt, ProfileOpt, err, friendly_errors, load, out, setup_logging

STYLE = {"exact": "green", "changed": "yellow", "missing": "red", "extra": "magenta"}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f}"


def results_table(report: ReplayReport) -> Table:
    # Narrow enough for an 80-column terminal or CI log (the phones are in the progress lines).
    table = Table(title=f"replay against the {escape(report.target)}, speed {report.speed:g}")
    for col in ("conversation", "turns", "exact", "changed", "missing", "extra", "p50 ms", "p95 ms"):
        table.add_column(col, justify="left" if col == "conversation" else "right", no_wrap=True)

    def add(name: str, turns: int, counts: dict[str, int], latency: dict[str, float | None]) -> None:
        cells = [f"[{STYLE[s]}]{n}[/]" if n and s != "exact" else str(n) for s, n in counts.items()]
        table.add_row(escape(name), str(turns), *cells, _ms(latency["p50"]), _ms(latency["p95"]))

    for c in report.conversations:
        add(c.id, len(c.turns), c.counts(), c.latency())
    table.add_section()
    add("total", len(report.turns), report.counts(), report.latency())
    return table


def show_difference(t: TurnResult) -> None:
    where = f"[bold]{escape(t.conversation)}[/] {escape(t.where)}"
    out.print(f"{where} [{STYLE[t.status]}]{t.status}[/]", soft_wrap=True)
    out.print(f"  lead: {escape(' / '.join(t.sent))}", soft_wrap=True)
    if t.status == "changed":
        for line in t.diff()[2:]:  # the ---/+++ header says nothing here
            color = {"-": "red", "+": "green"}.get(line[:1], "dim")
            out.print(f"  [{color}]{escape(line)}[/]", soft_wrap=True)
    elif t.status == "missing":
        out.print(f"  [red]no reply; recorded:[/] {escape(t.expected or '')}", soft_wrap=True)
    else:
        out.print(f"  [magenta]reply where none was recorded:[/] {escape(t.got or '')}", soft_wrap=True)


def _progress(c: ConversationResult) -> None:
    counts = c.counts()
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    err.print(f"{escape(c.id)} ({c.phone}): {len(c.turns)} turns: {summary}")


def _conversations(
    cfg: Config, file: Path | None, from_db: bool, since: str, lead: str | None
) -> tuple[list[Conversation], str]:
    if from_db and file is None:
        return asyncio.run(from_database(cfg, since=parse_since(since), lead=lead)), "database"
    if file is None or from_db:
        raise ConfigError("give a FILE.jsonl to replay, or --from-db (one of the two)")
    return parse_file(file), str(file)


@friendly_errors
def replay(
    ctx: typer.Context,
    file: Annotated[
        Path | None, typer.Argument(help="recorded conversations, one JSON message per line (README: Replay format)")
    ] = None,
    speed: Annotated[float, typer.Option(help="the recorded gaps between messages, this many times shorter")] = 10.0,
    url: Annotated[
        str | None,
        typer.Option(
            help="replay against the daemon at this URL instead of an in-process one (its replies are read "
            "from the configured database's outbox)"
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="exit 1 when differences (changed + missing + extra) exceed --tolerate")
    ] = False,
    tolerate: Annotated[int, typer.Option(min=0, help="differences --check accepts")] = 0,
    json_file: Annotated[Path | None, typer.Option("--json", help="write the results as JSON here")] = None,
    conversation: Annotated[
        list[str] | None, typer.Option("--conversation", help="replay only this conversation (repeatable)")
    ] = None,
    from_db: Annotated[
        bool, typer.Option("--from-db", help="replay the configured database's conversations instead of a file")
    ] = False,
    since: Annotated[
        str, typer.Option(help="with --from-db: conversations active within this (7d, 12h, 30m, a date, or all)")
    ] = "7d",
    lead: Annotated[str | None, typer.Option(help="with --from-db: only this lead's phone")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Re-send recorded lead messages as Evolution webhooks (to a throw-away in-process
    daemon, or --url) and compare each burst's reply with the recorded one."""
    cfg = load(ctx, config, profile)
    check_speed(speed)
    setup_logging("warning")  # the in-process daemon's info lines would drown the report
    conversations, source = _conversations(cfg, file, from_db, since, lead)
    conversations = select(conversations, conversation, source)
    err.print(
        f"replaying {len(conversations)} conversation(s) from {escape(source)} at speed {speed:g}, "
        f"profile {escape(cfg.profile.name)}"
    )
    report = asyncio.run(run_replay(conversations, cfg, url=url, speed=speed, progress=_progress))
    out.print(results_table(report))
    for t in report.turns:
        if t.status != "exact":
            show_difference(t)
    counts, differences = report.counts(), report.differences()
    out.print(
        f"{len(report.turns)} turns: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f"; {differences} difference(s) in {report.elapsed:.1f}s"
    )
    if json_file is not None:
        json_file.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
        err.print(f"wrote {escape(str(json_file))}")
    if check:
        if differences > tolerate:
            out.print(f"[red]check failed:[/] {differences} difference(s), {tolerate} tolerated")
            raise typer.Exit(1)
        out.print(f"[green]check passed:[/] {differences} difference(s), {tolerate} tolerated")
