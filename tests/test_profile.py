"""`sdrctl profile`: a profiled run in one process, and the breakdown of a running daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.config import Config
from daemon.errors import SdrError
from daemon.testing.servers import free_port
from daemon.tools.profiling import breakdown_from_metrics, breakdown_from_turns, bucket_quantile
from tests.helpers import FAST_PROFILE, event, run_daemon, wait_for
from tests.helpers import sdrctl as run_cli


async def sdrctl(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    # Stacked tree and table, as in a narrow terminal.
    return await run_cli(*args, timeout=timeout, env={"COLUMNS": "100"})


def bottleneck_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("bottleneck:")]
    assert len(lines) == 1, out
    return lines[0]


async def test_a_profiled_run_shows_the_pipeline_and_names_the_agent(tmp_path: Path) -> None:
    html, report = tmp_path / "profile.html", tmp_path / "profile.json"
    code, out, err = await sdrctl(
        "profile",
        "--leads",
        "5",
        "--duration",
        "5",
        "--time-scale",
        "1",
        "--profile",
        FAST_PROFILE,
        "--html",
        str(html),
        "--json",
        str(report),
    )
    assert code == 0, err
    tree = out[out.index("call tree:") : out.index("response time by stage")]
    assert "daemon/turn.py" in tree and "TurnRunner" in tree
    # Trimmed: neither the event loop's frames nor the load generator's show.
    assert "base_events.py" not in tree and "LeadSimulator" not in tree
    assert len(tree.splitlines()) <= 41
    for row in ("buffer wait", "context", "agent", "store + send", "overhead", "response"):
        assert row in out
    # The simulated agent (median 1.5 s) dwarfs windows of 0.1-0.5 s and the daemon's own
    # work, even on a loaded machine (scaled to 0.1, a busy CPU's overhead outweighed it).
    assert bottleneck_line(out).startswith("bottleneck: ") and " is agent" in bottleneck_line(out)

    assert html.stat().st_size > 50_000 and "pyinstrument" in html.read_text()
    data = json.loads(report.read_text())
    b = data["breakdown"]
    rows = {r["name"]: r for r in b["rows"]}
    assert b["turns"] >= 1 and data["bench"]["missing_replies"] == 0
    # The rows on the path partition the response time; knowledge runs beside the agent.
    assert sum(r["share"] for r in b["rows"] if r["on_path"]) == pytest.approx(1.0)
    assert "knowledge" not in rows or rows["knowledge"]["on_path"] is False
    assert rows["agent"]["share"] > 0.5 and rows["agent"]["p50_ms"] <= rows["agent"]["p95_ms"]
    assert data["bench"]["turns"] == b["turns"]
    assert data["call_tree"]["root_frame"]["children"], "the JSON holds the trimmed tree"


async def test_url_mode_reads_a_running_daemons_metrics(config: Config, tmp_path: Path) -> None:
    report = tmp_path / "metrics.json"
    async with run_daemon(config) as d, httpx.AsyncClient(base_url=d.url) as http:
        for i, text in enumerate(["Oi, quanto custa?", "Meu nome é Ana", "Tem financiamento?"]):
            assert (await http.post("/webhook/evolution", json=event(f"551199990{i:04d}", text))).status_code == 200
        registry = d.runtime.metrics.registry

        async def answered() -> bool:
            return (registry.get_sample_value("sdr_response_time_seconds_count") or 0) >= 3

        await wait_for(answered)
        code, out, err = await sdrctl("profile", "--url", d.url, "--profile", FAST_PROFILE, "--json", str(report))
        agent_s = registry.get_sample_value("sdr_stage_seconds_sum", {"stage": "agent"})
    assert code == 0, err
    line = bottleneck_line(out)
    b = json.loads(report.read_text())["breakdown"]
    names = [r["name"] for r in b["rows"]]
    assert b["turns"] == 3 and {"buffer wait + overhead", "context", "agent", "store"} <= set(names)
    assert any(
        line.startswith(f"bottleneck: {round(r['share'] * 100)} % of response time is {r['name']}") for r in b["rows"]
    )
    agent = b["rows"][names.index("agent")]
    assert agent_s is not None and agent["total_ms"] == pytest.approx(agent_s * 1000)  # what the daemon itself counted
    assert agent["p50_ms"] <= agent["p95_ms"]


async def test_bad_options_exit_2_and_an_unreachable_daemon_exits_1() -> None:
    code, _, err = await sdrctl("profile", "--time-scale", "5")
    assert code == 2 and "time_scale must be from 0.01 to 1" in err and "Traceback" not in err
    code, _, err = await sdrctl("profile", "--url", "http://127.0.0.1:1", "--leads", "3")
    assert code == 2 and "--leads" in err and "Traceback" not in err
    code, _, err = await sdrctl("profile", "--leads", "many")
    assert code == 2 and "Traceback" not in err
    code, _, err = await sdrctl("profile", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "cannot read" in err and "Traceback" not in err


def test_bucket_quantiles_interpolate_like_prometheus() -> None:
    buckets = [(0.1, 0.0), (0.25, 10.0), (0.5, 10.0), (float("inf"), 10.0)]
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.175)  # halfway through (0.1, 0.25]
    assert bucket_quantile(0.95, [(1.0, 5.0), (float("inf"), 10.0)]) == 1.0  # +Inf: the top bound
    assert bucket_quantile(0.5, []) is None


def test_turn_records_split_the_response_time_and_name_the_bottleneck() -> None:
    turn: dict[str, Any] = {
        "response_ms": 1000.0,
        "window_ms": 200.0,
        "reply_ms": 100.0,
        "stages": {"context": 50.0, "knowledge": 30.0, "agent": 600.0},
    }
    b = breakdown_from_turns([turn, {**turn, "response_ms": None}], parallel_knowledge=True)
    rows = {r.name: r for r in b.rows}
    assert b.turns == 1 and rows["overhead"].total_ms == pytest.approx(50.0)
    assert b.bottleneck() == "bottleneck: 60 % of response time is agent; next: buffer wait 20 %"
    serial = breakdown_from_turns([turn], parallel_knowledge=False)  # legacy: search first
    assert {r.name: r for r in serial.rows}["overhead"].total_ms == pytest.approx(20.0)


def test_metrics_without_answered_turns_are_refused() -> None:
    with pytest.raises(SdrError, match="no answered turns"):
        breakdown_from_metrics("# nothing here\n", parallel_knowledge=True)
