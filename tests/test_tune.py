"""`sdrctl tune`, run as a user would, in a temporary working directory (its ./profiles is
where user profiles go), so the repository's profiles/ are never written."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from daemon.config import PROFILE_SECTIONS, load_profile
from daemon.embedded import Endpoints
from daemon.tools import tuning
from tests.helpers import REPO, child_env

ALL_KEYS = [f"{s}.{f.name}" for s, cls in PROFILE_SECTIONS.items() for f in dataclasses.fields(cls)]


def tune(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`sdrctl tune ...` in the current directory, without the shell's settings."""
    return subprocess.run(
        [sys.executable, "-m", "sdrctl", "tune", *args],
        cwd=Path.cwd(),
        env=child_env(**{"COLUMNS": "250", **(env or {})}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def values(name: str) -> dict[str, Any]:
    return {k.key: k.value for k in tuning.knobs(load_profile(name, {}))}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture
def mine(workdir: Path) -> Path:
    """profiles/mine.toml: a copy of recommended."""
    return tuning.new_profile("mine", "recommended")


# --- show -----------------------------------------------------------------------------


def test_show_prints_every_knob_with_unit_range_and_meaning(workdir: Path) -> None:
    r = tune("show", "legacy")
    assert r.returncode == 0, r.stderr
    for section in PROFILE_SECTIONS:
        assert f"[{section}]" in r.stdout
    for key in ALL_KEYS:
        assert key.split(".")[1] in r.stdout
    lines = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") > 4}
    assert [c.strip() for c in lines["agent"].split("│")[2:6]] == [
        "45.0",
        "s",
        "0.05 to 300",
        "agent call for one turn",
    ]
    assert [c.strip() for c in lines["coalesce"].split("│")[2:5]] == ["false", "", "true | false"]


def test_show_json_defaults_to_the_profile_in_use_and_notes_env_overrides(workdir: Path) -> None:
    (workdir / "sdr.toml").write_text('[daemon]\nprofile = "legacy"\n')
    r = tune("show", "--json", env={"SDR_TIMEOUTS_AGENT": "12"})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["profile"] == "legacy"
    knobs = {k["key"]: k for k in doc["knobs"]}
    assert list(knobs) == ALL_KEYS
    assert {k: v["value"] for k, v in knobs.items()} == values("legacy")
    agent = knobs["timeouts.agent"]
    assert (agent["value"], agent["unit"], agent["min"], agent["max"]) == (45.0, "s", 0.05, 300)
    assert agent["help"] == "agent call for one turn" and agent["allowed"] == "0.05 to 300"
    assert agent["env_override"] == "SDR_TIMEOUTS_AGENT"  # the file's value is what is shown
    assert knobs["buffer.quiet_window"]["env_override"] is None
    assert all(k["help"] and k["allowed"] and k["kind"] in ("int", "float", "bool", "str") for k in doc["knobs"])


# --- set ------------------------------------------------------------------------------


def test_set_writes_the_values_and_prints_what_changed(mine: Path) -> None:
    before = values("mine")
    r = tune("set", "--profile", "mine", "buffer.quiet_window=0.8", "timeouts.agent=20", "features.typing_presence=no")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "buffer.quiet_window: 1.0 -> 0.8",
        "timeouts.agent: 30.0 -> 20.0",
        "features.typing_presence: true -> false",
        "wrote profiles/mine.toml",
    ]
    after = values("mine")
    changed = {"buffer.quiet_window": 0.8, "timeouts.agent": 20.0, "features.typing_presence": False}
    assert after == {**before, **changed}
    lines = mine.read_text().splitlines()
    assert lines[0] == tuning.HEADER
    keys = [line.split(" = ")[0] for line in lines if " = " in line]
    assert keys == [k.split(".")[1] for k in ALL_KEYS]  # every key, still in order

    # The same values again: nothing to write, the file is left as it is.
    text = mine.read_bytes()
    r = tune("set", "-p", "mine", "buffer.quiet_window=0.8")
    assert r.returncode == 0 and r.stdout.startswith("no change")
    assert mine.read_bytes() == text


def test_set_keeps_a_hand_written_files_order_and_opening_comments(workdir: Path) -> None:
    (workdir / "profiles").mkdir()
    path = workdir / "profiles" / "part.toml"
    shutil.copy(REPO / "tests" / "fast.toml", path)
    r = tune("set", "-p", "part", "buffer.quiet_window=0.3", "limits.history_limit=20", "cache.enabled=false")
    assert r.returncode == 0, r.stderr
    text = path.read_text()
    assert text.startswith(tuning.HEADER + "\n# A profile for tests: the recommended one")
    sections = [line for line in text.splitlines() if line.startswith("[")]
    assert sections == ["[timeouts]", "[buffer]", "[limits]", "[cache]"]
    keys = [line.split(" = ")[0] for line in text.splitlines() if " = " in line]
    # The file's keys in its order (whatever tests/fast.toml holds today), the new ones
    # at the end of their section, a new section at the end.
    original = tomllib.loads((REPO / "tests" / "fast.toml").read_text())
    assert list(original) == ["timeouts", "buffer", "limits"] and "history_limit" not in original["limits"]
    assert keys == [*original["timeouts"], *original["buffer"], *original["limits"], "history_limit", "enabled"]
    p = load_profile("part", {})
    assert (p.buffer.quiet_window, p.limits.history_limit, p.cache.enabled) == (0.3, 20, False)
    # Writing again does not stack our header.
    assert tune("set", "-p", "part", "buffer.quiet_window=0.35").returncode == 0
    assert path.read_text().count("sdrctl tune") == 1


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("buffer.quiet_window", "'buffer.quiet_window': expected KEY=VALUE, e.g. buffer.quiet_window=0.8"),
        ("buffer.quiet_windw=1", "unknown key 'buffer.quiet_windw'; did you mean buffer.quiet_window?"),
        ("quiet_window=1", "unknown key 'quiet_window'; did you mean buffer.quiet_window? a key is section.name"),
        ("timeouts.agent=fast", "timeouts.agent=fast: must be a number from 0.05 to 300 (s)"),
        ("timeouts.agent=301", "timeouts.agent=301: must be a number from 0.05 to 300 (s)"),
        ("pools.db_max_size=2.5", "pools.db_max_size=2.5: must be an integer from 1 to 500"),
        ("buffer.coalesce=maybe", "buffer.coalesce=maybe: must be true or false"),
        (
            "buffer.quiet_window=4",
            "[buffer] windows must satisfy min_window (0.5) <= quiet_window (4) <= extended_window (3)",
        ),
        ("pools.db_min_size=11", "[pools] db_min_size = 11 must not exceed db_max_size = 10"),
        ("buffer.extended_window=21", "[buffer] extended_window = 21 must not exceed [timeouts] message_buffer = 20"),
        (
            "timeouts.knowledge_base=31",
            "[timeouts] knowledge_base = 31 must not exceed agent = 30 while [features] parallel_context is on",
        ),
        ("timeouts.redis_lock_ttl=6", "[timeouts] redis_lock_ttl = 6 must be more than 3 x redis = 2"),
    ],
)
def test_set_refuses_bad_input_and_leaves_the_file_untouched(mine: Path, arg: str, message: str) -> None:
    text = mine.read_bytes()
    r = tune("set", "-p", "mine", "timeouts.webhook=25", arg)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert message in r.stderr
    assert r.stdout == ""
    assert mine.read_bytes() == text
    assert [p.name for p in mine.parent.iterdir()] == ["mine.toml"]  # no temp file left


