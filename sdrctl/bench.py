"""`sdrctl bench`: load test the real pipeline with simulated leads; profile A vs B."""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from daemon.config import Config
from daemon.errors import ConfigError
from daemon.tasks import run_fast
from daemon.tools.bench import CapacityStep, ProfileResult, capacity, compare, find_capacity, run_bench, run_intake
from daemon.tools.bench_agent import LLM_TOKENS_PER_S, LLM_TTFT, LlmPace, agent_report, agent_rows, run_agent_bench
from daemon.tools.bench_followups import run_followups
from daemon.tools.bursts import percentile
from daemon.tools.soak import Sample, SoakResult, run_soak, soak_seconds
from daemon.tools.workload import Tally, Workload, load_scenario
from sdrctl.common import ConfigOpt, ProfileOpt, err, friendly_errors, load, out
from sdrctl.workload import (
    DurationOpt,
    LatencyOpt,
    LeadsOpt,
    PresenceOpt,
    RampOpt,
    ScaleOpt,
    ScenarioOpt,
    SeedOpt,
    TypingOpt,
    given,
)


def _ms(value: float | None, scale: float = 1000) -> str:
    return "-" if value is None else f"{value * scale:,.0f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


class AgentKind(enum.StrEnum):
    simulated = "simulated"
    fake_llm = "fake-llm"


def results_table(results: list[ProfileResult], title: str = "bench results") -> Table:
    table = Table(title=title, show_lines=False)
    table.add_column("figure")
    for r in results:
        table.add_column(r.profile, justify="right")
    rows: list[tuple[str, list[str]]] = []
    s = [r.summary() for r in results]

    def add(label: str, values: list[str]) -> None:
        rows.append((label, values))

    def outcome(x: dict[str, Any], kind: str) -> int:
        return int(x.get("bursts_by_outcome", {}).get(kind, 0))

    # The burst response: last message -> the reply whose turn holds it (not any reply).
    for p in ("p50", "p95", "p99", "max"):
        add(f"response {p} (ms)", [_ms(x["response_s"][p]) for x in s])
    add("lead wait p50 / p95 (ms)", [f"{_ms(x['lead_wait_s']['p50'])} / {_ms(x['lead_wait_s']['p95'])}" for x in s])
    add(
        "bursts whole / split / lost / unanswered",
        [" / ".join(str(outcome(x, k)) for k in ("whole", "split", "lost", "unanswered")) for x in s],
    )
    if any(outcome(x, "refused") for x in s):
        add("bursts refused (no post accepted)", [str(outcome(x, "refused")) for x in s])
    add(
        "split rate (2+ msgs / all)",
        [f"{_share(x.get('split_rate_multi'))} / {_share(x.get('split_rate'))}" for x in s],
    )
    add("replies per burst", [_num(x.get("replies_per_burst")) for x in s])
    add("agent calls per turn", [_num(x.get("agent_calls_per_turn")) for x in s])
    add("daemon CPU per turn (ms)", [_ms(x.get("cpu_s_per_turn")) for x in s])
    add("pipeline overhead p50 (ms)", [_ms(x["overhead_ms"]["p50"], 1) for x in s])
    add("pipeline overhead p95 (ms)", [_ms(x["overhead_ms"]["p95"], 1) for x in s])
    add("buffer wait p95 (ms)", [_ms(x["buffer_wait_ms"]["p95"], 1) for x in s])
    stages = sorted({st for x in s for st in x["stages_ms"]})
    for st in stages:
        add(
            f"stage {st} p50/p95 (ms)",
            [
                f"{x['stages_ms'][st]['p50']:.1f} / {x['stages_ms'][st]['p95']:.1f}" if st in x["stages_ms"] else "-"
                for x in s
            ],
        )
    add("bursts / messages sent", [f"{x['bursts']} / {x['messages']}" for x in s])
    add("turns", [str(x["turns"]) for x in s])
    add("timeout rate", [f"{x['timeout_rate']:.2%}" for x in s])
    add("cache hit rate", ["-" if x["cache_hit_rate"] is None else f"{x['cache_hit_rate']:.1%}" for x in s])
    add("no reply within patience", [str(x["missing_replies"]) for x in s])
    add("webhook errors", [str(x["webhook_errors"]) for x in s])
    if any(x["presence_posts"] for x in s):
        add("presence posts / errors", [f"{x['presence_posts']} / {x['presence_errors']}" for x in s])
    add("throughput (msgs/s)", [f"{x['throughput_msgs_per_s']:.1f}" for x in s])
    for label, values in rows:
        table.add_row(label, *values)
    return table


