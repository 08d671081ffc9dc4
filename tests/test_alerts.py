"""The Prometheus rules of deploy/prometheus (issue #20): promtool accepts them and runs
their unit tests (deploy/prometheus/tests); every alert has a severity (page or ticket),
a summary, a description and a runbook naming `sdrctl` commands that exist, a comment
saying its threshold and why, and unit tests where it fires and where it stays quiet
although a naive rule would fire. The SLO numbers in the rules are sdr.toml's.

The PromQL helpers here (metric names, matchers, grouping labels) are shared with
tests/test_dashboard.py, which checks every series named against a real daemon's /metrics."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml  # PyYAML: locked, via uvicorn[standard]

from daemon.config import SloSettings
from daemon.metrics import BUCKETS
from sdrctl.main import app

REPO = Path(__file__).resolve().parent.parent
RULES_DIR = REPO / "deploy" / "prometheus"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
UNIT_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
EXAMPLE_CONFIG = RULES_DIR / "example" / "prometheus.yml"
SEVERITIES = {"page", "ticket"}
ANNOTATIONS = {"summary", "description", "runbook"}


# --- promtool ------------------------------------------------------------------------------


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Runs promtool; a machine without it fails the test (never skips it)."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(
            "promtool is not installed: run scripts/system-deps (as root it installs Debian's "
            "`prometheus` package, which has promtool; otherwise it says what to install)",
            pytrace=False,
        )
    return subprocess.run([binary, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_ok(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, f"{' '.join(done.args)}\n{done.stdout}\n{done.stderr}"


# --- the files -----------------------------------------------------------------------------


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> Iterator[dict[str, Any]]:
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            yield from group["rules"]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def recorded() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def unit_tests() -> Iterator[dict[str, Any]]:
    for path in UNIT_TESTS:
        yield from load(path)["tests"]


_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def seconds(duration: str | int) -> float:
    """A Prometheus duration ("1h5m", "90s") in seconds."""
    text = str(duration)
    parts = _DURATION.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


# --- PromQL, roughly: enough to find what an expression names --------------------------------

_TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)"""
    r"|(?P<matchers>\{[^}]*\})"
    r"|(?P<range>\[[^\]]*\])"
    r"|(?P<duration>(?:\d+(?:ms|s|m|h|d|w|y))+)(?![a-zA-Z0-9_:])"
    r"|(?P<number>(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)"
    r"|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"|(?P<other>\S)",
    re.IGNORECASE,
)
_MATCHER = re.compile(r"""\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?""")
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk"}
KEYWORDS = GROUPING | AGGREGATIONS | {"quantile", "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)


@dataclass
class Names:
    selectors: list[Selector]
    grouping: set[str]  # labels in by/without/on/ignoring/group_left/group_right lists


def matchers(block: str) -> tuple[tuple[str, str, str], ...]:
    """`{a="x", b=~"y|z"}` -> (("a", "=", "x"), ("b", "=~", "y|z"))."""
    inner, found, pos = block.strip()[1:-1], [], 0
    while inner[pos:].strip():
        m = _MATCHER.match(inner, pos)
        assert m, f"cannot read the matchers {block!r}"
        found.append((m[1], m[2], m[3]))
        pos = m.end()
    return tuple(found)


def names(expr: str) -> Names:
    """The series an expression selects (metric names with their matchers) and the labels
    its aggregations and vector matching name."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    out = Names([], set())
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        after = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident" and text.lower() in GROUPING and after[1] == "(":
            j = i + 2
            while tokens[j][1] != ")":
                if tokens[j][0] == "ident":
                    out.grouping.add(tokens[j][1])
                j += 1
            i = j + 1
            continue
        if kind == "ident" and text.lower() not in KEYWORDS and after[1] != "(":
            found = matchers(after[1]) if after[0] == "matchers" else ()
            out.selectors.append(Selector(text, found))
        assert kind != "matchers" or (i and tokens[i - 1][0] == "ident"), f"a selector without a name in {expr!r}"
        i += 1
    return out


def rule_exprs() -> list[str]:
    return [r["expr"] for r in rules()]


def unit_test_series() -> list[Selector]:
    """The input series of the unit tests, as selectors (metric name and labels)."""
    out = []
    for test in unit_tests():
        for series in test.get("input_series", []):
            out += names(series["series"]).selectors
    return out


def unit_test_exprs() -> list[str]:
    return [case["expr"] for test in unit_tests() for case in test.get("promql_expr_test", [])]


# --- the tests -----------------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    assert RULE_FILES, "no rules in deploy/prometheus"
    done = promtool("check", "rules", *RULE_FILES)
    assert_ok(done)
    assert "SUCCESS" in done.stdout and "WARNING" not in done.stdout + done.stderr


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    assert UNIT_TESTS, "no unit tests in deploy/prometheus/tests"
    assert_ok(promtool("test", "rules", *UNIT_TESTS))


def test_the_example_prometheus_config_loads_the_rules() -> None:
    done = promtool("check", "config", EXAMPLE_CONFIG)
    assert_ok(done)
    config = load(EXAMPLE_CONFIG)
    loaded = {(EXAMPLE_CONFIG.parent / f).resolve() for f in config["rule_files"]}
    assert loaded == {p.resolve() for p in RULE_FILES}
    [job] = config["scrape_configs"]
    # The alerts' up{job="sdrctl"}; and the daemon's own `job` label must arrive as exported_job.
    assert job["job_name"] == "sdrctl" and job.get("honor_labels", False) is False
    assert 'up{job="sdrctl"}' in alerts()["SdrDaemonDown"]["expr"]


def test_every_alert_says_how_bad_what_and_what_to_do() -> None:
    found = alerts()
    assert len(found) >= 10
    for name, rule in found.items():
        assert rule["labels"]["severity"] in SEVERITIES, name
        notes = rule["annotations"]
        assert ANNOTATIONS <= set(notes), f"{name}: missing {ANNOTATIONS - set(notes)}"
        assert all(str(notes[a]).strip() for a in ANNOTATIONS), name
        assert "\n" not in notes["runbook"].strip(), f"{name}: the runbook is one line"
        assert "`sdrctl " in notes["runbook"], f"{name}: the runbook names no sdrctl command"
        assert name.startswith("Sdr") and re.fullmatch(r"[A-Za-z0-9]+", name), name


def test_every_alert_has_a_comment_with_its_threshold() -> None:
    """Each `- alert:` is preceded by a comment (its threshold and why)."""
    for path in RULE_FILES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("- alert:"):
                comment = []
                j = i - 1
                while j >= 0 and lines[j].strip().startswith("#"):
                    comment.insert(0, lines[j].strip("# "))
                    j -= 1
                text = " ".join(comment)
                assert re.search(r"\d", text) and len(text) > 60, f"{path.name}: {line.strip()} has no comment"


def sdrctl_commands(text: str) -> list[list[str]]:
    return [shlex.split(m) for m in re.findall(r"`(sdrctl [^`]+)`", text)]


def test_the_sdrctl_commands_in_the_runbooks_exist() -> None:
    """`sdrctl leads list --status unreachable`: the command and its options, as the CLI has them."""
    cli = typer.main.get_command(app)  # typer's own (vendored) click: duck-typed here
    ctx = typer.Context(cli)
    seen = 0
    for name, rule in alerts().items():
        for words in sdrctl_commands(rule["annotations"]["runbook"]):
            command: Any = cli
            args = words[1:]
            while args and hasattr(command, "get_command") and not args[0].startswith("-"):
                sub = command.get_command(ctx, args[0])
                assert sub is not None, f"{name}: no command {' '.join(words)!r}"
                command, args = sub, args[1:]
            options = {o for p in command.params for o in p.opts}
            for word in args:
                if word.startswith("-"):
                    assert word in options, f"{name}: {' '.join(words)!r}: no option {word}"
            seen += 1
    assert seen >= len(alerts())


def test_every_alert_fires_and_stays_quiet_in_a_unit_test() -> None:
    """For each alert: a case where it fires (with its severity and every annotation: promtool
    compares them whole), and a quiet case at a time where a naive rule would fire, which
    the test proves with a promql_expr_test at that same time."""
    found = alerts()
    firing: dict[str, int] = dict.fromkeys(found, 0)
    quiet: dict[str, int] = dict.fromkeys(found, 0)
    for test in unit_tests():
        naive_at = {seconds(case["eval_time"]) for case in test.get("promql_expr_test", [])}
        for case in test.get("alert_rule_test", []):
            name = case["alertname"]
            assert name in found, f"{test['name']}: no alert {name}"
            if case.get("exp_alerts"):
                firing[name] += 1
                for exp in case["exp_alerts"]:
                    assert exp["exp_labels"]["severity"] == found[name]["labels"]["severity"], test["name"]
                    assert set(exp["exp_annotations"]) == set(found[name]["annotations"]), test["name"]
            elif seconds(case["eval_time"]) in naive_at:
                quiet[name] += 1
    assert not [n for n, c in firing.items() if not c], "alerts no unit test fires"
    assert not [n for n, c in quiet.items() if not c], "alerts with no quiet case where a naive rule fires"


def test_the_rules_use_the_slos_of_sdr_toml() -> None:
    """The rules cannot read sdr.toml: its [slo] (and the code's defaults) must be the
    numbers they were written for, else this says to change them."""
    slo = tomllib.loads((REPO / "sdr.toml").read_text())["slo"]
    defaults = SloSettings()
    assert (slo["response_p95"], slo["timeout_rate"]) == (defaults.response_p95, defaults.timeout_rate)
    assert defaults.response_p95 in BUCKETS, "the P95 SLO must be a bucket bound of sdr_response_time_seconds"
    bound = f'le="{float(defaults.response_p95)}"'
    text = "".join(path.read_text() for path in RULE_FILES)
    budget = round(1 - 0.95, 2)  # P95: 5 % of replies may be slower
    found = alerts()
    for name in ("SdrResponseTimeBudgetBurnFast", "SdrResponseTimeBudgetBurnSlow"):
        assert f"* {budget})" in found[name]["expr"], name
    for name in ("SdrTimeoutBudgetBurnFast", "SdrTimeoutBudgetBurnSlow"):
        assert f"* {defaults.timeout_rate})" in found[name]["expr"], name
    assert bound in text and text.count('le="') == text.count(bound), f"every `le` of the rules must be {bound}"


def test_the_promql_reader_finds_names_matchers_and_labels() -> None:
    """The reader tests/test_dashboard.py relies on, on the shapes the rules use."""
    got = names(
        'sum by (job) (rate(a_total{x="1",y=~"b|c"}[5m])) / ignoring (stage) group_left '
        "sum(rate(b_bucket[1h])) > (14.4 * 0.05) and on () (hour() >= 13) or vector(0) * c"
    )
    assert [s.metric for s in got.selectors] == ["a_total", "b_bucket", "c"]
    assert got.selectors[0].matchers == (("x", "=", "1"), ("y", "=~", "b|c"))
    assert got.grouping == {"job", "stage"}
    assert [s.metric for s in names("1e3 * up offset 5m").selectors] == ["up"]
    assert seconds("1h5m") == 3900 and seconds("87h") == 87 * 3600