def test_a_relation_that_only_holds_together_can_be_set_in_one_call(mine: Path) -> None:
    # knowledge_base 40 > agent 30 is refused alone, accepted with a longer agent timeout.
    assert tune("set", "-p", "mine", "timeouts.knowledge_base=40").returncode == 2
    r = tune("set", "-p", "mine", "timeouts.knowledge_base=40", "timeouts.agent=60")
    assert r.returncode == 0, r.stderr
    assert values("mine")["timeouts.knowledge_base"] == 40.0


def test_set_refuses_the_shipped_profiles_outside_the_checkout(workdir: Path) -> None:
    shipped = (REPO / "profiles" / "recommended.toml").read_bytes()
    r = tune("set", "buffer.quiet_window=0.8")  # no sdr.toml here: the profile in use is recommended
    assert r.returncode == 2
    assert "profile 'recommended' ships with sdrctl" in r.stderr
    assert "sdrctl tune new my-recommended --from recommended" in r.stderr
    assert (REPO / "profiles" / "recommended.toml").read_bytes() == shipped


# --- diff and new ---------------------------------------------------------------------


def test_diff_lists_the_keys_that_differ(workdir: Path) -> None:
    a, b = values("recommended"), values("legacy")
    differing = [k for k in ALL_KEYS if a[k] != b[k]]
    assert "buffer.coalesce" in differing and "pools.db_max_size" not in differing

    r = tune("diff", "recommended", "legacy")
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") > 3}
    assert set(rows) - {"key"} == set(differing)
    assert [c.strip() for c in rows["buffer.coalesce"].split("│")[2:4]] == ["true", "false"]

    doc = json.loads(tune("diff", "recommended", "legacy", "--json").stdout)
    assert [k["key"] for k in doc["keys"]] == differing
    assert {"key": "timeouts.agent", "a": 30.0, "b": 45.0, "unit": "s", "changed": True} in doc["keys"]

    every = json.loads(tune("diff", "recommended", "legacy", "--all", "--json").stdout)["keys"]
    assert [k["key"] for k in every] == ALL_KEYS
    assert [k["key"] for k in every if k["changed"]] == differing


