"""Traces of a turn (issue #20): with tracing on, a burst's turn is a trace of its own,
rooted at `turn`, linked to the webhooks that stored its messages, with a span per stage
(buffer wait, lock, context, knowledge, agent, store, send; model requests and tool calls
under agent), and the turn's log lines carry its trace id. Off (no [telemetry]
otlp_endpoint), nothing is traced and no provider is installed. Exported over OTLP/HTTP to
a real receiver (a tiny Starlette app decoding the protobuf)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemon import telemetry
from daemon.config import load_config
from daemon.embedded import Endpoints
from daemon.errors import ConfigError
from daemon.testing.fake_openai import Step, run_fake_openai
from daemon.testing.servers import background_server, quiet_server
from tests.helpers import event, fetch, is_shell_setting, make_config, run_daemon, run_fake_evolution, wait_for

PHONE = "5511977776666"
TREE = {"buffer wait", "lock", "context", "knowledge", "agent", "store", "send"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the daemons the test starts, into memory."""
    exporter = InMemorySpanExporter()
    with telemetry.exporting_to(exporter):
        yield exporter
    assert not telemetry.enabled()  # the runtime switched it off at stop


async def burst(url: str, *texts: str) -> None:
    """One lead's burst: its messages posted back to back (well within the quiet window)."""
    async with httpx.AsyncClient(base_url=url) as http:
        for text in texts:
            resp = await http.post("/webhook/evolution", json=event(PHONE, text))
            assert resp.status_code == 200, resp.text


async def one_turn(clean: Endpoints, **env: str) -> None:
    async with run_fake_evolution() as evo, run_daemon(make_config(clean, SDR_EVOLUTION_BASE_URL=evo.url, **env)) as d:
        await burst(d.url, "Oi, sou a Ana", "quanto custa a energia solar?")
        await wait_for(lambda: asyncio.sleep(0, len(evo.sent) >= 1 or None))
        await wait_for(lambda: fetch(clean.database_url, "SELECT 1 FROM outbox WHERE status = 'sent'"))


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


def ids(s: ReadableSpan) -> tuple[int, int]:
    assert s.context is not None
    return s.context.trace_id, s.context.span_id


