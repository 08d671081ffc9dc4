"""`sdrctl bench` at a small scale: real daemons, real HTTP, figures that add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.bench import Workload, load_scenario, percentile, scaled_overrides
from daemon.config import load_profile
from daemon.errors import ConfigError
from tests.helpers import sdrctl


async def test_bench_a_vs_b_at_a_small_scale_writes_comparable_figures(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    code, out, err = await sdrctl(
        "bench", "--leads", "6", "--duration", "6", "--ramp", "1", "--time-scale", "0.1",
        "--seed", "7", "--vs", "legacy", "--json", str(report),
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["scaled"] is True and data["workload"]["time_scale"] == 0.1
    a, b = data["profiles"]
    assert (a["profile"], b["profile"]) == ("recommended", "legacy")
    for p in (a, b):
        assert p["bursts"] > 0 and p["missing_replies"] == 0 and p["webhook_errors"] == 0
        assert p["response_s"]["n"] == p["bursts"]
        assert p["turns"] >= 1 and "agent" in p["stages_ms"]
        assert p["response_s"]["p50"] <= p["response_s"]["p95"] <= p["response_s"]["max"]
    # Legacy answers message by message: at least as many turns as bursts.
    assert b["turns"] >= b["bursts"]
    assert set(data["ratios_b_over_a"]) == {"response_p50", "response_p95", "throughput", "turns"}
    assert "response p95 (ms)" in out and "B/A (legacy / recommended)" in out
    assert "time-scale 0.1" in out


async def test_bench_intake_measures_both_endpoints_side_by_side(tmp_path: Path) -> None:
    report = tmp_path / "intake.json"
    code, out, err = await sdrctl("bench", "--intake", "--duration", "1", "--connections", "4", "--json", str(report))
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["bare"]["rate"] > 0 and data["webhook"]["rate"] > 0
    assert data["bare"]["errors"] == 0 and data["webhook"]["errors"] == 0
    assert data["ratio"] == pytest.approx(data["webhook"]["rate"] / data["bare"]["rate"])
    assert "webhook / bare" in out


async def test_bench_followups_sends_every_due_follow_up_once_and_reports_the_rate(tmp_path: Path) -> None:
    report = tmp_path / "followups.json"
    code, out, err = await sdrctl("bench", "--followups", "40", "--json", str(report))
    assert code == 0, err
    doc = json.loads(report.read_text())
    assert doc["count"] == doc["sent"] == 40 and doc["rate"] > 0 and doc["concurrency"] == 3
    assert "40 of 40 follow-ups claimed and sent" in out and "follow-ups/s" in out


async def test_bench_find_capacity_reports_the_largest_count_that_held(tmp_path: Path) -> None:
    report = tmp_path / "capacity.json"
    code, out, err = await sdrctl(
        "bench", "--find-capacity", "--leads", "2", "--max-leads", "4", "--duration", "3",
        "--time-scale", "0.1", "--json", str(report),
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(report.read_text())["recommended"]
    assert [s["leads"] for s in data["steps"]][:2] == [2, 4]
    assert data["capacity"] == max((s["leads"] for s in data["steps"] if s["held"]), default=0)
    assert "capacity within the SLO" in out


async def test_bench_refuses_a_bad_workload_with_exit_code_2(tmp_path: Path) -> None:
    code, _, err = await sdrctl("bench", "--leads", "0")
    assert code == 2 and "leads must be at least 1" in err and "Traceback" not in err
    scenario = tmp_path / "s.toml"
    scenario.write_text("leads = 5\nquestoin_share = 0.5\n")
    code, _, err = await sdrctl("bench", "--scenario", str(scenario))
    assert code == 2 and "unknown key questoin_share" in " ".join(err.split())


def test_scenarios_and_scaling(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text('leads = 50\nquestion_share = 0.8\nagent_latency = "fixed:1"\n')
    w = load_scenario(scenario, leads=None, seed=3)
    assert (w.leads, w.question_share, w.seed) == (50, 0.8, 3)
    with pytest.raises(ConfigError, match="agent_latency"):
        Workload(agent_latency="normal:1").validated()
    env = scaled_overrides(load_profile("recommended", env={}), 0.1)
    assert float(env["SDR_TIMEOUTS_AGENT"]) == pytest.approx(3.0)
    assert float(env["SDR_BUFFER_QUIET_WINDOW"]) == pytest.approx(0.1)
    assert "SDR_TIMEOUTS_DATABASE" not in env  # infrastructure timeouts are not scaled


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (50, 95, 100)
    assert percentile([], 95) is None