def test_new_copies_the_source_values_and_refuses_taken_or_bad_names(workdir: Path) -> None:
    r = tune("new", "black-friday", "--from", "legacy")
    assert r.returncode == 0, r.stderr
    path = workdir / "profiles" / "black-friday.toml"
    assert values("black-friday") == values("legacy")
    assert path.read_text().startswith(tuning.HEADER + "\n# Copied from legacy")
    assert tune("diff", "black-friday", "legacy").stdout.startswith("no differences")

    text = path.read_bytes()
    for name, message in [
        ("black-friday", "profile 'black-friday' exists already"),
        ("legacy", "profile 'legacy' exists already"),  # would shadow the shipped one
        ("Black_Friday", "use lowercase letters, digits, - and _ only"),
        ("../escape", "use lowercase letters, digits, - and _ only"),
    ]:
        r = tune("new", name, "--from", "recommended")
        assert r.returncode == 2 and message in r.stderr, (name, r.stderr)
    assert path.read_bytes() == text
    assert sorted(p.name for p in (workdir / "profiles").iterdir()) == ["black-friday.toml"]


# --- recommend ------------------------------------------------------------------------


def percentile_cont(values: list[float], q: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between the closest ranks."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    return v[lo] + (pos - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])


def expected_timeout(ms: list[float], headroom: float = 3.0) -> float:
    return math.ceil(round(percentile_cont(ms, 0.99) / 1000 * headroom * 100, 6)) / 100


async def insert_turns(url: str, rows: list[tuple[dict[str, float], list[str], list[str], timedelta]]) -> None:
    """Turns with the given stages (ms), timeouts, failures, started this long ago."""
    conn = await asyncpg.connect(url)
    try:
        lead = await conn.fetchval("INSERT INTO leads (phone_number) VALUES ('5511900001111') RETURNING id")
        conv = await conn.fetchval(
            "INSERT INTO conversations (lead_id, phone_number) VALUES ($1, '5511900001111') RETURNING id", lead
        )
        await conn.executemany(
            """INSERT INTO turns (lead_id, conversation_id, messages_joined, first_message_at,
                   last_message_at, started_at, finished_at, buffer_wait_ms, stages, timeouts,
                   failures, agent_backend, outcome)
               VALUES ($1, $2, 1, now() - $6::interval, now() - $6::interval, now() - $6::interval,
                       now() - $6::interval, 0, $3::jsonb, $4, $5, 'playbook', 'ok')""",
            [(lead, conv, json.dumps(stages), timeouts, failures, ago) for stages, timeouts, failures, ago in rows],
        )
    finally:
        await conn.close()


RECENT = timedelta(minutes=5)
AGENT_MS = [10.0 * i for i in range(1, 301)]  # 300 samples
CONTEXT_MS = [0.5 * i for i in range(1, 251)]  # 250 samples
KNOWLEDGE_MS = [3.0 * i for i in range(1, 51)]  # 50: not enough


def known_turns() -> list[tuple[dict[str, float], list[str], list[str], timedelta]]:
    rows = []
    for i, agent in enumerate(AGENT_MS):
        stages = {"agent": agent}
        if i < len(CONTEXT_MS):
            stages["context"] = CONTEXT_MS[i]
        if i < len(KNOWLEDGE_MS):
            stages["knowledge"] = KNOWLEDGE_MS[i]
        rows.append((stages, ["agent"] if agent == AGENT_MS[-1] else [], [], RECENT))
    # Left out: failed stages (how fast they failed) and turns older than --since.
    rows += [({"agent": 1.0, "context": 1.0}, [], ["agent", "context"], RECENT)] * 40
    rows += [({"agent": 900000.0, "context": 900000.0}, [], [], timedelta(days=2))] * 40
    return rows


async def test_recommend_proposes_p99_times_headroom_from_the_turns(clean: Endpoints, mine: Path) -> None:
    await insert_turns(clean.database_url, known_turns())
    text = mine.read_bytes()
    env = {"SDR_DATABASE_URL": clean.database_url}
    r = await asyncio.to_thread(tune, "recommend", "-p", "mine", "--since", "24h", "--json", env=env)
    assert r.returncode == 0, r.stderr
    stages = {s["stage"]: s for s in json.loads(r.stdout)["stages"]}
    agent, context, knowledge = stages["agent"], stages["context"], stages["knowledge"]
    assert (agent["samples"], agent["timed_out"], context["samples"], knowledge["samples"]) == (300, 1, 250, 50)
    for stage, ms in (("agent", AGENT_MS), ("context", CONTEXT_MS)):
        for q in (0.5, 0.95, 0.99):
            assert stages[stage][f"p{round(q * 100)}_ms"] == pytest.approx(percentile_cont(ms, q))
    assert (agent["key"], agent["current"], agent["proposed"]) == ("timeouts.agent", 30.0, expected_timeout(AGENT_MS))
    assert agent["proposed"] == 8.92  # P99 2970.1 ms x 3, rounded up to 0.01 s
    assert (context["key"], context["proposed"]) == ("timeouts.personalization", expected_timeout(CONTEXT_MS))
    assert (knowledge["proposed"], knowledge["note"]) == (None, "not enough samples (50)")
    assert mine.read_bytes() == text  # nothing written without --write

    r = await asyncio.to_thread(tune, "recommend", "-p", "mine", "--headroom", "4", env=env)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if "timeouts.agent" in line)
    assert [c.strip() for c in row.split("│")[1:10]] == [
        "agent",
        "timeouts.agent",
        "300",
        "1",
        f"{percentile_cont(AGENT_MS, 0.5):.1f}",
        f"{percentile_cont(AGENT_MS, 0.95):.1f}",
        "2970.1",
        "30.0",
        str(expected_timeout(AGENT_MS, 4)),
    ]
    assert "not enough samples (50)" in r.stdout


