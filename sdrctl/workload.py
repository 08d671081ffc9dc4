"""The workload options `bench` and `profile` share."""

from __future__ import annotations

from typing import Annotated, Any

import typer

LeadsOpt = Annotated[int | None, typer.Option(help="concurrent simulated leads")]
DurationOpt = Annotated[float | None, typer.Option(help="seconds of load (before --time-scale)")]
RampOpt = Annotated[float | None, typer.Option(help="seconds over which leads start")]
SeedOpt = Annotated[int | None, typer.Option(help="random seed: same seed, same workload")]
LatencyOpt = Annotated[str | None, typer.Option(help="e.g. lognormal:median=1.5,p95=4")]
ScaleOpt = Annotated[float | None, typer.Option(help="scale every window, timeout and latency (0.01-1)")]
TypingOpt = Annotated[
    str | None, typer.Option(help="how leads type: human (reaction + length / own speed) or quick (0.2-0.9 s gaps)")
]
PresenceOpt = Annotated[
    bool | None,
    typer.Option("--presence/--no-presence", help="leads post 'composing'/'paused' presence around each message"),
]
ScenarioOpt = Annotated[
    str | None, typer.Option(help="a named scenario (quick-typers) or a TOML file with the workload's keys")
]


def given(**options: Any) -> dict[str, Any]:
    """The workload options the user gave (None = the workload's default)."""
    return {k: v for k, v in options.items() if v is not None}
