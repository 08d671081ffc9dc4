"""`sdrctl tune`: show, set, diff, new and recommend the knobs of a profile."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import typer
from rich.table import Table
from rich.text import Text

from daemon.durations import duration_option
from daemon.errors import ConfigError, SdrError
from daemon.tools import tuning
from sdrctl.common import ConfigOpt, ProfileOpt, friendly_errors, load, out
from sdrctl.migrate import with_connection

app = typer.Typer(help="Show, edit, compare and recommend the knobs of a tuning profile.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _which(ctx: typer.Context, config: Path | None, name: str | None) -> str:
    """The profile named here or before the command, else the one sdr.toml uses."""
    name = name or ctx.find_root().params.get("profile")
    return name or load(ctx, config, None).profile.source


def fmt(value: Any) -> str:
    """As TOML spells it, so what is shown can be typed back into `tune set`."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _print_changes(path: object, changes: list[tuning.Change]) -> None:
    if not changes:
        out.print(Text(f"no change: {path} already has these values"))
        return
    for c in changes:
        out.print(Text(f"{c.key}: {fmt(c.old)} -> {fmt(c.new)}"))
    out.print(Text(f"wrote {path}"))


@app.command()
@friendly_errors
def show(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Argument(metavar="[PROFILE]", help="a name in profiles/ or a .toml path (default: the one in use)"),
    ] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every knob with its value, unit, allowed range and meaning, by section."""
    p = tuning.read(_which(ctx, config, name or profile))
    knobs = tuning.knobs(p)
    overridden = tuning.env_overrides(dict(os.environ))
    if as_json:
        rows = [{**vars(k), "env_override": overridden.get(k.key)} for k in knobs]
        print(json.dumps({"profile": p.name, "source": p.source, "knobs": rows}, indent=2))
        return
    out.print(Text(f"profile {p.name} ({p.source})"))
    for section in dict.fromkeys(k.key.split(".")[0] for k in knobs):
        table = Table("key", "value", "unit", "allowed", "meaning", title=Text(f"[{section}]"))
        for k in knobs:
            if k.key.startswith(section + "."):
                name = k.key.split(".", 1)[1]
                table.add_row(Text(name), Text(fmt(k.value)), k.unit, Text(k.allowed), Text(k.help))
        out.print(table)
    for key, var in overridden.items():
        out.print(Text(f"note: {var} overrides {key} in this environment (the file's value is shown)"))


@app.command("set")
@friendly_errors
def set_(
    ctx: typer.Context,
    assignments: Annotated[
        list[str], typer.Argument(metavar="KEY=VALUE...", help="section.key=value, e.g. buffer.quiet_window=0.8")
    ],
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Change knobs in a profile file, validated as a whole before it is written."""
    updates = tuning.parse_assignments(assignments)
    path, changes = tuning.set_values(_which(ctx, config, profile), updates)
    _print_changes(path, changes)