async def test_recommend_since_takes_weeks_and_fractions(clean: Endpoints, mine: Path) -> None:
    # known_turns() has 40 more agent samples two days back: within 2w, not within 1.5h.
    await insert_turns(clean.database_url, known_turns())
    env = {"SDR_DATABASE_URL": clean.database_url}
    for since, samples in (("2w", 340), ("1.5h", 300)):
        r = await asyncio.to_thread(tune, "recommend", "-p", "mine", "--since", since, "--json", env=env)
        assert r.returncode == 0, r.stderr
        agent = next(s for s in json.loads(r.stdout)["stages"] if s["stage"] == "agent")
        assert agent["samples"] == samples


async def test_recommend_write_applies_the_proposals_through_the_validated_write(clean: Endpoints, mine: Path) -> None:
    await insert_turns(clean.database_url, known_turns())
    before = values("mine")
    env = {"SDR_DATABASE_URL": clean.database_url}
    r = await asyncio.to_thread(tune, "recommend", "-p", "mine", "--write", env=env)
    assert r.returncode == 0, r.stderr
    assert f"timeouts.agent: 30.0 -> {expected_timeout(AGENT_MS)}" in r.stdout
    assert "wrote profiles/mine.toml" in r.stdout
    assert values("mine") == {
        **before,
        "timeouts.agent": expected_timeout(AGENT_MS),
        "timeouts.personalization": expected_timeout(CONTEXT_MS),
    }  # knowledge_base kept: not enough samples


