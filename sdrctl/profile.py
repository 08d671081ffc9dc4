"""`sdrctl profile`: the call tree of a profiled bench run and where the response time goes;
or, with --url, the stage breakdown of a running daemon from its /metrics."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from daemon.errors import ConfigError
from daemon.tools.profiling import (
    Breakdown,
    call_tree,
    html_report,
    json_tree,
    metrics_breakdown,
    profile_config,
    run_profile,
)
from daemon.tools.workload import Tally, Workload
from sdrctl.common import ConfigOpt, ProfileOpt, err, friendly_errors, load, out, setup_logging
from sdrctl.workload import DurationOpt, LatencyOpt, LeadsOpt, RampOpt, ScaleOpt, SeedOpt, given


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def stage_table(b: Breakdown) -> Table:
    table = Table(title=f"response time by stage ({b.turns} turns)")
    for col in ("stage", "p50 (ms)", "p95 (ms)", "mean (ms)", "share"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in b.rows:
        # Off the path (knowledge runs beside context and agent): shown, not counted.
        share = f"{r.share:.1%}" if r.on_path else f"({r.share:.1%})"
        table.add_row(Text(r.name), _ms(r.p50_ms), _ms(r.p95_ms), _ms(r.mean_ms), share)
    table.add_row(
        "response", _ms(b.response_p50_ms), _ms(b.response_p95_ms), _ms(b.response_mean_ms), "100%", style="bold"
    )
    if any(not r.on_path for r in b.rows):
        table.caption = "(share): runs alongside, not added"
    return table


def _beside(tree: Text, table: Table) -> None:
    """The tree and the table side by side when the terminal is wide enough, else stacked."""
    width = max((len(line) for line in tree.plain.splitlines()), default=0)
    if out.width >= width + 4 + out.measure(table).maximum:
        grid = Table.grid(padding=(0, 4))
        grid.add_column(no_wrap=True, width=width)
        grid.add_column()
        grid.add_row(tree, table)
        out.print(grid)
    else:
        out.print(tree, soft_wrap=True)
        out.print(table)


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str))
    err.print(f"wrote {path}")


@friendly_errors
def profile(
    ctx: typer.Context,
    leads: LeadsOpt = None,
    duration: DurationOpt = None,
    ramp: RampOpt = None,
    seed: SeedOpt = None,
    agent_latency: LatencyOpt = None,
    time_scale: ScaleOpt = None,
    url: Annotated[str | None, typer.Option(help="a running daemon: read its /metrics, add no load")] = None,
    html_file: Annotated[Path | None, typer.Option("--html", help="write pyinstrument's HTML here")] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="write the figures as JSON here")] = None,
    config: ConfigOpt = None,
    profile_name: ProfileOpt = None,
) -> None:
    """Finds the bottleneck: a bench workload against a daemon in this process under
    pyinstrument (call tree of the pipeline's frames, per-stage breakdown); with --url, the
    breakdown of a running daemon from its /metrics."""
    overrides = given(
        leads=leads,
        duration=duration,
        ramp=ramp,
        seed=seed,
        agent_latency=agent_latency,
        time_scale=time_scale,
    )
    if url is not None:
        flags = [f"--{k.replace('_', '-')}" for k in overrides]
        if html_file is not None:
            flags.append("--html")
        if flags:
            raise ConfigError(f"{', '.join(flags)}: only for a profiled run; --url reads /metrics and adds no load")
        cfg = load(ctx, config, profile_name)  # tells whether knowledge runs beside the agent
        b = asyncio.run(metrics_breakdown(url, parallel_knowledge=cfg.profile.features.parallel_context))
        out.print(stage_table(b))
        out.print(b.bottleneck(), soft_wrap=True, markup=False)
        if json_file is not None:
            _write_json(json_file, {"mode": "metrics", "url": url, "breakdown": b.as_dict()})
        return

    workload = Workload(**overrides).validated()
    root = ctx.find_root().params
    run_config = profile_config(config or root.get("config"), profile_name or root.get("profile"), workload)
    setup_logging("warning")
    err.print(
        f"profile: {workload.leads} leads, {workload.duration:g}s, agent {workload.agent_latency}, "
        f"profile {run_config.profile.name}"
        + (f", time-scale {workload.time_scale:g}" if workload.time_scale != 1 else ""),
        soft_wrap=True,
    )
    with err.status("profiling…") as status:

        def progress(tallies: dict[str, Tally], elapsed: float) -> None:
            answered = sum(len(t.responses) for t in tallies.values())
            status.update(f"profiling… {elapsed:,.0f}s, {answered} bursts answered")

        run = run_profile(run_config, workload, progress=progress)
    unicode = (out.encoding or "").lower().startswith("utf")
    header, _, body = call_tree(run.session, unicode=unicode).partition("\n")
    out.print(header, soft_wrap=True, markup=False)
    _beside(Text(body, no_wrap=True), stage_table(run.breakdown))
    s = run.result.summary()
    out.print(
        f"{len(run.result.tally.responses)} of {s['bursts']} bursts answered, {s['turns']} turns, "
        f"timeout rate {s['timeout_rate']:.1%}, missing replies {s['missing_replies']}",
        soft_wrap=True,
    )
    if workload.time_scale != 1:
        out.print(f"[yellow]time-scale {workload.time_scale:g}: waits and latencies are scaled; overhead is not[/]")
    out.print(run.breakdown.bottleneck(), soft_wrap=True, markup=False)
    if html_file is not None:
        html_file.write_text(html_report(run.session))
        err.print(f"wrote {html_file}")
    if json_file is not None:
        _write_json(
            json_file,
            {
                "mode": "run",
                "workload": workload.__dict__,
                "breakdown": run.breakdown.as_dict(),
                "bench": s,
                "call_tree": json.loads(json_tree(run.session)),
            },
        )
