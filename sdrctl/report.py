"""`sdrctl report`: the KPIs of the stored turns against the SLOs in sdr.toml."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from daemon.errors import ConfigError
from daemon.tools.report import (
    INTERRUPT_WINDOW,
    REPLY_WITHIN,
    FollowUpStats,
    Report,
    build_report,
    format_target,
    format_value,
    interrupt_window,
    resolve_window,
)
from daemon.tools.report_html import render
from sdrctl.common import ConfigOpt, ProfileOpt, err, friendly_errors, load, out
from sdrctl.migrate import with_connection

STATUS = {True: Text("met", style="bold green"), False: Text("missed", style="bold red"), None: Text("")}


def kpi_table(r: Report) -> Table:
    table = Table(title=f"KPIs from {r.window.describe().replace(' and ', ' to ')}")
    for col in ("KPI", "value", "target", "status"):
        table.add_column(col, justify="left" if col in ("KPI", "status") else "right")
    for k in r.kpis:
        colour = {True: "green", False: "red", None: ""}[k.met]
        table.add_row(k.label, Text(k.text(), style=colour), format_target(k) or "-", STATUS[k.met])
    return table


def stage_table(r: Report) -> Table:
    table = Table(title="latency by stage")
    for col in ("stage", "turns", "P50", "P95", "P99", "timeouts", "failures"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in r.stages:
        table.add_row(
            Text(s.stage),
            f"{s.turns:,}",
            format_value(s.p50_ms, "ms"),
            format_value(s.p95_ms, "ms"),
            format_value(s.p99_ms, "ms"),
            Text(f"{s.timeouts:,}", style="red" if s.timeouts else ""),
            Text(f"{s.failures:,}", style="red" if s.failures else ""),
        )
    return table


def slowest_table(r: Report) -> Table:
    table = Table(title=f"{len(r.slowest)} slowest turns")
    for col in ("turn", "lead", "response", "outcome", "stages (ms)"):
        table.add_column(col, justify="right" if col in ("turn", "response") else "left")
    for t in r.slowest:
        stages = ", ".join(f"{k} {v:,.0f}" + (" (timed out)" if k in t.timeouts else "") for k, v in t.stages.items())
        table.add_row(
            str(t.turn_id),
            Text(t.phone + (f" {t.name}" if t.name else "")),
            format_value(t.response_ms, "ms"),
            Text(t.outcome),
            Text(stages),
        )
    return table


def burst_table(r: Report) -> Table:
    """Bursts answered too soon (the lead was still typing) and replies thrown away."""
    b = r.bursts
    seconds = f"{b.interrupt_window.total_seconds():g}"
    table = Table(title="bursts: replies while the lead was still typing")
    for col in ("figure", "value", "how it is counted"):
        table.add_column(col, justify="right" if col == "value" else "left")
    rate = format_value(b.interrupted_rate, "percent")
    table.add_row(
        "interrupted replies (estimate)",
        f"{b.interrupted:,} of {b.replies:,} ({rate})",
        f"the lead wrote within {seconds} s after the reply was delivered, a message the reply did not answer",
    )
    table.add_row(
        "discarded replies",
        f"{b.discarded:,}",
        "replies written and thrown away: a newer message of the lead overtook them",
    )
    table.add_row(
        "agent calls per turn",
        format_value(b.agent_calls_per_turn, "ratio"),
        f"(turns {b.turns:,} + discarded {b.discarded:,}) / turns {b.turns:,}",
    )
    return table


def followup_table(r: Report) -> Table:
    hours = int(REPLY_WITHIN.total_seconds() // 3600)
    table = Table(title="follow-ups (sent, failed, cancelled in the window; pending now)")
    for col in ("kind", "sent", "failed", "cancelled", "pending now", f"replied ≤ {hours} h", "reply rate"):
        table.add_column(col, justify="left" if col == "kind" else "right")

    def row(s: FollowUpStats, style: str = "") -> None:
        table.add_row(
            Text(s.kind),
            f"{s.sent:,}",
            Text(f"{s.failed:,}", style="red" if s.failed else ""),
            f"{s.cancelled:,}",
            f"{s.pending:,}",
            f"{s.replied:,}",
            format_value(s.reply_rate, "percent"),
            style=style,
        )

    for s in r.followups:
        row(s)
    table.add_section()
    row(r.followups_total, "bold")
    return table


def print_report(r: Report) -> None:
    out.print(kpi_table(r))
    out.print(
        f"response time: P50 {format_value(r.response_p50_ms, 'ms')}, "
        f"P95 {r.kpi('response_p95_ms').text()}, P99 {format_value(r.response_p99_ms, 'ms')} "
        f"({r.responded:,} replies sent)"
    )
    out.print(stage_table(r))
    outcomes = ", ".join(
        f"{escape(name)} {n:,} ({format_value(n / r.turns, 'percent')})" for name, n in r.outcomes.items()
    )
    out.print(f"outcomes: {outcomes}")
    out.print(burst_table(r))
    out.print(handover_line(r))
    if r.agent.calls:
        out.print(agent_line(r))
    out.print(slowest_table(r))


def agent_line(r: Report) -> str:
    a, d = r.agent, r.agent.to_dict()
    per_turn = d["tokens_per_turn"]
    line = (
        f"agent model: {a.calls:,} call(s), {a.prompt_tokens:,} prompt + {a.completion_tokens:,} completion tokens"
        + (f" ({per_turn:,.0f} per turn)" if per_turn is not None else "")
    )
    if a.cost is None:
        return line + "; cost not computed (set [agent] price_in and price_out)"
    per_lead = d["cost_per_qualified_lead"]
    return (
        line
        + f"; cost {a.cost:,.4f} ({d['cost_per_turn']:,.5f} per turn"
        + (f", {per_lead:,.4f} per qualified lead)" if per_lead is not None else ", no lead booked a meeting)")
    )


def handover_line(r: Report) -> str:
    h = r.handover
    return (
        f"people beside the bot: {h.get('takeover', 0):,} takeover(s) by a person, {h.get('handoff', 0):,} "
        f"hand-off(s) asked by leads, {h.get('opt_out', 0):,} opt-out(s) ({h.get('opt_in', 0):,} back), "
        f"{h.get('suppressed', 0):,} repl(ies) not sent while a lead was paused or ignored"
    )


@friendly_errors
def report(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option(help="turns finished within this, up to now: 30m, 1.5h, 24h, 7d, 2w [default: 24h]")
    ] = None,
    start: Annotated[
        str | None, typer.Option("--from", help="window start, ISO 8601 (local time when no offset)")
    ] = None,
    end: Annotated[str | None, typer.Option("--to", help="window end, ISO 8601 [default: now]")] = None,
    slowest: Annotated[int, typer.Option(help="how many of the slowest turns to list", min=0, max=1000)] = 10,
    interrupt_seconds: Annotated[
        str,
        typer.Option(
            "--interrupt-window",
            metavar="SECONDS",
            help="a lead's message this soon after a reply was delivered, not answered by it, means the "
            "reply interrupted the lead's burst: 0.1 to 60",
        ),
    ] = f"{INTERRUPT_WINDOW.total_seconds():g}",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (times in ms, rates as 0..1)")] = False,
    html_file: Annotated[
        Path | None, typer.Option("--html", help="also write a self-contained HTML page with charts")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="exit 1 when an SLO is missed (a window without turns is not a miss)")
    ] = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """KPIs of the turns in a window against the SLOs in sdr.toml: P95 response time, timeout
    rate, cache hit rate, peak concurrent leads; latency per stage, outcomes, interrupted
    bursts and agent calls per turn, slowest turns; follow-ups per kind (sent, failed,
    cancelled, pending, replies within 24 h)."""
    window = resolve_window(since, start, end)
    within = interrupt_window(interrupt_seconds)
    cfg = load(ctx, config, profile)
    r = with_connection(cfg, lambda conn: build_report(conn, window, cfg.slo, slowest, within))
    if html_file is not None:
        try:
            html_file.write_text(render(r), encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--html {html_file}: cannot write: {exc.strerror}") from None
        err.print(f"wrote {escape(str(html_file))}")
    # With --json, stdout is the JSON alone; the verdict goes to stderr.
    talk: Console = err if as_json else out
    if as_json:
        print(json.dumps(r.to_dict(), indent=2))
    if r.empty:
        talk.print(
            f"nothing to report between {r.window.describe()}: no turns finished in this window"
            + (" (no SLO checked)" if check else "")
        )
    elif not as_json:
        print_report(r)
    # Follow-ups go out on their own schedule: shown even in a window without turns.
    if not as_json and r.followups_total.active:
        out.print(followup_table(r))
    if not as_json and r.empty and any(r.handover.values()):  # a takeover needs no turn
        out.print(handover_line(r))
    if r.empty or not check:
        return
    for k in r.missed:
        talk.print(f"[red]SLO missed:[/] {k.label} {k.text()}, target {format_target(k)}")
    if r.missed:
        raise typer.Exit(1)
    talk.print("[green]every SLO met[/]")
