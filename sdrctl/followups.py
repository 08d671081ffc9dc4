"""`sdrctl followups list` and `sdrctl followups cancel`: an operator's view of the
scheduled messages. The SQL is in daemon/followups/admin.py; this module parses and renders."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, tzinfo
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer
from rich.table import Table
from rich.text import Text

from daemon.errors import ConfigError
from daemon.followups import admin
from daemon.followups.admin import FollowUp
from sdrctl.common import ConfigOpt, ProfileOpt, err, fail, friendly_errors, load, out
from sdrctl.migrate import with_connection

app = typer.Typer(help="List the scheduled follow-ups; cancel pending ones.", no_args_is_help=True)

COLOUR = {"pending": "yellow", "executing": "cyan", "sent": "green", "failed": "red", "cancelled": "dim"}
LeadOpt = Annotated[str | None, typer.Option("--lead", help="the lead's phone number (anything but digits is dropped)")]


def _local(when: datetime | None, tz: tzinfo) -> str:
    return f"{when.astimezone(tz):%Y-%m-%d %H:%M %Z}" if when else ""


def _describe(f: FollowUp, tz: tzinfo) -> str:
    who = f.phone + (f" {f.name}" if f.name else "")
    return f"follow-up {f.id} ({f.kind} step {f.step} to {who}, due {_local(f.due_at, tz)})"


def _as_dict(f: FollowUp, tz: tzinfo) -> dict[str, Any]:
    """Instants in ISO 8601 with the business time zone's offset, as the table shows them."""
    return {
        k: v.astimezone(tz).isoformat(timespec="seconds") if isinstance(v, datetime) else v
        for k, v in asdict(f).items()
    }


def _table(rows: list[FollowUp], tz: tzinfo, tz_name: str, order: str) -> Table:
    table = Table(title=f"{len(rows)} follow-up(s), {order}")
    for col in ("id", "lead", "name", "kind", "step", "status", f"due at ({tz_name})", "attempts", "last error"):
        table.add_column(col, justify="right" if col in ("id", "step", "attempts") else "left")
    for f in rows:
        # Database text goes in as Text: a name like "[red]" is shown, not read as markup.
        table.add_row(
            str(f.id),
            Text(f.phone),
            Text(f.name or ""),
            Text(f.kind),
            str(f.step),
            Text(f.status, style=COLOUR.get(f.status, "")),
            _local(f.due_at, tz),
            str(f.attempts),
            Text(f.last_error or "", style="red" if f.status == "failed" else ""),
        )
    return table


@app.command("list")
@friendly_errors
def list_cmd(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help=f"only this status: {', '.join(admin.STATUSES)}")] = None,
    lead: LeadOpt = None,
    limit: Annotated[int, typer.Option(help="show at most this many", min=1, max=100_000)] = 50,
    as_json: Annotated[
        bool, typer.Option("--json", help="print JSON (times with the business time zone's offset)")
    ] = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Follow-ups with their lead, kind, step, status and due time in the business time
    zone ([followups] timezone). With --status pending: soonest due first (what goes out
    next); otherwise newest due first (what just happened)."""
    if status is not None:
        admin.check_status(status)  # bad input exits 2 before any database is started
    phone = admin.normalise_phone(lead) if lead is not None else None
    cfg = load(ctx, config, profile)
    tz = ZoneInfo(cfg.followups.timezone)
    rows = with_connection(cfg, lambda c: admin.list_follow_ups(c, status=status, phone=phone, limit=limit))
    if as_json:
        print(json.dumps([_as_dict(f, tz) for f in rows], indent=2))
        return
    if not rows:
        what = " ".join(filter(None, (status, "follow-ups", f"of {phone}" if phone else None)))
        out.print(f"no {what}")
        return
    out.print(
        _table(rows, tz, cfg.followups.timezone, "soonest due first" if status == "pending" else "newest due first")
    )
    if len(rows) == limit:
        err.print(f"showing the first {limit}; --limit shows more")


@app.command()
@friendly_errors
def cancel(
    ctx: typer.Context,
    follow_up_id: Annotated[int | None, typer.Argument(metavar="ID", help="the follow-up's id (see `list`)")] = None,
    lead: LeadOpt = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Cancel one pending follow-up by ID, or every pending one of a lead (--lead). One being
    sent right now (executing) is never cancelled: the command says so and exits 1."""
    if (follow_up_id is None) == (lead is None):
        raise ConfigError("give a follow-up ID or --lead PHONE (one of them)")
    phone = admin.normalise_phone(lead) if lead is not None else None
    cfg = load(ctx, config, profile)
    tz = ZoneInfo(cfg.followups.timezone)
    if phone is not None:
        result = with_connection(cfg, lambda c: admin.cancel_lead(c, phone))
    else:
        assert follow_up_id is not None
        result = with_connection(cfg, lambda c: admin.cancel_one(c, follow_up_id))
    for f in result.cancelled:
        out.print(Text(f"cancelled {_describe(f, tz)}"))
    for f in result.settled:
        out.print(Text(f"nothing to cancel: follow-up {f.id} is already {f.status}"))
    if phone is not None and not result.cancelled and not result.busy:
        out.print(Text(f"nothing to cancel: {phone} has no pending follow-up"))
    for f in result.busy:
        fail(
            f"{_describe(f, tz)} is being sent right now and cannot be cancelled; "
            f"run `sdrctl followups list --lead {f.phone}` in a minute to see how it ended"
        )
    if result.busy:
        raise typer.Exit(1)
