"""`sdrctl export`: the database's conversations as replay JSONL (README: Replay format)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from daemon.tools.replay import dumps_line, parse_since
from daemon.tools.replay.export import export as export_lines
from sdrctl.common import ConfigOpt, ProfileOpt, err, friendly_errors, load


@friendly_errors
def export(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(help="conversations active within this (7d, 12h, 30m, a date, or all)")] = "7d",
    lead: Annotated[str | None, typer.Option(help="only this lead's phone")] = None,
    anonymize: Annotated[
        bool,
        typer.Option(
            "--anonymize", help="phones as stable pseudonyms (55000 + 8 digits), names replaced; the text is kept"
        ),
    ] = False,
    salt: Annotated[
        str,
        typer.Option(
            envvar="SDRCTL_EXPORT_SALT",
            help="with --anonymize: a secret mixed into the pseudonyms so that they cannot be reversed by "
            "trying every number (same salt, same pseudonyms)",
        ),
    ] = "",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here (default: standard output)")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Write the database's conversations as JSONL that `sdrctl replay` reads: each turn's
    messages from the lead, then the reply parts the bot sent."""
    cfg = load(ctx, config, profile)
    when = parse_since(since)
    lines = asyncio.run(export_lines(cfg, since=when, lead=lead, anonymize=anonymize, salt=salt))
    text = "".join(dumps_line(doc) + "\n" for doc in lines)
    conversations = len({doc["conversation"] for doc in lines})
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
    err.print(
        f"exported {conversations} conversation(s), {len(lines)} line(s)"
        + (f" to {escape(str(output))}" if output else "")
    )
