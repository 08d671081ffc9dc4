"""The Grafana dashboard of deploy/grafana (issue #20): provisioning-ready (uid, title,
schemaVersion, a `datasource` variable every query uses; the provisioning YAML), the SLO
lines at sdr.toml's defaults, every panel's PromQL accepted by promtool's parser, and every
series the dashboard, the alert rules and their unit tests name (metric, label names, label
values) one a real daemon exports: one is started in-process, answers a lead, and its
/metrics is read. A labelled family with no sample yet still has its # HELP and # TYPE
lines there (prometheus_client prints every registered family), which is what is read."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml  # PyYAML: locked, via uvicorn[standard]
from prometheus_client.metrics import MetricWrapperBase

from daemon.config import SloSettings
from daemon.embedded import Endpoints
from daemon.metrics import Metrics
from tests.helpers import event, fetch, make_config, run_daemon, wait_for
from tests.test_alerts import (
    REPO,
    Selector,
    names,
    promtool,
    recorded,
    rule_exprs,
    unit_test_exprs,
    unit_test_series,
)

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "sdrctl.json"
PROVISIONING = GRAFANA / "provisioning"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's variables, replaced by what they stand for so that promtool can parse the query.
VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "$job": "sdrctl", "$instance": ".*"}
# Series Prometheus makes itself, not the daemon.
PROMETHEUS_OWN = {"up": {"job", "instance"}}
# Labels Prometheus adds to every scraped series (a daemon's own `job` becomes exported_job).
TARGET_LABELS = {"job", "instance"}
PHONE = "5511944443333"


# --- the dashboard ---------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def grafana_free(query: str) -> str:
    for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        query = query.replace(name, value)
    assert "$" not in query, f"a Grafana variable this test does not know: {query}"
    return query


def panel_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel's targets, variables replaced."""
    return [
        (f"panel {p['id']} {p['title']!r} {t['refId']}", grafana_free(t["expr"]))
        for p in panels()
        for t in p.get("targets", [])
    ]


def variable_selectors() -> list[tuple[str, str, str]]:
    """(variable, selector, label) of every `label_values(selector, label)` variable."""
    out = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)", query.strip())
        assert m, f"variable {var['name']}: {query!r} is not label_values(selector, label)"
        out.append((var["name"], grafana_free(m[1]), m[2]))
    return out


def thresholds(title: str) -> list[float]:
    [panel] = [p for p in panels() if p["title"] == title]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return [s["value"] for s in steps if s["value"] is not None]