@app.command()
@friendly_errors
def diff(
    a: Annotated[str, typer.Argument(help="a profile name or .toml path")],
    b: Annotated[str, typer.Argument(help="another one")],
    show_all: Annotated[bool, typer.Option("--all", help="every key, the differing ones highlighted")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The keys whose values differ between two profiles, side by side."""
    pairs = tuning.diff(tuning.read(a), tuning.read(b))
    pairs = [(x, y) for x, y in pairs if show_all or x.value != y.value]
    if as_json:
        rows = [
            {"key": x.key, "a": x.value, "b": y.value, "unit": x.unit, "changed": x.value != y.value} for x, y in pairs
        ]
        print(json.dumps({"a": a, "b": b, "keys": rows}, indent=2))
        return
    if not pairs:
        out.print(Text(f"no differences between {a} and {b}"))
        return
    table = Table("key")
    for header in (a, b):  # Text: a path's brackets are not markup
        table.add_column(Text(header))
    table.add_column("unit")
    for x, y in pairs:
        style = "bold yellow" if show_all and x.value != y.value else None
        table.add_row(Text(x.key), Text(fmt(x.value)), Text(fmt(y.value)), x.unit, style=style)
    out.print(table)


@app.command()
@friendly_errors
def new(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the new profile's name: lowercase letters, digits, - and _")],
    source: Annotated[str | None, typer.Option("--from", help="the profile to copy (default: the one in use)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Create profiles/NAME.toml in this folder as a copy of another profile."""
    path = tuning.new_profile(name, _which(ctx, config, source))
    out.print(Text(f"wrote {path}; use it with --profile {name}"))


@app.command()
@friendly_errors
def recommend(
    ctx: typer.Context,
    since: Annotated[
        str, typer.Option(help="turns started (messages received) within this: 30m, 1.5h, 24h, 7d, 2w")
    ] = "24h",
    headroom: Annotated[float, typer.Option(help="timeout = P99 x this (at least 2)")] = 3.0,
    min_samples: Annotated[int, typer.Option(help="fewer samples (or in-burst gaps) than this: no proposal")] = 200,
    burst_coverage: Annotated[
        float, typer.Option(help="settle_window waits out this share of the pauses inside bursts: 0.5 to 0.999")
    ] = 0.98,
    write: Annotated[bool, typer.Option("--write", help="apply the proposals to the profile")] = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stage timeouts from the latencies recorded in the turns table; the buffer's
    settle_window and quiet_window from the pauses leads make inside their bursts."""
    window = timedelta(seconds=duration_option("--since", since))
    tuning.check_options(headroom, min_samples, burst_coverage)
    name = _which(ctx, config, profile)
    if write:
        tuning.writable_path(name)  # refuse before querying, not after
    current = tuning.read(name)
    cfg = load(ctx, config, name)

    async def measure(conn: asyncpg.Connection) -> tuple[dict[str, tuning.StageStats], tuning.GapStats]:
        stages = await tuning.stage_latencies(conn, window)
        gaps = await tuning.burst_gaps(conn, window, burst_coverage, tuning.gap_thresholds(current))
        return stages, gaps

    stats, gaps = with_connection(cfg, measure)
    proposals = tuning.propose(current, stats, headroom, min_samples)
    agent = stats.get("agent")
    buffer = tuning.propose_buffer(current, gaps, burst_coverage, min_samples, agent.p50_ms if agent else None)
    updates = {p.key: p.proposed for p in proposals if p.proposed is not None}
    updates |= {c.key: c.proposed for c in buffer.changes if c.proposed is not None}
    result: dict[str, Any] = {
        "profile": current.source,
        "since": since,
        "headroom": headroom,
        "stages": [
            {**vars(p.stats), "key": p.key, "current": p.current, "proposed": p.proposed, "note": p.note}
            for p in proposals
        ],
        "buffer": _buffer_json(buffer),
    }
    if not as_json:
        out.print(_proposal_table(proposals, since, headroom))
        _print_buffer(buffer, since)
    try:
        if not updates:
            raise SdrError(f"no stage has {min_samples} samples in the last {since}; nothing to recommend")
        if write:  # the same validated write as `tune set`
            path, changes = tuning.set_values(name, updates)
            result["written"] = [vars(c) for c in changes]
            if not as_json:
                _print_changes(path, changes)
            return
        try:  # say now if --write would be refused, e.g. for a relation the proposals break
            tuning.set_values(name, updates, commit=False)
        except ConfigError as exc:
            result["write_refused"] = str(exc)
            if not as_json:
                out.print(Text(f"note: --write would be refused: {exc}"))
    finally:
        if as_json:
            print(json.dumps(result, indent=2))


def _proposal_table(proposals: list[tuning.Proposal], since: str, headroom: float) -> Table:
    table = Table(
        "stage",
        "timeout",
        "samples",
        "timed out",
        "P50 ms",
        "P95 ms",
        "P99 ms",
        "current s",
        "proposed s",
        "note",
        title=f"turns of the last {since}, timeout = P99 x {headroom:g}",
    )
    for column in table.columns[2:9]:
        column.justify = "right"
    for p in proposals:
        s = p.stats
        pct = [f"{v:.1f}" if v is not None else "-" for v in (s.p50_ms, s.p95_ms, s.p99_ms)]
        proposed = fmt(p.proposed) if p.proposed is not None else "-"
        row = [p.stage, p.key, str(s.samples), str(s.timed_out), *pct, fmt(p.current), proposed]
        table.add_row(*row, Text(p.note))
    return table


def _seconds(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _buffer_json(b: tuning.BufferProposal) -> dict[str, Any]:
    g = b.gaps
    quantiles = {f"p{round(q * 100)}_s": g.quantiles.get(q) for q in tuning.GAP_QUANTILES}
    return {
        "max_gap_s": tuning.MAX_GAP.total_seconds(),
        "burst_coverage": b.coverage,
        "gaps": {"samples": g.samples, **quantiles, "covering_s": g.covering_s},
        "proposals": [vars(c) for c in b.changes],
        "curve": [{**vars(p), "marks": list(p.marks)} for p in b.curve],
        "notes": b.notes,
    }


def _print_buffer(b: tuning.BufferProposal, since: str) -> None:
    g = b.gaps
    max_gap = f"{tuning.MAX_GAP.total_seconds():g}"
    gaps = Table(
        "in-burst gaps",
        *(f"P{round(q * 100)} s" for q in tuning.GAP_QUANTILES),
        title=(
            f"pauses inside bursts, last {since}: between a lead's consecutive messages with no message "
            f"of ours between them, at most {max_gap} s"
        ),
    )
    for column in gaps.columns:
        column.justify = "right"
    gaps.add_row(str(g.samples), *(_seconds(g.quantiles.get(q)) for q in tuning.GAP_QUANTILES))
    out.print(gaps)
    out.print(
        Text(
            "(a pause our reply interrupted has that reply between its messages, so it is left out: "
            "when `sdrctl report` shows many interrupted replies, real pauses run longer than these)"
        )
    )
    if g.samples:
        curve = Table(
            "settle_window s",
            "gaps longer (bursts split, est.)",
            "share",
            "added wait ≤ s",
            "at agent P50 s",
            "",
            title="settle_window trade-off: a reply goes only after "
            "this much silence; a longer pause lets it interrupt the burst",
        )
        for column in curve.columns[:5]:
            column.justify = "right"
        for p in b.curve:
            share = f"{p.share_over:.2%}".replace("%", " %") if p.share_over is not None else "-"
            curve.add_row(
                fmt(p.settle_window_s),
                str(p.gaps_over),
                share,
                _seconds(p.added_wait_max_s),
                _seconds(p.added_wait_p50_s),
                ", ".join(p.marks),
            )
        out.print(curve)
    changes = Table(
        "knob",
        "current s",
        "proposed s",
        "note",
        title=f"buffer windows, from the in-burst gaps (--burst-coverage {b.coverage:g})",
    )
    for column in changes.columns[1:3]:
        column.justify = "right"
    for c in b.changes:
        proposed = fmt(c.proposed) if c.proposed is not None else "-"
        changes.add_row(c.key, fmt(c.current), proposed, Text(c.note))
    out.print(changes)
    for c in b.changes:
        out.print(Text(f"rule: {c.key.split('.')[1]} = {c.rule}"))
    for note in b.notes:
        out.print(Text(f"note: {note}"))
