"""`sdrctl bench`: load test the real pipeline with simulated leads; profile A vs B."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from daemon.bench import ProfileResult, Tally, Workload, compare, load_scenario, percentile, run_bench
from sdrctl.common import ConfigOpt, ProfileOpt, err, friendly_errors, load, out


def _ms(value: float | None, scale: float = 1000) -> str:
    return "-" if value is None else f"{value * scale:,.0f}"


def results_table(results: list[ProfileResult]) -> Table:
    table = Table(title="bench results", show_lines=False)
    table.add_column("figure")
    for r in results:
        table.add_column(r.profile, justify="right")
    rows: list[tuple[str, list[str]]] = []
    s = [r.summary() for r in results]

    def add(label: str, values: list[str]) -> None:
        rows.append((label, values))

    for p in ("p50", "p95", "p99", "max"):
        add(f"response {p} (ms)", [_ms(x["response_s"][p]) for x in s])
    add("pipeline overhead p50 (ms)", [_ms(x["overhead_ms"]["p50"], 1) for x in s])
    add("pipeline overhead p95 (ms)", [_ms(x["overhead_ms"]["p95"], 1) for x in s])
    add("buffer wait p95 (ms)", [_ms(x["buffer_wait_ms"]["p95"], 1) for x in s])
    stages = sorted({st for x in s for st in x["stages_ms"]})
    for st in stages:
        add(f"stage {st} p50/p95 (ms)", [
            f"{x['stages_ms'][st]['p50']:.1f} / {x['stages_ms'][st]['p95']:.1f}" if st in x["stages_ms"] else "-"
            for x in s
        ])  # fmt: skip
    add("bursts answered / sent", [f"{len(r.tally.responses)} / {r.tally.bursts}" for r in results])
    add("turns", [str(x["turns"]) for x in s])
    add("timeout rate", [f"{x['timeout_rate']:.2%}" for x in s])
    add("cache hit rate", ["-" if x["cache_hit_rate"] is None else f"{x['cache_hit_rate']:.1%}" for x in s])
    add("missing replies", [str(x["missing_replies"]) for x in s])
    add("webhook errors", [str(x["webhook_errors"]) for x in s])
    add("throughput (msgs/s)", [f"{x['throughput_msgs_per_s']:.1f}" for x in s])
    for label, values in rows:
        table.add_row(label, *values)
    return table


def progress_table(tallies: dict[str, Tally], elapsed: float) -> Table:
    table = Table(title=f"running… {elapsed:,.0f}s")
    for col in ("profile", "messages", "bursts", "answered", "missing", "errors", "p95 so far (ms)"):
        table.add_column(col, justify="right")
    for name, t in tallies.items():
        table.add_row(
            name, str(t.messages), str(t.bursts), str(len(t.responses)), str(t.missing), str(t.errors),
            _ms(percentile(t.responses, 95)),
        )  # fmt: skip
    return table


@friendly_errors
def bench(
    ctx: typer.Context,
    leads: Annotated[int | None, typer.Option(help="concurrent simulated leads")] = None,
    duration: Annotated[float | None, typer.Option(help="seconds of load (before --time-scale)")] = None,
    ramp: Annotated[float | None, typer.Option(help="seconds over which leads start")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed: same seed, same workload")] = None,
    agent_latency: Annotated[str | None, typer.Option(help="e.g. lognormal:median=1.5,p95=4")] = None,
    time_scale: Annotated[float | None, typer.Option(help="scale every window, timeout and latency (0.01-1)")] = None,
    scenario: Annotated[Path | None, typer.Option(help="TOML scenario with the workload's keys")] = None,
    vs: Annotated[str | None, typer.Option("--vs", help="a second profile, run at the same time (B in B/A)")] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="write the figures as JSON here")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Simulated leads against real daemons (embedded Postgres and Redis, simulated agent,
    fake Evolution API over HTTP); prints percentiles and, with --vs, the ratios B/A."""
    cfg = load(ctx, config, profile)
    overrides: dict[str, Any] = {
        "leads": leads, "duration": duration, "ramp": ramp, "seed": seed,
        "agent_latency": agent_latency, "time_scale": time_scale,
    }  # fmt: skip
    if scenario is not None:
        workload = load_scenario(scenario, **overrides)
    else:
        workload = Workload(**{k: v for k, v in overrides.items() if v is not None}).validated()
    profiles = [cfg.profile.source] + ([vs] if vs else [])
    config_path = str(config or ctx.find_root().params.get("config") or "") or None
    err.print(
        f"bench: {workload.leads} leads x {len(profiles)} profile(s), {workload.duration:g}s, "
        f"agent {workload.agent_latency}"
        + (f", time-scale {workload.time_scale:g} (every window, timeout and latency scaled)"
           if workload.time_scale != 1 else "")
    )  # fmt: skip
    with Live(progress_table({}, 0), console=err, refresh_per_second=2, transient=True) as live:
        results = asyncio.run(
            run_bench(profiles, workload, config_path=config_path,
                      progress=lambda t, e: live.update(progress_table(t, e)))
        )  # fmt: skip
    out.print(results_table(results))
    report: dict[str, Any] = {
        "workload": workload.__dict__, "profiles": [r.summary() for r in results],
        "scaled": workload.time_scale != 1,
    }  # fmt: skip
    if len(results) == 2:
        ratios = compare(results[0], results[1])
        report["ratios_b_over_a"] = ratios
        out.print(
            f"B/A ({results[1].profile} / {results[0].profile}): "
            + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}x'}" for k, v in ratios.items())
        )
    if workload.time_scale != 1:
        out.print(f"[yellow]time-scale {workload.time_scale:g}: response times are scaled; overhead is not[/]")
    if json_file is not None:
        json_file.write_text(json.dumps(report, indent=2, default=str))
        err.print(f"wrote {json_file}")
