"""`sdrctl profile`: where a lead's wait goes.

Two views of one run. The call tree: a bench workload drives a daemon inside this process
under pyinstrument, trimmed to the pipeline's own frames. The stage breakdown: each turn's
recorded timings, summed, as shares of the response time (the lead's last message ->
reply sent), which names the bottleneck. For a daemon already running, the breakdown
comes from its /metrics instead, with no load added."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families
from pyinstrument import Profiler, processors
from pyinstrument.frame import Frame
from pyinstrument.frame_ops import delete_frame_from_tree
from pyinstrument.renderers import ConsoleRenderer, HTMLRenderer, JSONRenderer
from pyinstrument.renderers.base import ProcessorList
from pyinstrument.session import Session

from daemon.config import Config, Profile, load_config
from daemon.errors import SdrError
from daemon.store import init_connection
from daemon.testing.fake_evolution import run_fake_evolution
from daemon.tools.bench import ProfileResult, Progress, drive
from daemon.tools.bursts import percentile
from daemon.tools.daemons import scaled_overrides, scaled_spec
from daemon.tools.inprocess import InProcessDaemon, inprocess_daemon
from daemon.tools.workload import Workload

# The order rows are shown in: a turn's life from the buffer to the reply.
ORDER = ("buffer wait", "context", "knowledge", "agent", "store + send", "store", "send")
REPLY = "store + send"  # a turn's stages are recorded before it is stored: finished_at -> reply sent
REST = "overhead"  # what the response time holds beyond the rows above
REST_UNSPLIT = "buffer wait + overhead"  # /metrics has no window series to split them

# --- the stage breakdown ---------------------------------------------------------------


@dataclass(frozen=True)
class StageRow:
    name: str
    p50_ms: float | None
    p95_ms: float | None
    mean_ms: float | None
    total_ms: float  # summed over the turns
    share: float  # of the summed response time
    on_path: bool  # adds to the response time; knowledge runs beside context and agent


@dataclass(frozen=True)
class Breakdown:
    source: str
    turns: int
    response_p50_ms: float | None
    response_p95_ms: float | None
    response_mean_ms: float | None
    rows: list[StageRow]

    def ranked(self) -> list[StageRow]:
        return sorted((r for r in self.rows if r.on_path), key=lambda r: r.share, reverse=True)

    def bottleneck(self) -> str:
        """One line: the stage holding the largest share of response time, and the next."""
        top = self.ranked()
        if not top:
            return "bottleneck: unknown (no answered turns)"
        line = f"bottleneck: {top[0].share * 100:.0f} % of response time is {top[0].name}"
        if len(top) > 1:
            line += f"; next: {top[1].name} {top[1].share * 100:.0f} %"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bottleneck": self.bottleneck()}


def _ordered(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def breakdown_from_turns(rows: list[Mapping[str, Any]], *, parallel_knowledge: bool) -> Breakdown:
    """From turn records (response_ms, window_ms, stages, reply_ms). The buffer's share is
    the window it chose; its lag past the window, the lock and the time between stages are
    overhead, as in the bench (response - window - the turn's own stages)."""
    answered = [r for r in rows if r["response_ms"] is not None and r["window_ms"] is not None]
    series: dict[str, list[float]] = {"buffer wait": [r["window_ms"] for r in answered]}
    if answered:
        series[REPLY] = [r["reply_ms"] for r in answered]
    rest: list[float] = []
    for r in answered:
        left = r["response_ms"] - r["window_ms"] - r["reply_ms"]
        for stage, ms in r["stages"].items():
            series.setdefault(stage, []).append(ms)
            if stage != "knowledge" or not parallel_knowledge:
                left -= ms
        rest.append(left)
    series[REST] = rest
    total = sum(r["response_ms"] for r in answered) or 1.0
    out = [
        StageRow(
            name,
            percentile(values, 50),
            percentile(values, 95),
            sum(values) / len(values) if values else None,
            sum(values),
            sum(values) / total,
            on_path=name != "knowledge" or not parallel_knowledge,
        )
        for name, values in ((n, series[n]) for n in [*_ordered(set(series) - {REST}), REST])
    ]
    responses = [r["response_ms"] for r in answered]
    return Breakdown(
        "turn records",
        len(answered),
        percentile(responses, 50),
        percentile(responses, 95),
        sum(responses) / len(responses) if responses else None,
        out,
    )


async def turn_breakdown(database_url: str, since: float, *, parallel_knowledge: bool) -> Breakdown:
    """The breakdown of the turns that started at or after `since` (a time.time())."""
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        # reply_ms: from the end of the turn's stages (finished_at) to the reply sent.
        rows = await conn.fetch(
            """SELECT response_ms, window_ms, stages,
                      response_ms - EXTRACT(EPOCH FROM finished_at - last_message_at)::float8 * 1000 AS reply_ms
                 FROM turns WHERE started_at >= to_timestamp($1)""",
            since,
        )
    finally:
        await conn.close()
    return breakdown_from_turns([dict(r) for r in rows], parallel_knowledge=parallel_knowledge)


# --- the same from a running daemon's /metrics -------------------------------------------


@dataclass
class _Histogram:
    sum: float = 0.0
    count: float = 0.0
    buckets: list[tuple[float, float]] = field(default_factory=list)  # (le, cumulative count)


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket that holds
    the rank; the highest finite bound when the rank is in the +Inf bucket."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(le):
                return lower
            if cumulative == below:
                return le
            return lower + (le - lower) * (rank - below) / (cumulative - below)
        lower, below = le, cumulative
    return lower


def _histograms(text: str, name: str, label: str | None) -> dict[str, _Histogram]:
    """The histogram `name` per value of `label` ("" when unlabelled)."""
    found: dict[str, _Histogram] = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.name != name:
                continue
            for s in family.samples:
                h = found.setdefault(s.labels.get(label, "") if label else "", _Histogram())
                if s.name == f"{name}_sum":
                    h.sum = s.value
                elif s.name == f"{name}_count":
                    h.count = s.value
                elif s.name == f"{name}_bucket":
                    h.buckets.append((float(s.labels["le"]), s.value))
    except (ValueError, KeyError) as exc:
        raise SdrError(f"the metrics could not be parsed: {exc}") from None
    return found


def breakdown_from_metrics(text: str, *, parallel_knowledge: bool, source: str = "metrics") -> Breakdown:
    """From `sdr_stage_seconds{stage}` and `sdr_response_time_seconds`. Stages are observed
    per call (a reply in parts counts each send), so shares are of summed time; what is left
    of the response time is the buffer's wait plus overhead, which /metrics cannot split."""
    response = _histograms(text, "sdr_response_time_seconds", None).get("", _Histogram())
    if response.count <= 0:
        raise SdrError(f"{source} shows no answered turns yet (sdr_response_time_seconds is empty)")
    stages = _histograms(text, "sdr_stage_seconds", "stage")
    total = response.sum * 1000
    rows: list[StageRow] = []
    left = total
    for name in _ordered(stages):
        h = stages[name]
        on_path = name != "knowledge" or not parallel_knowledge
        p50, p95 = bucket_quantile(0.5, h.buckets), bucket_quantile(0.95, h.buckets)
        rows.append(
            StageRow(
                name,
                None if p50 is None else p50 * 1000,
                None if p95 is None else p95 * 1000,
                h.sum * 1000 / h.count if h.count else None,
                h.sum * 1000,
                h.sum * 1000 / total,
                on_path,
            )
        )
        if on_path:
            left -= h.sum * 1000
    rows.insert(0, StageRow(REST_UNSPLIT, None, None, left / response.count, left, left / total, True))
    p50, p95 = bucket_quantile(0.5, response.buckets), bucket_quantile(0.95, response.buckets)
    return Breakdown(
        source,
        int(response.count),
        None if p50 is None else p50 * 1000,
        None if p95 is None else p95 * 1000,
        total / response.count,
        rows,
    )


async def metrics_breakdown(url: str, *, parallel_knowledge: bool, timeout: float = 10.0) -> Breakdown:
    """Reads a running daemon's /metrics (`url` with or without the /metrics path)."""
    url = url.rstrip("/")
    if not url.endswith("/metrics"):
        url += "/metrics"
    try:
        async with httpx.AsyncClient(timeout=timeout) as http:
            answer = await http.get(url)
    except httpx.HTTPError as exc:
        raise SdrError(f"cannot read {url}: {exc.__class__.__name__}: {exc}; is the daemon running?") from None
    if answer.status_code != 200:
        raise SdrError(f"{url} answered {answer.status_code}; expected 200 with Prometheus metrics")
    return breakdown_from_metrics(answer.text, parallel_knowledge=parallel_knowledge, source=url)


# --- the profiled run ----------------------------------------------------------------------


def profile_config(config_path: str | Path | None, profile: str | None, workload: Workload) -> Config:
    """The config of the profiled daemon: the simulated agent, every wait scaled by the
    workload's time scale. SDR_ variables of this shell are left out, as the bench does,
    so a profile never writes into the database they point at."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDR_")}
    base = load_config(config_path, profile, env)
    env.update(
        SDR_AGENT_BACKEND="simulated",
        SDR_AGENT_SIMULATED_LATENCY=scaled_spec(workload.agent_latency, workload.time_scale),
        **scaled_overrides(base.profile, workload.time_scale),
    )
    return load_config(config_path, profile, env)


@dataclass(frozen=True)
class _Target:
    """The in-process daemon as the load generator sees it."""

    profile: Profile
    url: str
    database_url: str


@dataclass
class ProfileRun:
    workload: Workload
    result: ProfileResult  # the bench's figures for the run
    breakdown: Breakdown
    session: Session  # pyinstrument's recording


def run_profile(config: Config, workload: Workload, *, progress: Progress | None = None) -> ProfileRun:
    """Runs the workload against a daemon in this process, under pyinstrument.

    The profiler starts before the event loop, so every task the daemon creates inherits its
    context: in async mode, time the loop spends idle then sits in its poll (trimmed away)
    instead of on [await] of whichever coroutine yielded last (the buffer's poll loop)."""
    workload.validated()
    profiler = Profiler(interval=0.001, async_mode="enabled")
    profiler.start()
    try:
        result, breakdown = asyncio.run(_profiled(config, workload, progress))
    finally:
        session = profiler.stop()
    return ProfileRun(workload, result, breakdown, session)


async def _profiled(config: Config, w: Workload, progress: Progress | None) -> tuple[ProfileResult, Breakdown]:
    async with run_fake_evolution(keep_bodies=False) as fake, inprocess_daemon(config, evolution_url=fake.url) as d:
        target = _Target(d.config.profile, d.url, d.endpoints.database_url)
        since = time.time()
        [result] = await drive([target], fake, w, progress=progress)
        await _settle(d, w)
        breakdown = await turn_breakdown(
            target.database_url, since, parallel_knowledge=d.config.profile.features.parallel_context
        )
    return result, breakdown


async def _settle(d: InProcessDaemon, w: Workload) -> None:
    """Waits (bounded) for the last turns to record their response time."""
    t = d.config.profile.timeouts
    deadline = time.monotonic() + (t.message_buffer + t.agent + t.evolution_send) * w.time_scale + 1.0
    rt = d.runtime
    while time.monotonic() < deadline:
        if not rt.metrics.registry.get_sample_value("sdr_turns_in_flight") and not await rt.buffer.pending():
            return
        await asyncio.sleep(0.05)


# --- the call tree ---------------------------------------------------------------------------

# As code objects name their files. The load and its harness run in this process too, but
# they live in daemon/tools/ and daemon/testing/: everything else in daemon/ is the pipeline.
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_HARNESS = tuple(_PACKAGE + folder + os.sep for folder in ("tools", "testing"))


def _is_pipeline(path: str | None) -> bool:
    return path is not None and path.startswith(_PACKAGE) and not path.startswith(_HARNESS)


def keep_pipeline_frames(frame: Frame | None, options: processors.ProcessorOptions) -> Frame | None:
    """A pyinstrument processor: keeps the pipeline's frames and, below each, the first
    library frame it calls (where its time goes: asyncpg, redis, a sleep); the frames
    between are folded away, their time staying with what is kept."""
    if frame is None:
        return None

    def fold(parent: Frame) -> None:
        keep_library = _is_pipeline(parent.file_path)
        for child in list(parent.children):
            fold(child)
            if not (_is_pipeline(child.file_path) or keep_library):
                delete_frame_from_tree(child, replace_with="children")

    fold(frame)
    return frame


def _pipeline_time(root: Frame) -> float:
    return root.time if _is_pipeline(root.file_path) else sum(c.time for c in root.children)


class _PipelineRenderer(ConsoleRenderer):
    """pyinstrument's text renderer over the trimmed tree; nodes under `filter_threshold`
    of the pipeline's own time (not of the wall time, mostly idle) are dropped."""

    def __init__(self, threshold: float, unicode: bool = True) -> None:
        super().__init__(unicode=unicode, processor_options={"filter_threshold": threshold})

    def default_processors(self) -> ProcessorList:
        return [
            processors.remove_importlib,
            processors.remove_tracebackhide,
            processors.merge_consecutive_self_time,
            keep_pipeline_frames,
            processors.aggregate_repeated_calls,
            lambda f, options: processors.remove_irrelevant_nodes(
                f, options, total_time=_pipeline_time(f) if f else None
            ),
            processors.remove_unnecessary_self_time_nodes,
        ]

    def render_preamble(self, session: Session) -> str:
        return (
            f"call tree: the pipeline's own frames, seconds of {session.duration:.2f} s recorded "
            f"({session.sample_count} samples); idle waits and the load generator trimmed\n"
        )


def call_tree(session: Session, max_lines: int = 40, unicode: bool = True) -> str:
    """The trimmed call tree as text, at most `max_lines` lines: small nodes go first."""
    text = ""
    for threshold in (0.01, 0.02, 0.05, 0.1, 0.2):
        text = _PipelineRenderer(threshold, unicode).render(session).rstrip("\n")
        if text.count("\n") < max_lines:
            return text
    lines = text.splitlines()
    return "\n".join([*lines[: max_lines - 1], f"... {len(lines) - max_lines + 1} more lines (see --html)"])


def html_report(session: Session) -> str:
    """pyinstrument's interactive HTML, untrimmed."""
    return str(HTMLRenderer().render(session))


def json_tree(session: Session) -> str:
    """The trimmed tree as pyinstrument's JSON."""
    renderer = JSONRenderer()
    renderer.processors = _PipelineRenderer(0.01).processors
    renderer.processor_options = {"filter_threshold": 0.01}
    return str(renderer.render(session))