async def test_a_burst_is_one_turn_trace_linked_to_its_webhooks_with_a_span_per_stage(
    clean: Endpoints, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        await one_turn(clean)
    finished = spans.get_finished_spans()
    hooks = by_name(finished, "webhook")
    [turn] = by_name(finished, "turn")
    assert len(hooks) == 2 and all(h.kind is SpanKind.SERVER and h.parent is None for h in hooks)
    assert len({ids(h)[0] for h in hooks}) == 2  # each webhook: a trace of its own
    assert all(h.attributes is not None and h.attributes["http.response.status_code"] == 200 for h in hooks)

    # The turn: the root of a trace of its own, linked to both webhooks' spans.
    assert turn.parent is None and ids(turn)[0] not in {ids(h)[0] for h in hooks}
    assert {(link.context.trace_id, link.context.span_id) for link in turn.links} == {ids(h) for h in hooks}
    attrs = dict(turn.attributes or {})
    assert attrs["sdr.lead"] == "5511*****6666" and attrs["sdr.turn.messages"] == 2
    assert attrs["sdr.turn.outcome"] == "ok" and attrs["sdr.turn.result"] == "answered"
    [row] = await fetch(clean.database_url, "SELECT id FROM turns")
    assert attrs["sdr.turn.id"] == row["id"]

    # Its children, by span ids: every stage, in the turn's trace.
    in_turn = [s for s in finished if ids(s)[0] == ids(turn)[0] and s is not turn]
    children = {s.name for s in in_turn if s.parent is not None and s.parent.span_id == ids(turn)[1]}
    assert TREE <= children, children
    assert all(s.parent is not None for s in in_turn)
    [wait] = by_name(finished, "buffer wait")
    assert turn.start_time is not None and wait.end_time == turn.start_time
    assert wait.start_time is not None and 0 < turn.start_time - wait.start_time < 5e9
    [lock] = by_name(finished, "lock")
    assert lock.attributes is not None and lock.attributes["sdr.lock.taken"] is True
    assert all(s.status.status_code is not StatusCode.ERROR for s in in_turn)
    resource = turn.resource.attributes
    assert resource["service.name"] == "sdrctl" and str(resource["service.instance.id"]).endswith(":8080")

    # Each message keeps its webhook's span, where any daemon's turn finds it.
    rows = await fetch(clean.database_url, "SELECT trace_context FROM messages WHERE direction = 'in' ORDER BY id")
    assert [r["trace_context"][:-3] for r in rows] == [f"00-{t:032x}-{s:016x}" for t, s in map(ids, hooks)]

    # The turn's log lines carry its trace id (and the lead and turn id as fields).
    trace_id = f"{ids(turn)[0]:032x}"
    done = [r for r in caplog.records if "turn done" in r.getMessage()]
    assert done and all(getattr(r, "trace_id", None) == trace_id for r in done)
    assert all(r.sdr_fields["lead"] == PHONE and r.sdr_fields["turn"] == row["id"] for r in done)  # type: ignore[attr-defined]
    hook_traces = {f"{ids(h)[0]:032x}" for h in hooks}
    assert not any(getattr(r, "trace_id", None) in hook_traces for r in done)


async def test_model_requests_and_tool_calls_are_spans_under_the_agent(
    clean: Endpoints, spans: InMemorySpanExporter
) -> None:
    async with run_fake_openai() as llm:
        llm.then(Step(tool_calls=[("search_knowledge", {"query": "preço"}), ("update_lead", {"bill_value": 10})]))
        llm.then(Step(content="Custa a partir de R$ 150 por mês. Qual o valor da sua conta?"))
        cfg = make_config(clean, SDR_AGENT_BACKEND="openai", SDR_AGENT_BASE_URL=llm.url, OPENAI_API_KEY="sk-test")
        async with run_daemon(cfg) as d:
            await burst(d.url, "quanto custa?")
            await wait_for(lambda: fetch(clean.database_url, "SELECT 1 FROM turns WHERE stages ? 'agent'"))
    finished = spans.get_finished_spans()
    [agent] = by_name(finished, "agent")
    chats = [s for s in finished if s.name.startswith("chat ")]
    assert len(chats) == 2 and all(s.kind is SpanKind.CLIENT for s in chats)
    assert all(s.parent is not None and s.parent.span_id == ids(agent)[1] for s in chats)
    assert all((s.attributes or {})["gen_ai.usage.input_tokens"] > 0 for s in chats)  # type: ignore[operator]
    [search] = by_name(finished, "tool search_knowledge")
    [update] = by_name(finished, "tool update_lead")
    assert search.parent is not None and search.parent.span_id == ids(agent)[1]
    assert search.status.status_code is not StatusCode.ERROR
    assert update.status.status_code is StatusCode.ERROR  # a bill of R$ 10 is refused
    # The tool's knowledge search is a span under its call.
    assert any(s.name == "knowledge" and s.parent is not None and s.parent.span_id == ids(search)[1] for s in finished)


async def test_without_an_endpoint_nothing_is_traced_and_no_provider_is_installed(
    clean: Endpoints, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()  # never given to the daemon
    with caplog.at_level(logging.INFO):
        await one_turn(clean)
    assert not telemetry.enabled()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    assert exporter.get_finished_spans() == ()
    assert not any(hasattr(r, "trace_id") for r in caplog.records)
    rows = await fetch(clean.database_url, "SELECT trace_context FROM messages WHERE direction = 'in'")
    assert len(rows) == 2 and all(r["trace_context"] is None for r in rows)
    assert telemetry.traceparent() is None and telemetry.link_to(["00-" + "1" * 32 + "-" + "2" * 16 + "-01"]) == 0
    with telemetry.span("anything") as span:
        assert span is None


# --- over the wire ---------------------------------------------------------------------


class Receiver:
    """A local OTLP/HTTP collector: POST /v1/traces, protobuf, every request kept."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.url = ""

    def app(self) -> Starlette:
        async def traces(request: Request) -> Response:
            body = await request.body()
            if request.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            assert request.headers["content-type"] == "application/x-protobuf"
            self.requests.append(ExportTraceServiceRequest.FromString(body))
            return Response(b"", media_type="application/x-protobuf")

        return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) for every span received."""
        out = []
        for req in self.requests:
            for rs in req.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    out += [(resource, s) for s in ss.spans]
        return out


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    async with background_server(quiet_server(r.app())) as url:
        r.url = url
        yield r


async def test_spans_are_exported_over_otlp_http_to_the_configured_endpoint(clean: Endpoints) -> None:
    async with receiver() as collector:
        await one_turn(clean, SDR_TELEMETRY_OTLP_ENDPOINT=collector.url)  # /v1/traces added
        assert not telemetry.enabled()
        received = collector.spans()
    names = [s.name for _, s in received]
    assert names.count("webhook") == 2 and names.count("turn") == 1 and TREE <= set(names)
    [(resource, turn)] = [(r, s) for r, s in received if s.name == "turn"]
    assert resource["service.name"] == "sdrctl" and resource["service.instance.id"]
    hooks = [s for _, s in received if s.name == "webhook"]
    assert {(link.trace_id, link.span_id) for link in turn.links} == {(h.trace_id, h.span_id) for h in hooks}
    children = {s.name for _, s in received if s.trace_id == turn.trace_id and s.parent_span_id == turn.span_id}
    assert TREE <= children


def test_the_endpoint_setting() -> None:
    assert telemetry.traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert telemetry.traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert telemetry.traces_url("https://x.example/otlp/v1/traces") == "https://x.example/otlp/v1/traces"
    cfg = load_config(None, None, {"SDR_TELEMETRY_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert cfg.telemetry.otlp_endpoint == "http://127.0.0.1:4318"
    assert load_config(None, None, {}).telemetry.otlp_endpoint == ""
    with pytest.raises(ConfigError, match="SDR_TELEMETRY_OTLP_ENDPOINT"):
        load_config(None, None, {"SDR_TELEMETRY_OTLP_ENDPOINT": "collector:4318"})


def test_traceparents_are_read_strictly() -> None:
    good = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    ctx = telemetry.parse_traceparent(good)
    assert ctx is not None and ctx.trace_id == int("a" * 32, 16) and ctx.span_id == int("b" * 16, 16)
    for bad in (
        None,
        "",
        "garbage",
        "00-" + "0" * 32 + "-" + "b" * 16 + "-01",
        good[:-1],
        "01" + good[2:],
        good + "-x",
    ):
        assert telemetry.parse_traceparent(bad) is None


if __name__ == "__main__":  # the receiver alone, for the bench (BENCHMARKS.md, "Tracing: what it costs")
    import sys

    import uvicorn

    collector = Receiver()
    try:
        uvicorn.run(collector.app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    finally:
        print(f"received {len(collector.spans())} spans in {len(collector.requests)} requests")


def test_the_shells_opentelemetry_settings_do_not_reach_the_tests() -> None:
    """An operator's exported OTEL_* (headers, resource attributes, an SDK switch) would
    change what a traced daemon under test sends: scrubbed like SDR_* and PG*."""
    assert is_shell_setting("OTEL_EXPORTER_OTLP_HEADERS") and is_shell_setting("OTEL_SDK_DISABLED")
    assert is_shell_setting("SDR_DATABASE_URL") and not is_shell_setting("PATH")
    assert not [n for n in os.environ if n.startswith("OTEL_")]  # the session fixture removed them
