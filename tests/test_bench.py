"""`sdrctl bench` at a small scale: real daemons, real HTTP, figures that add up."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from daemon.config import AgentSettings, load_profile
from daemon.errors import ConfigError
from daemon.testing.servers import background_server, quiet_server
from daemon.tools.bench import run_bench
from daemon.tools.bursts import SentBurst, account, classify, percentile
from daemon.tools.daemons import scaled_overrides
from daemon.tools.loadgen import RawClient
from daemon.tools.workload import BurstPlan, LeadSimulator, Tally, Workload, load_scenario, named_scenarios
from tests.helpers import sdrctl


async def test_bench_a_vs_b_at_a_small_scale_writes_comparable_figures(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    code, out, err = await sdrctl(
        "bench",
        "--leads",
        "6",
        "--duration",
        "30",
        "--ramp",
        "1",
        "--time-scale",
        "0.1",
        "--seed",
        "7",
        "--vs",
        "legacy",
        "--json",
        str(report),
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["scaled"] is True and data["workload"]["time_scale"] == 0.1
    assert data["workload"]["typing"] == "human"
    a, b = data["profiles"]
    assert (a["profile"], b["profile"]) == ("recommended", "legacy")
    for p in (a, b):
        outcomes = p["bursts_by_outcome"]
        assert p["bursts"] > 0 and p["missing_replies"] == 0 and p["webhook_errors"] == 0
        assert sum(outcomes.values()) == p["bursts"] and outcomes["lost"] == outcomes["refused"] == 0
        assert p["response_s"]["n"] == outcomes["whole"] + outcomes["split"]
        assert p["turns"] >= 1 and "agent" in p["stages_ms"]
        assert p["response_s"]["p50"] <= p["response_s"]["p95"] <= p["response_s"]["max"]
        assert p["replies_per_burst"] >= 1 and p["agent_calls_per_turn"] >= 1
        assert p["cpu_s_per_turn"] is not None and p["cpu_s_per_turn"] > 0
        assert p["split_rate"] <= p["split_rate_multi"] <= 1
    # Legacy answers message by message: at least as many turns as bursts.
    assert b["turns"] >= b["bursts"]
    assert set(data["ratios_b_over_a"]) == {
        "response_p50",
        "response_p95",
        "response_p99",
        "lead_wait_p95",
        "split_rate",
        "replies_per_burst",
        "agent_calls_per_turn",
        "lost",
        "unanswered",
        "cpu_s_per_turn",
        "throughput",
        "turns",
    }
    assert "response p95 (ms)" in out and "B/A (legacy / recommended)" in out
    assert "split rate" in out and "agent calls per turn" in out
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
    # An SLO above recommended's settle_window (5 s: every reply waits that long after the
    # lead's last message), so that 2 leads hold it.
    code, out, err = await sdrctl(
        "bench",
        "--find-capacity",
        "--leads",
        "2",
        "--max-leads",
        "4",
        "--duration",
        "3",
        "--time-scale",
        "0.1",
        "--json",
        str(report),
        env={"SDR_SLO_RESPONSE_P95": "20"},
    )
    assert code == 0, err
    data = json.loads(report.read_text())["recommended"]
    assert [s["leads"] for s in data["steps"]][:2] == [2, 4]
    assert all({"lost", "unanswered", "split_rate"} <= set(s) for s in data["steps"])
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
    recommended = load_profile("recommended", env={})
    env = scaled_overrides(recommended, 0.1)
    assert float(env["SDR_TIMEOUTS_AGENT"]) == pytest.approx(3.0)
    assert float(env["SDR_BUFFER_QUIET_WINDOW"]) == pytest.approx(0.1)
    # The speculative buffer's waits too.
    assert float(env["SDR_BUFFER_SETTLE_WINDOW"]) == pytest.approx(recommended.buffer.settle_window * 0.1)
    assert "SDR_TIMEOUTS_DATABASE" not in env  # infrastructure timeouts are not scaled


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (50, 95, 100)
    assert percentile([], 95) is None


# --- per-burst accounting (daemon/tools/bursts.py) on a hand-made run ----------------------


def _burst(phone: str, *messages: tuple[str, float | None]) -> SentBurst:
    b = SentBurst(phone)
    for message_id, at in messages:
        b.add(message_id, at)
    return b


def test_bursts_are_classified_and_timed_from_the_reply_that_holds_their_last_message() -> None:
    bursts = [
        _burst("p1", ("a1", 10.0), ("a2", 11.0)),  # whole: one turn, delivered
        _burst("p2", ("b1", 20.0), ("b2", 25.0), ("b3", 30.0)),  # split over T2 and T3
        _burst("p3", ("c1", 40.0), ("c2", 41.0)),  # c2 accepted, never stored: lost
        _burst("p4", ("d1", 50.0)),  # stored, no turn: unanswered
        _burst("p4", ("e1", 60.0)),  # its turn's reply never arrived: unanswered
        _burst("p5", ("f1", None)),  # no post accepted: refused
        _burst("p5", ("g1", None), ("g2", 70.0)),  # g1's post failed but it was stored: whole
    ]
    stored = {"a1": 1, "a2": 1, "b1": 2, "b2": 2, "b3": 3, "c1": 4, "d1": None, "e1": 5, "g1": 6, "g2": 6}
    # T2 answers b1+b2 but arrives after b3 was sent: the first reply the lead sees after its
    # last message, yet not the answer to it (T3's is).
    deliveries = {1: [13.0, 13.5], 2: [31.0], 3: [34.0, 34.2], 4: [42.0], 6: [71.5]}
    out = [classify(b, stored, deliveries, sorted(t for d in deliveries.values() for t in d)) for b in bursts]
    assert [o.kind for o in out] == ["whole", "split", "lost", "unanswered", "unanswered", "refused", "whole"]
    assert [o.replies for o in out] == [1, 2, 1, 0, 0, 0, 1]
    assert out[0].response == 2.0 and out[0].lead_wait == 2.0
    assert out[1].response == 4.0 and out[1].lead_wait == 1.0  # not 1.0: that reply answered b1+b2
    assert out[6].response == 1.5
    assert all(o.response is None for o in out[2:6])

    figures = account(bursts, stored, deliveries, turns=6, discarded=3, cpu_seconds=1.2)
    s = figures.summary()
    assert s["bursts_by_outcome"] == {"whole": 2, "split": 1, "lost": 1, "unanswered": 2, "refused": 1}
    assert s["multi_message_bursts"] == 4  # a, b, c, g
    assert s["split_rate"] == pytest.approx(1 / 7) and s["split_rate_multi"] == pytest.approx(1 / 4)
    assert s["replies_per_burst"] == pytest.approx((1 + 2 + 1) / 3) and s["replies_hist"] == {"1": 2, "2": 1}
    assert s["response_s"]["n"] == 3 and s["response_s"]["p50"] == 2.0 and s["response_s"]["max"] == 4.0
    # Lead waits come from the replies to each lead's own messages: p3 got T4's at 42.0.
    assert [o.lead_wait for o in figures.outcomes] == [2.0, 1.0, 1.0, None, None, None, 1.5]
    assert s["lead_wait_s"]["n"] == 4
    assert s["agent_calls_per_turn"] == pytest.approx(9 / 6) and s["discarded_replies"] == 3
    assert s["cpu_s_per_turn"] == pytest.approx(0.2)
    assert [(p["kind"], p["ids"], p["turns"]) for p in s["problem_bursts"]] == [
        ("lost", ["c1", "c2"], [4, "not stored"]),
        ("unanswered", ["d1"], [None]),
        ("unanswered", ["e1"], [5]),
    ]
    assert account([], {}, {}, turns=0).summary()["agent_calls_per_turn"] is None


# --- the workload -------------------------------------------------------------------------


def test_human_gaps_are_a_reaction_plus_the_message_typed_at_the_leads_own_speed() -> None:
    w = Workload(reaction="fixed:2", typing_wpm="fixed:60", time_scale=0.5).validated()
    lead = LeadSimulator(3, 0, w, patience=1)
    assert lead.wpm == 60 and lead.chars_per_second == 5  # 60 words of 5 characters a minute
    for _ in range(5):
        plan = lead.plan()
        assert 1 <= len(plan.texts) <= 5
        for i, (text, (reaction, typing)) in enumerate(zip(plan.texts, plan.waits, strict=True)):
            assert typing == pytest.approx(len(text) / 5 * 0.5)  # scaled like every wait
            assert reaction == (0.0 if i == 0 else 1.0)  # the first is typed after thinking

    # Drawn: the same seed gives the same lead (speed, texts, gaps); the speed once per lead.
    default = Workload(time_scale=0.3)
    one, two = LeadSimulator(0, 0, default, 1), LeadSimulator(0, 0, default, 1)
    plans = [one.plan() for _ in range(4)]
    assert plans == [two.plan() for _ in range(4)] and one.wpm == two.wpm
    assert one.chars_per_second is not None
    for plan in plans:
        for text, (_, typing) in zip(plan.texts, plan.waits, strict=True):
            assert typing == pytest.approx(len(text) / one.chars_per_second * 0.3)
    speeds = {LeadSimulator(i, 0, default, 1).wpm for i in range(200)}
    assert len(speeds) > 150 and all(s is not None and 10 <= s <= 100 for s in speeds)
    assert LeadSimulator(0, 0, Workload(seed=2), 1).plan() != LeadSimulator(0, 0, Workload(seed=1), 1).plan()
    # Clamped to 10-100 WPM.
    assert LeadSimulator(0, 0, Workload(typing_wpm="fixed:500"), 1).wpm == 100
    assert LeadSimulator(0, 0, Workload(typing_wpm="fixed:1"), 1).wpm == 10
    # Texts from 2 to ~90 characters.
    lengths = [len(t) for i in range(50) for t in LeadSimulator(i, 0, default, 1).plan().texts]
    assert min(lengths) <= 5 and 60 <= max(lengths) <= 90


def test_quick_typers_are_a_named_scenario_with_the_old_fixed_gaps(tmp_path: Path) -> None:
    assert "quick-typers" in named_scenarios()
    w = load_scenario("quick-typers", leads=7, time_scale=0.5)
    assert (w.typing, w.burst_min, w.burst_max, w.typing_gap, w.leads) == ("quick", 1, 4, "uniform:min=0.2,max=0.9", 7)
    lead = LeadSimulator(0, 0, w, 1)
    assert lead.wpm is None
    for _ in range(10):
        plan = lead.plan()
        assert plan.waits[0] == (0.0, 0.0)
        assert all(r == 0 and 0.1 <= g <= 0.45 for r, g in plan.waits[1:])
    with pytest.raises(ConfigError, match="quick-typers"):
        load_scenario("slow-typers")
    with pytest.raises(ConfigError, match="typing must be one of human, quick"):
        Workload(typing="fast").validated()
    with pytest.raises(ConfigError, match="reaction"):
        Workload(reaction="gamma:1").validated()
    bad = tmp_path / "bad.toml"
    bad.write_text('presence = "yes"\n')
    with pytest.raises(ConfigError, match="presence must be true or false"):
        load_scenario(bad)


async def test_cli_resolves_a_named_scenario_and_refuses_new_fields_badly_given() -> None:
    # --leads 0 is refused after the scenario is read: the name was found.
    code, _, err = await sdrctl("bench", "--scenario", "quick-typers", "--leads", "0")
    assert code == 2 and "leads must be at least 1" in err and "Traceback" not in err
    code, _, err = await sdrctl("bench", "--scenario", "no-such-scenario")
    assert code == 2 and "quick-typers" in err and "Traceback" not in err
    code, _, err = await sdrctl("bench", "--typing", "fast")
    assert code == 2 and "typing must be one of human, quick" in " ".join(err.split()) and "Traceback" not in err


@asynccontextmanager
async def _webhook_stub(fail_presence: bool = False) -> AsyncIterator[tuple[str, list[tuple[str, str]]]]:
    """A webhook that notes each post: ("message", id) or ("presence", state)."""
    posts: list[tuple[str, str]] = []

    async def webhook(request: Request) -> JSONResponse:
        body: dict[str, Any] = await request.json()
        if body["event"] == "presence.update":
            [state] = {p["lastKnownPresence"] for p in body["data"]["presences"].values()}
            posts.append(("presence", state))
            return JSONResponse({}, status_code=500 if fail_presence else 200)
        posts.append(("message", body["data"]["key"]["id"]))
        return JSONResponse({"status": "stored"})

    app = Starlette(routes=[Route("/webhook/evolution", webhook, methods=["POST"])])
    async with background_server(quiet_server(app)) as url:
        yield url, posts


async def test_presence_composing_while_typing_each_message_and_paused_after_it() -> None:
    w = Workload(presence=True, time_scale=0.01).validated()  # "composing" again every 0.1 s
    lead = LeadSimulator(0, 0, w, patience=0.1)
    plan = BurstPlan(["Oi", "Minha conta vem uns R$ 450"], [(0.0, 0.0), (0.02, 0.5)], duplicate=None, think=0.0)
    async with _webhook_stub() as (url, posts):
        http = RawClient(url, size=2, timeout=5)
        tally = Tally()
        burst = await lead.send_burst(http, plan, tally, stop_at=math.inf)
        await http.aclose()
    first, second = burst.ids
    assert posts[:3] == [("presence", "composing"), ("message", first), ("presence", "paused")]
    typing = posts[3 : posts.index(("message", second))]
    assert len(typing) >= 2 and set(typing) == {("presence", "composing")}  # re-posted while typing
    assert posts[-2:] == [("message", second), ("presence", "paused")]
    # Presence posts are not messages: not in the burst, not in the message counts.
    assert tally.messages == 2 and tally.errors == 0 and all(t is not None for t in burst.accepted)
    assert tally.presence_posts == len(posts) - 2 and tally.presence_errors == 0

    async with _webhook_stub(fail_presence=True) as (url, posts):
        http = RawClient(url, size=2, timeout=5)
        tally = Tally()
        burst = await lead.send_burst(http, plan, tally, stop_at=math.inf)
        await http.aclose()
    assert tally.presence_errors == tally.presence_posts > 0  # counted apart...
    assert tally.errors == 0 and tally.messages == 2  # ...not as the lead's errors


async def test_a_real_run_accounts_for_every_burst() -> None:
    w = Workload(leads=4, duration=40, ramp=1, time_scale=0.1, seed=3, presence=True)
    [r] = await run_bench(["recommended"], w)
    s = r.summary()
    outcomes = s["bursts_by_outcome"]
    assert s["bursts"] == len(r.tally.sent) > 0 and sum(outcomes.values()) == s["bursts"]
    assert outcomes["lost"] == 0 and outcomes["refused"] == 0 and s["webhook_errors"] == 0
    answered = outcomes["whole"] + outcomes["split"]
    assert answered > 0 and s["response_s"]["n"] == answered
    assert s["replies_per_burst"] >= 1 and sum(int(k) * v for k, v in s["replies_hist"].items()) >= answered
    assert s["multi_message_bursts"] == sum(1 for b in r.tally.sent if len(b.ids) >= 2)
    assert s["presence_posts"] > 0 and s["presence_errors"] == 0
    assert s["messages"] == sum(len(b.ids) for b in r.tally.sent)
    assert s["agent_calls_per_turn"] >= 1 and s["cpu_s_per_turn"] > 0
    assert r.bursts is not None
    for o in r.bursts.outcomes:
        if o.response is not None:  # the reply to the last message is never before the first one after it
            assert o.lead_wait is not None and o.response >= o.lead_wait


# --- --agent fake-llm: replies whole vs streamed (daemon/tools/bench_agent.py) --------------


async def test_bench_fake_llm_times_the_first_message_and_the_whole_reply_streamed_and_not(tmp_path: Path) -> None:
    report = tmp_path / "llm.json"
    code, out, err = await sdrctl(
        "bench",
        "--agent",
        "fake-llm",
        "--leads",
        "4",
        "--duration",
        "30",
        "--ramp",
        "1",
        "--time-scale",
        "0.1",
        "--seed",
        "7",
        "--json",
        str(report),
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["agent"] == "fake-llm" and data["llm"]["ttft_s"] == 0.5 and data["llm"]["tokens_per_s"] == 70
    whole, streamed = data["daemons"]
    assert (whole["mode"], streamed["mode"]) == ("whole", "streamed")
    for d in (whole, streamed):
        outcomes = d["bursts_by_outcome"]
        # Every burst answered: none lost, unanswered or refused, no lead left waiting.
        assert d["bursts"] > 0 and outcomes["whole"] + outcomes["split"] == d["bursts"]
        assert d["missing_replies"] == 0 and d["webhook_errors"] == 0 and d["fallbacks"] == 0
        assert d["first_message_s"]["n"] == d["whole_reply_s"]["n"] == d["response_s"]["n"] == d["bursts"]
        # The first message is the bench's usual response (the same reply, the same clock).
        assert d["first_message_s"]["p50"] == pytest.approx(d["response_s"]["p50"])
        assert d["llm_requests"] >= d["turns"] > 0
        assert d["prompt_tokens_per_turn"] > 0 and d["completion_tokens_per_turn"] > 0 and d["cost_per_turn_usd"] > 0
    # Sent whole: one message, so the first is the whole reply.
    assert whole["parts_per_reply"] == 1 and set(whole["parts_hist"]) == {"1"}
    assert whole["first_message_s"] == whole["whole_reply_s"]
    # Streamed: the paragraphs go one by one, the first before the last.
    assert streamed["parts_per_reply"] > 1
    assert streamed["first_message_s"]["p50"] < streamed["whole_reply_s"]["p50"]
    ratios = data["ratios_streamed_over_whole"]
    assert ratios["parts_per_reply"] == pytest.approx(streamed["parts_per_reply"])
    assert {"first_message_p50", "first_message_p95", "whole_reply_p50", "whole_reply_p95", "cost_per_turn"} <= set(
        ratios
    )
    # The usual figures still printed, and the reply-timing table.
    assert "bursts whole / split / lost / unanswered" in out and "response p95 (ms)" in out
    assert "first message P50/P95 (s)" in out and "whole reply P50/P95 (s)" in out and "streamed/whole" in out


async def test_bench_fake_llm_refuses_vs_and_a_bad_pace_with_exit_code_2() -> None:
    code, _, err = await sdrctl("bench", "--agent", "fake-llm", "--vs", "legacy")
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "--agent fake-llm" in err and "drop --vs" in err
    code, _, err = await sdrctl("bench", "--agent", "fake-llm", "--llm-tokens-per-s", "0")
    assert code == 2 and "--llm-tokens-per-s" in err and "Traceback" not in err


def test_the_fake_llms_reply_is_three_paragraphs_a_streamed_reply_sends_apart() -> None:
    from daemon.agents.openai import SYSTEM_PROMPT, leaks
    from daemon.agents.stream import Paragraphs
    from daemon.testing.fake_openai import _CONTENT_PIECES
    from daemon.tools.bench_agent import REPLY

    assert 60 <= len(REPLY.split()) <= 90 and REPLY.count("\n\n") == 2
    prompt = SYSTEM_PROMPT.format(persona="Sol", company="Sol Nascente Energia Solar")
    assert not leaks(REPLY, prompt, AgentSettings().leak_words)
    cutter = Paragraphs(40, 1000)  # the defaults: [agent] stream_min_part, [limits] max_message_length
    parts = [part for piece in _CONTENT_PIECES.findall(REPLY) for part in cutter.feed(piece)] + cutter.flush()
    assert parts == REPLY.split("\n\n")


def test_reply_times_take_the_first_and_last_part_of_the_reply_holding_the_bursts_last_message() -> None:
    from daemon.tools.bench import ProfileResult
    from daemon.tools.bench_agent import reply_times

    bursts = [
        _burst("p1", ("a1", 10.0), ("a2", 11.0)),  # whole: T1, three parts
        _burst("p2", ("b1", 20.0), ("b2", 25.0)),  # split: b2's turn (T3) is the one timed
        _burst("p3", ("c1", 40.0)),  # unanswered: not timed
    ]
    stored = {"a1": 1, "a2": 1, "b1": 2, "b2": 3, "c1": None}
    deliveries = {1: [12.0, 12.5, 13.0], 2: [22.0], 3: [27.0]}
    tally = Tally(sent=bursts)
    result = ProfileResult("streamed", 3, tally, 1.0, {}, account(bursts, stored, deliveries, turns=3))
    times = reply_times(result, stored, deliveries)
    assert times.first == [1.0, 2.0] and times.whole == [2.0, 2.0] and times.parts == [3, 1]