def progress_table(tallies: dict[str, Tally], elapsed: float) -> Table:
    table = Table(title=f"running… {elapsed:,.0f}s")
    for col in ("profile", "messages", "bursts", "answered", "missing", "errors", "lead wait p95 (ms)"):
        table.add_column(col, justify="right")
    for name, t in tallies.items():
        table.add_row(
            name,
            str(t.messages),
            str(t.bursts),
            str(len(t.responses)),
            str(t.missing),
            str(t.errors),
            _ms(percentile(t.responses, 95)),
        )
    return table


@friendly_errors
def bench(
    ctx: typer.Context,
    leads: LeadsOpt = None,
    duration: DurationOpt = None,
    ramp: RampOpt = None,
    seed: SeedOpt = None,
    agent_latency: LatencyOpt = None,
    time_scale: ScaleOpt = None,
    typing: TypingOpt = None,
    presence: PresenceOpt = None,
    scenario: ScenarioOpt = None,
    vs: Annotated[
        list[str] | None,
        typer.Option("--vs", help="another profile, run at the same time on the same leads (B in B/A); repeatable"),
    ] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="write the figures as JSON here")] = None,
    find_capacity: Annotated[
        bool,
        typer.Option("--find-capacity", help="double the leads until P95 breaks the SLO; report the largest that held"),
    ] = False,
    intake: Annotated[
        bool, typer.Option("--intake", help="webhook requests/s against a bare Starlette endpoint, side by side")
    ] = False,
    connections: Annotated[int, typer.Option(help="--intake: keep-alive connections", min=1, max=1000)] = 50,
    max_leads: Annotated[int, typer.Option(help="--find-capacity: stop doubling past this", min=1)] = 5000,
    followups: Annotated[
        int | None, typer.Option("--followups", help="send N due follow-ups; report follow-ups/s", min=1, max=1_000_000)
    ] = None,
    soak: Annotated[
        str | None,
        typer.Option(
            "--soak",
            metavar="DURATION",
            help="run this long (90s, 30m, 2h) watching the daemon's RSS, tasks and fds; exit 1 if they grew",
        ),
    ] = None,
    agent: Annotated[
        AgentKind,
        typer.Option(
            help="simulated (a latency, no text); fake-llm: the openai backend against a fake model writing a "
            "3-paragraph reply, the profile run twice side by side, replies sent whole and streamed (not with --vs)"
        ),
    ] = AgentKind.simulated,
    llm_ttft: Annotated[
        float,
        typer.Option(
            help="fake-llm: seconds to the first token (a typical published figure for hosted small models, "
            "gpt-4o-mini class, not a measurement of ours; scaled by --time-scale)"
        ),
    ] = LLM_TTFT,
    llm_tokens_per_s: Annotated[
        float,
        typer.Option(
            help="fake-llm: tokens a second once writing (a typical published figure too; the fake writes a word "
            "a token)"
        ),
    ] = LLM_TOKENS_PER_S,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Simulated leads against real daemons (embedded Postgres and Redis, simulated agent,
    fake Evolution API over HTTP); prints what became of each burst (whole, split, lost,
    unanswered), the response to its last message, and, with --vs, the ratios B/A. With
    --agent fake-llm: the time to the first WhatsApp message and to the whole reply, streamed
    against whole, and tokens and cost per turn."""
    cfg = load(ctx, config, profile)
    overrides = given(
        leads=leads,
        duration=duration,
        ramp=ramp,
        seed=seed,
        agent_latency=agent_latency,
        time_scale=time_scale,
        typing=typing,
        presence=presence,
    )
    if scenario is not None:
        workload = load_scenario(scenario, **overrides)
    else:
        workload = Workload(**overrides).validated()
    profiles = [cfg.profile.source] + list(vs or [])
    config_path = str(config or ctx.find_root().params.get("config") or "") or None
    if agent is AgentKind.fake_llm:
        flags = {"--vs": vs, "--soak": soak, "--followups": followups, "--intake": intake}
        flags |= {"--find-capacity": find_capacity, "--agent-latency": agent_latency}
        if clash := [flag for flag, value in flags.items() if value]:
            raise ConfigError(
                f"--agent fake-llm runs one profile twice side by side (replies whole and streamed); "
                f"drop {' and '.join(clash)}"
            )
        _fake_llm(cfg.profile.source, workload, LlmPace(llm_ttft, llm_tokens_per_s).validated(), config_path, json_file)
        return
    if soak is not None:
        if vs or duration is not None:
            raise ConfigError("--soak runs one profile for its own duration; drop --vs and --duration")
        _soak(cfg.profile.source, workload, soak_seconds(soak), config_path, json_file)
        return
    if followups is not None:
        _followups(cfg, followups, json_file)
        return
    if intake:
        _intake(cfg.profile.source, workload, connections, config_path, json_file)
        return
    if find_capacity:
        _capacity(profiles, workload, cfg.slo.response_p95, cfg.slo.timeout_rate, config_path, json_file, max_leads)
        return
    err.print(
        f"bench: {workload.leads} leads x {len(profiles)} profile(s), {workload.duration:g}s, "
        f"{workload.typing} typing{' with presence' if workload.presence else ''}, agent {workload.agent_latency}"
        + (
            f", time-scale {workload.time_scale:g} (every window, timeout and latency scaled)"
            if workload.time_scale != 1
            else ""
        )
    )
    with Live(progress_table({}, 0), console=err, refresh_per_second=2, transient=True) as live:
        results = run_fast(
            run_bench(
                profiles, workload, config_path=config_path, progress=lambda t, e: live.update(progress_table(t, e))
            )
        )
    out.print(results_table(results))
    report: dict[str, Any] = {
        "workload": workload.__dict__,
        "profiles": [r.summary() for r in results],
        "scaled": workload.time_scale != 1,
    }
    for b in results[1:]:
        ratios = compare(results[0], b)
        if len(results) == 2:
            report["ratios_b_over_a"] = ratios
        report.setdefault("ratios_over_a", {})[b.profile] = ratios
        out.print(
            f"B/A ({b.profile} / {results[0].profile}): "
            + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}x'}" for k, v in ratios.items())
        )
    if workload.time_scale != 1:
        out.print(f"[yellow]time-scale {workload.time_scale:g}: response times are scaled; overhead and CPU are not[/]")
    if json_file is not None:
        json_file.write_text(json.dumps(report, indent=2, default=str))
        err.print(f"wrote {json_file}")


def _fake_llm(profile: str, workload: Workload, pace: LlmPace, config_path: str | None, json_file: Path | None) -> None:
    scale, name = workload.time_scale, Path(profile).stem
    err.print(
        f"bench --agent fake-llm: {workload.leads} leads x 2 daemons of profile {name} (replies sent whole / "
        f"streamed), {workload.duration:g}s, {workload.typing} typing; fake LLM: first token after {pace.ttft:g}s, "
        f"{pace.tokens_per_s:g} tokens/s" + (f", time-scale {scale:g} (the LLM's pace too)" if scale != 1 else "")
    )
    with Live(progress_table({}, 0), console=err, refresh_per_second=2, transient=True) as live:
        results = run_fast(
            run_agent_bench(
                profile,
                workload,
                pace,
                config_path=config_path,
                progress=lambda t, e: live.update(progress_table(t, e)),
            )
        )
    out.print(results_table([r.bench for r in results], f"bench results ({name}, fake LLM)"))
    columns, rows = agent_rows(results)
    table = Table(title="first WhatsApp message vs whole reply (the lead's last message -> arrival)")
    for col in ["figure", *columns]:
        table.add_column(col, justify="left" if col == "figure" else "right")
    for label, values in rows:
        table.add_row(label, *values)
    out.print(table)
    if scale != 1:
        out.print(f"[yellow]time-scale {scale:g}: response times are scaled; overhead and CPU are not[/]")
    if json_file is not None:
        json_file.write_text(json.dumps(agent_report(results, workload, pace, name), indent=2, default=str))
        err.print(f"wrote {json_file}")


def _followups(cfg: Config, count: int, json_file: Path | None) -> None:
    err.print(f"bench --followups: {count} due follow-ups, one daemon, fake Evolution API over HTTP")
    r = run_fast(run_followups(cfg, count))
    out.print(
        f"{r.sent:,} of {r.count:,} follow-ups claimed and sent in {r.seconds:.2f}s: "
        f"[bold]{r.rate:,.0f} follow-ups/s[/] ({r.passes} passes of up to {r.batch}, {r.concurrency} at a time)"
    )
    if json_file is not None:
        json_file.write_text(
            json.dumps(
                {
                    "count": r.count,
                    "sent": r.sent,
                    "seconds": r.seconds,
                    "rate": r.rate,
                    "concurrency": r.concurrency,
                    "batch": r.batch,
                },
                indent=2,
            )
        )
        err.print(f"wrote {json_file}")


def _intake(
    profile: str, workload: Workload, connections: int, config_path: str | None, json_file: Path | None
) -> None:
    duration = workload.duration * workload.time_scale
    err.print(f"bench --intake: {connections} connections, {duration:g}s each: bare Starlette, then our webhook")
    result = run_fast(
        run_intake(profile, duration=duration, connections=connections, leads=workload.leads, config_path=config_path)
    )
    table = Table(title="intake throughput (same uvicorn, same client)")
    for col in ("endpoint", "requests/s", "p50 (ms)", "p95 (ms)", "p99 (ms)", "requests", "errors"):
        table.add_column(col, justify="right")
    for name, r in (("bare Starlette", result.baseline), ("sdrctl webhook", result.daemon)):
        table.add_row(
            name,
            f"{r.rate:,.0f}",
            *(_ms(percentile(r.latencies, q)) for q in (50, 95, 99)),
            f"{r.requests:,}",
            str(r.errors),
        )
    out.print(table)
    out.print(f"webhook / bare = {result.ratio:.2f}")
    if json_file is not None:
        json_file.write_text(
            json.dumps(
                {
                    "connections": connections,
                    "duration_s": duration,
                    "ratio": result.ratio,
                    "bare": {
                        "rate": result.baseline.rate,
                        "errors": result.baseline.errors,
                        **{f"p{q}_s": percentile(result.baseline.latencies, q) for q in (50, 95, 99)},
                    },
                    "webhook": {
                        "rate": result.daemon.rate,
                        "errors": result.daemon.errors,
                        **{f"p{q}_s": percentile(result.daemon.latencies, q) for q in (50, 95, 99)},
                    },
                },
                indent=2,
            )
        )


def _capacity(
    profiles: list[str],
    workload: Workload,
    slo_p95: float,
    max_timeout_rate: float,
    config_path: str | None,
    json_file: Path | None,
    max_leads: int,
) -> None:
    found: dict[str, list[CapacityStep]] = {}

    def show(name: str, steps: list[CapacityStep]) -> None:
        last = steps[-1]
        p95 = "-" if last.p95 is None else f"{last.p95 * 1000:,.0f} ms"
        err.print(
            f"  {name}: {last.leads} leads -> burst response P95 {p95}, {last.lost} lost, "
            f"{last.unanswered} unanswered, {'held' if last.held else 'broke'} the SLO"
        )

    limit = slo_p95 * workload.time_scale
    err.print(
        f"bench --find-capacity: SLO burst response P95 <= {limit:g}s, no message lost, <= 1 % of bursts "
        f"unanswered; from {workload.leads} leads, doubling"
    )
    for profile in profiles:
        found[profile] = run_fast(
            find_capacity(
                profile,
                workload,
                slo_p95,
                max_timeout_rate,
                config_path=config_path,
                max_leads=max_leads,
                progress=show,
            )
        )
    table = Table(title="capacity within the SLO")
    table.add_column("profile")
    table.add_column("leads held", justify="right")
    table.add_column("steps (leads: burst response P95 ms)")
    for profile, steps in found.items():
        trail = ", ".join(f"{s.leads}: {_ms(s.p95)}{'' if s.held else ' x'}" for s in steps)
        table.add_row(Path(profile).stem, str(capacity(steps)), trail)
    out.print(table)
    caps = [capacity(s) for s in found.values()]
    if len(caps) == 2 and caps[0]:
        out.print(f"B/A capacity: {caps[1] / caps[0]:.2f}x")
    if json_file is not None:
        json_file.write_text(
            json.dumps(
                {
                    Path(p).stem: {"capacity": capacity(s), "steps": [dataclasses.asdict(x) for x in s]}
                    for p, s in found.items()
                },
                indent=2,
            )
        )


def _mb(value: float) -> str:
    return f"{value / 2**20:,.1f} MB"


def _soak(profile: str, workload: Workload, seconds: float, config_path: str | None, json_file: Path | None) -> None:
    err.print(
        f"bench --soak: {workload.leads} leads for {seconds:g}s (wall clock) against one daemon, its /metrics sampled"
        + (f"; time-scale {workload.time_scale:g}" if workload.time_scale != 1 else "")
    )

    def progress(tallies: dict[str, Tally], samples: list[Sample], elapsed: float) -> None:
        table = progress_table(tallies, elapsed)
        s = samples[-1]
        table.caption = f"daemon at {s.t:,.0f}s: RSS {_mb(s.rss_bytes)}, {s.tasks:g} tasks, {s.fds:g} fds"
        live.update(table)

    with Live(progress_table({}, 0), console=err, refresh_per_second=2, transient=True) as live:
        result = run_fast(run_soak(profile, workload, seconds, config_path=config_path, progress=progress))
    out.print(results_table([result.bench]))
    out.print(soak_table(result))
    if json_file is not None:
        json_file.write_text(json.dumps({"workload": workload.__dict__, **result.summary()}, indent=2))
        err.print(f"wrote {json_file}")
    if result.flat:
        out.print(f"[green]flat: RSS, tasks and fds held steady after the {result.warmup:g}s warm-up[/]")
    else:
        labels = (("rss_bytes", "RSS"), ("tasks", "tasks"), ("fds", "fds"))
        grew = [label for name, label in labels if not result.trends[name].flat]
        out.print(f"[red]NOT flat: {' and '.join(grew)} kept growing after the warm-up (a leak?)[/]")
        raise typer.Exit(1)


def soak_table(result: SoakResult) -> Table:
    table = Table(
        title=f"daemon over {result.seconds:g}s (warm-up {result.warmup:g}s, a sample every {result.every:g}s)"
    )
    for col in ("", "start", "after warm-up", "end", "growth", "per minute", "noise (sd)", "allowed", "verdict"):
        table.add_column(col, justify="right")
    for name, label in (("rss_bytes", "RSS"), ("tasks", "tasks"), ("fds", "fds")):
        t = result.trends[name]
        fmt = _mb if name == "rss_bytes" else (lambda v: f"{v:,.1f}")
        verdict = "flat" if t.flat else ("climbing" if t.climbing else "grew")
        table.add_row(
            label,
            fmt(t.start),
            fmt(t.warm),
            fmt(t.end),
            f"{t.growth_pct:+.1f} %",
            f"{'+' if t.per_minute >= 0 else '-'}{fmt(abs(t.per_minute))}",
            fmt(t.noise),
            fmt(t.allowance),
            verdict,
        )
    idle = result.idle_after
    table.caption = f"idle after the run: RSS {_mb(idle.rss_bytes)}, {idle.tasks:g} tasks, {idle.fds:g} fds"
    return table