async def test_recommend_clamps_to_the_knobs_range(clean: Endpoints, mine: Path) -> None:
    slow = [1000.0 * i for i in range(1, 201)]  # P99 ~199 s: x3 is past the 300 s maximum
    await insert_turns(clean.database_url, [({"agent": ms}, [], [], RECENT) for ms in slow])
    env = {"SDR_DATABASE_URL": clean.database_url}
    r = await asyncio.to_thread(tune, "recommend", "-p", "mine", "--json", env=env)
    assert r.returncode == 0, r.stderr
    agent = next(s for s in json.loads(r.stdout)["stages"] if s["stage"] == "agent")
    assert agent["proposed"] == 300.0 and "cut to the knob's maximum 300 s" in agent["note"]


async def test_recommend_refuses_without_enough_samples(clean: Endpoints, mine: Path) -> None:
    await insert_turns(clean.database_url, [({"agent": 100.0, "context": 5.0}, [], [], RECENT)] * 20)
    text = mine.read_bytes()
    env = {"SDR_DATABASE_URL": clean.database_url}
    r = await asyncio.to_thread(tune, "recommend", "-p", "mine", "--write", env=env)
    assert r.returncode == 1
    assert r.stdout.count("not enough samples (20)") == 2 and "not enough samples (0)" in r.stdout
    assert r.stderr.strip() == "error: no stage has 200 samples in the last 24h; nothing to recommend"
    assert mine.read_bytes() == text
    # Fewer are enough when asked for.
    r = await asyncio.to_thread(tune, "recommend", "-p", "mine", "--min-samples", "20", "--json", env=env)
    assert r.returncode == 0, r.stderr
    agent = next(s for s in json.loads(r.stdout)["stages"] if s["stage"] == "agent")
    assert agent["proposed"] == 0.3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "3x"], "--since '3x': use a number and a unit (s, m, h, d or w), such as 30m, 24h, 7d"),
        (["--since", "0h"], "--since '0h': must be longer than zero"),
        (["--headroom", "1.5"], "--headroom 1.5: must be from 2 to 100"),
        (["--min-samples", "0"], "--min-samples 0: must be at least 1"),
        (["--burst-coverage", "0.3"], "--burst-coverage 0.3: must be from 0.5 to 0.999"),
        (["--burst-coverage", "1"], "--burst-coverage 1: must be from 0.5 to 0.999"),
        (["--burst-coverage", "nan"], "--burst-coverage nan: must be from 0.5 to 0.999"),
    ],
)
def test_recommend_refuses_bad_options_before_touching_the_database(
    workdir: Path, args: list[str], message: str
) -> None:
    # An unreachable database: these must fail on the options, not on the connection.
    r = tune("recommend", *args, env={"SDR_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"})
    assert r.returncode == 2
    assert message in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# --- recommend: the buffer's windows from the pauses inside bursts --------------------

# 250 pauses inside bursts, 0.3 s to 5.28 s, in ms (exact in the database's microseconds).
GAPS_MS = [300 + 20 * k for k in range(250)]