def test_the_dashboard_is_ready_for_provisioning() -> None:
    board = dashboard()
    assert board["uid"] == "sdrctl" and board["title"] and isinstance(board["schemaVersion"], int)
    assert board["schemaVersion"] >= 36  # panels' datasource as {type, uid} objects
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels():
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == DATASOURCE and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        assert all(t["datasource"] == DATASOURCE and t["expr"].strip() for t in p["targets"]), p["title"]
    for name in ("job", "instance"):
        assert variables[name]["datasource"] == DATASOURCE

    [provider] = yaml.safe_load((PROVISIONING / "dashboards" / "sdrctl.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    [source] = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] and source["access"] == "proxy"


def test_the_dashboard_has_the_kpis_against_the_slos() -> None:
    slo = SloSettings()
    assert thresholds("Response P95 (range)") == [slo.response_p95]
    assert thresholds("Response time P50 / P95 / P99 vs the 5 s SLO") == [slo.response_p95]
    assert thresholds("Timeout rate (range)") == [slo.timeout_rate]
    assert thresholds("Timeout rate by stage vs the 1 % SLO") == [slo.timeout_rate]
    assert thresholds("Cache hit rate (range)") == [slo.cache_hit_rate]
    assert thresholds("Cache hit rate by cache vs the 80 % SLO") == [slo.cache_hit_rate]
    assert thresholds("Replies over 5 s (range; budget 5 %)") == [round(1 - 0.95, 2)]
    queries = " ".join(q for _, q in panel_queries())
    wanted = [
        "sdr_stage_seconds_bucket",
        'stage="hold"',
        'reason="newer_message"',
        "sdr_active_leads",
        "sdr_cache_hits_total",
        "sdr_turns_in_flight",
        "sdr_outbox_backlog_oldest_seconds",
        "sdr_agent_tokens_total",
        "sdr_agent_cost_total",
        "sdr_agent_tool_calls_total",
        "sdr_knowledge_fulltext_only_total",
        "sdr_followups_total",
        "sdr_handover_total",
        "by (le, instance)",
        "process_start_time_seconds",
        "sdr_dependency_up",
        "sdr_outbox_backlog",
    ]
    assert not [w for w in wanted if w not in queries]
    assert any("{{instance}}" in t["legendFormat"] for p in panels() for t in p.get("targets", []))


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses PromQL without a server when it checks rules: each query becomes a
    recording rule of a scratch file."""
    queries = panel_queries() + [(f"variable {v}", sel) for v, sel, _ in variable_selectors()]
    assert len(queries) > 40
    records = {f"dashboard:query_{i}": (where, q) for i, (where, q) in enumerate(queries)}
    groups = {"groups": [{"name": "dashboard", "rules": [{"record": r, "expr": q} for r, (_, q) in records.items()]}]}
    scratch = tmp_path / "dashboard-rules.yml"
    scratch.write_text(yaml.safe_dump(groups, sort_keys=False))
    done = promtool("check", "rules", scratch)
    failed = [f"{r}: {w}: {q}" for r, (w, q) in records.items() if f'"{r}"' in done.stdout + done.stderr]
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n" + "\n".join(failed)
    assert f"SUCCESS: {len(records)} rules found" in done.stdout


# --- what the daemon exports -------------------------------------------------------------------


@dataclass
class Exported:
    samples: set[str]  # sample names the exposition has, or would once a labelled family is used
    labels: dict[str, set[str]]  # sample name -> the labels Prometheus stores it with
    buckets: dict[str, set[str]]  # histogram _bucket -> its `le` values


SUFFIXES = {
    "counter": lambda n: {n, n.removesuffix("_total") + "_created"},
    "histogram": lambda n: {n + s for s in ("_bucket", "_sum", "_count", "_created")},
    "summary": lambda n: {n, n + "_sum", n + "_count", n + "_created"},
    "gauge": lambda n: {n},
    "untyped": lambda n: {n},
}


def stored(labels: set[str] | tuple[str, ...]) -> set[str]:
    """A scraped series' labels: the target's job and instance; the daemon's own become exported_*."""
    return {f"exported_{x}" if x in TARGET_LABELS else x for x in labels} | TARGET_LABELS


def exported(exposition: str, metrics: Metrics) -> Exported:
    samples: set[str] = set()
    buckets: dict[str, set[str]] = defaultdict(set)
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            samples |= SUFFIXES[kind](family)
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s", line)
            assert m, line
            samples.add(m[1])
            if m[1].endswith("_bucket"):
                le = re.search(r'le="([^"]*)"', m[2] or "")
                assert le, line
                buckets[m[1]].add(le[1])
    # The label names of a family with no sample yet are not in the exposition: the
    # registry's metric objects have them (prometheus_client's _name/_type/_labelnames).
    labels = {name: set(TARGET_LABELS) for name in samples}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            kind, family = metric._type, metric._name
            if kind == "counter":
                family += "_total"
            for name in SUFFIXES[kind](family):
                assert name in samples, f"{name} is registered but not in /metrics"
                labels[name] = stored(metric._labelnames) | ({"le"} if name.endswith("_bucket") else set())
    return Exported(samples, labels, buckets)


def daemon_literals() -> set[str]:
    """Every string literal of the daemon's code: where a label value must come from."""
    text = "\n".join(p.read_text() for p in (REPO / "daemon").rglob("*.py"))
    return set(re.findall(r"""["']([a-z][a-z0-9_-]*)["']""", text))


def values(op: str, value: str) -> list[str]:
    """The plain values a matcher names (a regex's alternatives without metacharacters)."""
    if op in ("=", "!="):
        return [value]
    return [v for v in value.split("|") if re.fullmatch(r"[a-z0-9_-]+", v)]


def check(where: str, selector: Selector, got: Exported, allowed: set[str], literals: set[str]) -> list[str]:
    """What is wrong with one selector: an unknown metric, label, `le` or label value."""
    metric = selector.metric
    if metric in PROMETHEUS_OWN:
        known = PROMETHEUS_OWN[metric]
    elif metric in got.samples:
        known = got.labels[metric]
    elif metric in allowed:  # a recorded series: aggregated by job
        return []
    else:
        return [f"{where}: {metric} is not a series the daemon exports"]
    problems = []
    for label, op, value in selector.matchers:
        if label not in known:
            problems.append(f"{where}: {metric} has no label {label} (it has {sorted(known)})")
        elif label == "le":
            if value not in got.buckets[metric]:
                problems.append(f"{where}: {metric} has no bucket le={value!r} ({sorted(got.buckets[metric])})")
        elif label not in TARGET_LABELS and metric not in PROMETHEUS_OWN:
            problems += [
                f"{where}: {metric}{{{label}={v!r}}}: the daemon's code never names {v!r}"
                for v in values(op, value)
                if v not in literals
            ]
    return problems


async def scrape_after_one_turn(clean: Endpoints) -> tuple[str, Metrics]:
    async with run_daemon(make_config(clean)) as d, httpx.AsyncClient(base_url=d.url) as http:
        resp = await http.post("/webhook/evolution", json=event(PHONE, "Oi, meu nome é Rita. Quanto custa?"))
        assert resp.status_code == 200
        await wait_for(lambda: fetch(clean.database_url, "SELECT 1 FROM turns WHERE response_ms IS NOT NULL"))
        scraped = await http.get("/metrics")
        assert scraped.status_code == 200
        return scraped.text, d.runtime.metrics


async def test_every_series_named_is_one_the_daemon_exports(clean: Endpoints) -> None:
    exposition, metrics = await scrape_after_one_turn(clean)
    got = exported(exposition, metrics)
    # The reply was measured (so the buckets' `le` are read), and labelled families never
    # used in this turn are there by their # TYPE line.
    assert "sdr_response_time_seconds_bucket" in got.buckets and "sdr_stage_seconds_bucket" in got.buckets
    assert "sdr_send_errors_total" in got.samples and "sdr_send_errors_total{" not in exposition
    literals = daemon_literals()
    records = recorded()
    vocabulary = set().union(*got.labels.values()) | {"le"}

    problems: list[str] = []
    dashboard_queries = panel_queries() + [(f"variable {v}", sel) for v, sel, _ in variable_selectors()]
    for where, query in dashboard_queries:  # works without the rules: raw series only
        found = names(query)
        for s in found.selectors:
            problems += check(f"dashboard {where}", s, got, set(), literals)
        problems += [f"dashboard {where}: no label {x}" for x in found.grouping - vocabulary]
    for _, _, label in variable_selectors():
        problems += [f"dashboard variable: no label {label}"] if label not in vocabulary else []
    rule_queries = [("rules", q) for q in rule_exprs()] + [("rule unit tests", q) for q in unit_test_exprs()]
    for where, query in rule_queries:
        found = names(query)
        for s in found.selectors:
            problems += check(where, s, got, records, literals)
        problems += [f"{where}: no label {x} in {query!r}" for x in found.grouping - vocabulary]
    for s in unit_test_series():  # what the unit tests feed the rules is what Prometheus would store
        problems += check("rule unit test input", s, got, set(), literals)
    assert not problems, "\n".join(sorted(set(problems)))

    named = {s.metric for _, q in dashboard_queries + rule_queries for s in names(q).selectors}
    assert len(named - records - set(PROMETHEUS_OWN)) >= 25  # the checks above did look at something