async def insert_bursts(url: str, gaps_ms: list[int], *, agent_ms: float | None = 800.0) -> list[int]:
    """Two leads typing bursts at once, each pause of `gaps_ms` between two of a lead's
    messages, our reply after each burst of up to 5 pauses; plus pauses that must not count:
    a reply between two messages, one over 120 s, messages before the --since window (1h).
    Returns the pauses that count (ms), in the order inserted."""
    conn = await asyncpg.connect(url)
    try:
        now: datetime = await conn.fetchval("SELECT now()")
        counted: list[int] = []
        rows = []
        for n, phone in enumerate(("5511900002221", "5511900002222")):
            lead = await conn.fetchval("INSERT INTO leads (phone_number) VALUES ($1) RETURNING id", phone)
            conv = await conn.fetchval(
                "INSERT INTO conversations (lead_id, phone_number) VALUES ($1, $2) RETURNING id", lead, phone
            )
            await conn.execute(
                """INSERT INTO turns (lead_id, conversation_id, messages_joined, first_message_at,
                       last_message_at, started_at, finished_at, buffer_wait_ms, stages, agent_backend, outcome)
                   VALUES ($1, $2, 1, $3, $3, $3, $3, 0, $4::jsonb, 'playbook', 'ok')""",
                lead,
                conv,
                now - timedelta(minutes=1),
                json.dumps({} if agent_ms is None else {"agent": agent_ms}),
            )
            mine = gaps_ms[n::2]
            at = now - timedelta(minutes=55) + timedelta(milliseconds=7 * n)  # the leads' messages interleave
            # Before the window: a 10 ms pause that must not count.
            old = now - timedelta(hours=2)
            rows += [(conv, lead, "in", old), (conv, lead, "in", old + timedelta(milliseconds=10))]
            for i in range(0, len(mine), 5):
                rows.append((conv, lead, "in", at))
                for gap in mine[i : i + 5]:
                    at += timedelta(milliseconds=gap)
                    rows.append((conv, lead, "in", at))
                    counted.append(gap)
                at += timedelta(seconds=1)
                rows.append((conv, lead, "out", at))  # our reply: the next message starts a burst
                at += timedelta(milliseconds=900)
            if n == 0:  # 120 s apart counts (a slow typist); 120.5 s is a new conversation
                rows += [
                    (conv, lead, "in", at),
                    (conv, lead, "in", at + timedelta(seconds=120)),
                    (conv, lead, "in", at + timedelta(seconds=240.5)),
                ]
                counted.append(120_000)
        await conn.executemany(
            """INSERT INTO messages (conversation_id, lead_id, direction, body, provider_ts, received_at)
               VALUES ($1, $2, $3, 'oi', $4, $4)""",
            rows,
        )
        assert max(r[3] for r in rows) < now
        return counted
    finally:
        await conn.close()


def percentile_disc(values: list[int], q: float) -> int:
    """PostgreSQL's percentile_disc: the first value whose position reaches the fraction."""
    v = sorted(values)
    return v[max(math.ceil(q * len(v)) - 1, 0)]


def tenth_up(ms: int) -> float:
    return math.ceil(Decimal(ms) / 100) / 10


def over(gaps_ms: list[int], seconds: float) -> int:
    return sum(g > Decimal(repr(seconds)) * 1000 for g in gaps_ms)


async def test_recommend_proposes_settle_window_from_the_gaps_inside_bursts(clean: Endpoints, mine: Path) -> None:
    gaps = await insert_bursts(clean.database_url, GAPS_MS)
    assert sorted(gaps) == sorted([*GAPS_MS, 120_000])
    current = values("mine")
    env = {"SDR_DATABASE_URL": clean.database_url}
    r = await asyncio.to_thread(tune, "recommend", "-p", "mine", "--since", "1h", "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    buffer = doc["buffer"]
    assert (buffer["max_gap_s"], buffer["burst_coverage"], buffer["notes"]) == (120.0, 0.98, [])
    g = buffer["gaps"]
    assert g["samples"] == len(gaps) == 251
    seconds = [ms / 1000 for ms in gaps]
    for q in (0.5, 0.9, 0.95, 0.98, 0.99):
        assert g[f"p{round(q * 100)}_s"] == pytest.approx(percentile_cont(seconds, q)), q
    assert g["p50_s"] == pytest.approx(2.8)
    # 98 % of 251 gaps: the 246th shortest, 5.2 s.
    assert g["covering_s"] == tenth_up(percentile_disc(gaps, 0.98)) == 5.2
    settle, quiet = buffer["proposals"]
    assert settle["key"] == "buffer.settle_window" and settle["proposed"] == 5.2
    assert settle["current"] == current["buffer.settle_window"]
    assert "98 % of the gaps at or below it, rounded up to 0.1 s" in settle["rule"]
    # The median pause (2.8 s) is longer than quiet_window (1.0 s in recommended): unchanged.
    window = current["buffer.quiet_window"]
    assert window < 2.8 and (quiet["key"], quiet["current"], quiet["proposed"]) == (
        "buffer.quiet_window",
        window,
        window,
    )
    assert "min(current, P50 gap)" in quiet["rule"] and quiet["note"] == "unchanged: the median pause is not shorter"

    curve = {p["settle_window_s"]: p for p in buffer["curve"]}
    assert list(curve) == sorted({1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, current["buffer.settle_window"], 5.2})
    for s, point in curve.items():
        assert point["gaps_over"] == over(gaps, s), s
        assert point["share_over"] == pytest.approx(over(gaps, s) / 251)
        assert point["added_wait_max_s"] == pytest.approx(max(0.0, s - window))
        assert point["added_wait_p50_s"] == pytest.approx(max(0.0, s - window - 0.8))  # the agent's P50: 800 ms
    assert curve[5.2]["marks"] == ["proposed"] and curve[5.2]["gaps_over"] == 4 + 1  # 5220..5280 ms, and 120 s
    assert "current" in curve[current["buffer.settle_window"]]["marks"]
    assert curve[2.0]["gaps_over"] == (250 - 86) + 1  # 2020..5280 ms, and 120 s

    # No stage has enough samples: the buffer's proposal alone is what --write would apply.
    agent = next(s for s in doc["stages"] if s["stage"] == "agent")
    assert (agent["samples"], agent["proposed"]) == (2, None)
    assert "write_refused" not in doc

    # The text says the same, rules included.
    r = await asyncio.to_thread(tune, "recommend", "-p", "mine", "--since", "1h", env=env)
    assert r.returncode == 0, r.stderr
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
        for line in r.stdout.splitlines()
        if line.count("│") > 3
    }
    assert rows["251"] == [f"{percentile_cont(seconds, q):.2f}" for q in (0.5, 0.9, 0.95, 0.98, 0.99)]
    assert rows["5.2"] == ["5", "1.99 %", f"{5.2 - window:.2f}", f"{5.2 - window - 0.8:.2f}", "proposed"]
    assert rows["buffer.settle_window"][:2] == [str(current["buffer.settle_window"]), "5.2"]
    assert "rule: settle_window = the shortest in-burst gap with at least 98 % of the gaps at or below it" in r.stdout
    assert "rule: quiet_window = min(current, P50 gap)" in r.stdout


async def test_recommend_writes_the_buffer_windows_and_shortens_a_long_quiet_window(
    clean: Endpoints, mine: Path
) -> None:
    await insert_bursts(clean.database_url, GAPS_MS)
    assert tune("set", "-p", "mine", "buffer.extended_window=4.5", "buffer.quiet_window=4").returncode == 0
    before = values("mine")
    env = {"SDR_DATABASE_URL": clean.database_url}
    r = await asyncio.to_thread(
        tune, "recommend", "-p", "mine", "--since", "1h", "--burst-coverage", "0.9", "--write", env=env
    )
    assert r.returncode == 0, r.stderr
    # 90 % of 251: the 226th shortest gap, 4.8 s; the median 2.8 s is shorter than quiet_window 4.
    assert tenth_up(percentile_disc([*GAPS_MS, 120_000], 0.9)) == 4.8
    assert f"buffer.settle_window: {before['buffer.settle_window']} -> 4.8" in r.stdout
    assert "buffer.quiet_window: 4.0 -> 2.8" in r.stdout
    assert values("mine") == {**before, "buffer.settle_window": 4.8, "buffer.quiet_window": 2.8}

    # With a P50 (0.225 s) below min_window (0.5 s in recommended), quiet_window stops at min_window.
    await asyncpg_execute(clean.database_url, "TRUNCATE leads, conversations, messages, turns RESTART IDENTITY CASCADE")
    await insert_bursts(clean.database_url, [100 + k for k in range(250)])
    r = await asyncio.to_thread(tune, "recommend", "-p", "mine", "--since", "1h", "--json", env=env)
    quiet = json.loads(r.stdout)["buffer"]["proposals"][1]
    low = before["buffer.min_window"]
    assert low > 0.2 and (quiet["current"], quiet["proposed"], quiet["note"]) == (
        2.8,
        low,
        f"raised to min_window {low:g} s",
    )


async def asyncpg_execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_recommend_makes_no_buffer_change_with_too_few_gaps(clean: Endpoints, mine: Path) -> None:
    await insert_turns(clean.database_url, known_turns())  # enough stage samples
    gaps = await insert_bursts(clean.database_url, GAPS_MS[:150], agent_ms=None)
    before = values("mine")
    env = {"SDR_DATABASE_URL": clean.database_url}
    r = await asyncio.to_thread(tune, "recommend", "-p", "mine", "--since", "1h", "--write", env=env)
    assert r.returncode == 0, r.stderr
    assert f"note: not enough in-burst gaps ({len(gaps)} < --min-samples 200): no buffer change" in r.stdout
    after = values("mine")
    assert after["timeouts.agent"] == expected_timeout(AGENT_MS)  # the stages' proposals are written
    assert {k: v for k, v in after.items() if k.startswith("buffer.")} == {
        k: v for k, v in before.items() if k.startswith("buffer.")
    }
    # Fewer are enough when asked for.
    r = await asyncio.to_thread(
        tune, "recommend", "-p", "mine", "--since", "1h", "--min-samples", "150", "--json", env=env
    )
    assert r.returncode == 0, r.stderr
    settle = json.loads(r.stdout)["buffer"]["proposals"][0]
    assert settle["proposed"] == tenth_up(percentile_disc(gaps, 0.98)) and settle["note"] == ""


def test_propose_buffer_rules() -> None:
    """The rules on hand-made gap figures: the knob's bounds, speculate off, min_window."""
    shipped = tuning.read(str(REPO / "profiles" / "recommended.toml"))
    p = dataclasses.replace(shipped, buffer=dataclasses.replace(shipped.buffer, speculate=True, coalesce=True))
    b = p.buffer
    thresholds = tuning.gap_thresholds(p)
    gaps = tuning.GapStats(
        300,
        {0.5: 0.05, 0.9: 3.0, 0.95: 4.0, 0.98: 130.0, 0.99: 150.0},
        130.0,
        {**dict.fromkeys(thresholds, 7), 130.0: 0},
    )
    out = tuning.propose_buffer(p, gaps, 0.98, 200, agent_p50_ms=None)
    settle, quiet = out.changes
    assert (settle.proposed, settle.note) == (120.0, "cut to the knob's maximum 120 s")
    assert (quiet.proposed, quiet.note) == (b.min_window, f"raised to min_window {b.min_window:g} s")
    assert [c.marks for c in out.curve if c.settle_window_s == 120.0] == [("proposed",)]
    assert all(c.added_wait_p50_s is None for c in out.curve)

    off = dataclasses.replace(p, buffer=dataclasses.replace(b, speculate=False))
    out = tuning.propose_buffer(off, gaps, 0.98, 200)
    assert out.changes[1].proposed == b.quiet_window and "speculate is off" in out.changes[1].note
    assert any("speculate is off" in n for n in out.notes)

    few = tuning.propose_buffer(p, dataclasses.replace(gaps, samples=199), 0.98, 200)
    assert [c.proposed for c in few.changes] == [None, None]
    assert few.notes == ["not enough in-burst gaps (199 < --min-samples 200): no buffer change"]
