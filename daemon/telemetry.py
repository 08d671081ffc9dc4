"""Traces of a turn (OpenTelemetry), exported over OTLP/HTTP when `[telemetry] otlp_endpoint`
is set; off otherwise, at no cost: no provider, no span objects, nothing in the context.

What a trace shows:
- each webhook is a span (`webhook`, in its own trace); the message it stored carries the
  span's W3C traceparent in `messages.trace_context` (sql/0016), so the turn that answers
  it finds it whichever daemon runs that turn;
- each turn is a trace of its own, rooted at `turn` (from the buffer's claim to the reply
  sent), *linked* to the webhooks of its burst (a burst of 3 messages: 3 links), with
  children `buffer wait` (the last message's arrival to the claim: start time back-dated),
  `lock`, and one span per stage the StageClock times (media, context, knowledge, agent,
  hold, store, send); under `agent`, one span per model request (`chat <model>`) and per
  tool call (`tool <name>`).
- log lines written inside a span carry its trace and span ids (daemon/logs.py).

The runtime owns the provider: `setup` at start, `Telemetry.shutdown` at stop flushes what
is queued, bounded by `[timeouts] shutdown_grace`. No global provider is installed
(`trace.set_tracer_provider` is once per process; the tests run many daemons in one).
One traced runtime per process is the rule (`sdrctl serve` runs one): the last one set up
is the one that records."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from daemon.config import Config

log = logging.getLogger("sdr.telemetry")

SERVICE_NAME = "sdrctl"
TRACES_PATH = "/v1/traces"
Attributes = Mapping[str, str | bool | int | float]

# The tracer of the traced runtime; None: tracing is off and every helper below returns at
# once (a shared nullcontext, None).
_tracer: trace.Tracer | None = None
_OFF: AbstractContextManager[None] = contextlib.nullcontext()
_for_tests: Any = None  # a SpanExporter the next setup() uses instead of OTLP (tests)
_root_span: ContextVar[Span | None] = ContextVar("sdr_root_span", default=None)


def enabled() -> bool:
    return _tracer is not None


def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes | None = None,
    errors: bool = True,
) -> AbstractContextManager[Span | None]:
    """A child of the current span for the block (the root of a new trace when none is
    current); yields None when tracing is off. `errors`: an exception leaving the block
    marks the span as failed (False: the caller says what failed, with `failed`)."""
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(
        name, kind=kind, attributes=attributes, record_exception=errors, set_status_on_exception=errors
    )


def root(name: str, *, attributes: Attributes | None = None) -> AbstractContextManager[Span | None]:
    """A span that starts a trace of its own, whatever is current (a turn); `annotate`
    in the block writes on it."""
    if _tracer is None:
        return _OFF
    return _root(_tracer, name, attributes)


@contextlib.contextmanager
def _root(tracer: trace.Tracer, name: str, attributes: Attributes | None) -> Iterator[Span]:
    with tracer.start_as_current_span(name, context=Context(), attributes=attributes) as span:
        token = _root_span.set(span)
        try:
            yield span
        finally:
            _root_span.reset(token)


def current() -> Span | None:
    """The current span (None when tracing is off, or none is current)."""
    if _tracer is None:
        return None
    span = trace.get_current_span()
    return span if span.get_span_context().is_valid else None


def failed(s: Span | None, why: str) -> None:
    if s is not None:
        s.set_status(Status(StatusCode.ERROR, why))


def annotate(**attributes: str | bool | int | float | None) -> None:
    """Attributes on the block's root span (a turn's), else on the current span; None
    values are left out."""
    if _tracer is None:
        return
    current = _root_span.get() or trace.get_current_span()
    for key, value in attributes.items():
        if value is not None:
            current.set_attribute(key, value)


def traceparent() -> str | None:
    """The current span as a W3C traceparent (00-<trace>-<span>-<flags>), or None."""
    if _tracer is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The span context a traceparent names (None for anything else)."""
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    ctx = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return ctx if ctx.is_valid else None


def link_to(traceparents: Sequence[str | None]) -> int:
    """Links the current span (a turn) to the spans that fed it (its burst's webhooks);
    returns how many were linked (a message stored with tracing off has none)."""
    if _tracer is None:
        return 0
    current = trace.get_current_span()
    seen: set[tuple[int, int]] = set()
    for value in traceparents:
        ctx = parse_traceparent(value)
        if ctx is not None and (ctx.trace_id, ctx.span_id) not in seen:
            seen.add((ctx.trace_id, ctx.span_id))
            current.add_link(ctx, {"sdr.link": "webhook"})
    return len(seen)


def waited(name: str, since: datetime) -> None:
    """A span that ended when the current span started and began at `since` (the buffer
    wait: the burst's last message stored -> its turn claimed from the buffer)."""
    if _tracer is None:
        return
    parent = trace.get_current_span()
    end = getattr(parent, "start_time", None) or time.time_ns()
    start = min(int(since.timestamp() * 1e9), end)  # another machine's clock may run ahead
    _tracer.start_span(name, start_time=start).end(end_time=end)


# --- the provider, owned by the runtime ------------------------------------------------


def traces_url(endpoint: str) -> str:
    """The collector's OTLP/HTTP traces URL: /v1/traces is added to a URL without a path."""
    parts = urlsplit(endpoint.strip())
    if parts.path in ("", "/"):
        return endpoint.strip().rstrip("/") + TRACES_PATH
    return endpoint.strip()


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def instance_id(config: Config) -> str:
    """This daemon among several: host and port (what Prometheus calls the `instance`)."""
    return f"{socket.gethostname()}:{config.daemon.port}"


class Telemetry:
    """The traced runtime's provider; `shutdown` flushes and stops it."""

    def __init__(self, provider: Any, timeout: float, target: str) -> None:
        self.provider = provider
        self.timeout = timeout
        self.target = target

    async def shutdown(self) -> None:
        """The spans still queued go out, within the timeout (a collector that does not
        answer costs the stop that much at most: the export runs on a thread of its own)."""
        global _tracer
        if _tracer is not None and getattr(_tracer, "_sdr_owner", None) is self:
            _tracer = None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def stop() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(finished)

        threading.Thread(target=stop, name="otel-shutdown", daemon=True).start()
        try:
            async with asyncio.timeout(self.timeout):
                await done
        except TimeoutError:
            log.warning("traces not all exported to %s within %.1fs; the rest are dropped", self.target, self.timeout)


def setup(config: Config, exporter: Any = None) -> Telemetry | None:
    """Tracing for this runtime when `[telemetry] otlp_endpoint` is set (or `exporter`
    is given: the tests' in-memory one, exported span by span); None otherwise, and
    nothing is installed."""
    global _tracer
    exporter = exporter if exporter is not None else _for_tests
    endpoint = config.telemetry.otlp_endpoint
    if exporter is None and not endpoint:
        return None
    # Imported only when tracing is on: the SDK and the exporter cost nothing otherwise.
    from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, Resource
    from opentelemetry.sdk.resources import SERVICE_NAME as NAME_KEY
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from daemon.logs import install_trace_ids

    timeout = config.profile.timeouts.shutdown_grace
    resource = Resource.create({NAME_KEY: SERVICE_NAME, SERVICE_INSTANCE_ID: instance_id(config)})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # the runtime shuts it down
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        target = type(exporter).__name__
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        target = traces_url(endpoint)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=target, timeout=timeout)))
    target = _without_credentials(target)  # what the log says, and the stop's warning
    telemetry = Telemetry(provider, timeout, target)
    tracer = provider.get_tracer("sdrctl")
    tracer._sdr_owner = telemetry  # type: ignore[attr-defined]  # who may switch it off
    if _tracer is not None:
        log.warning("tracing was already on in this process: the newest runtime's traces win")
    _tracer = tracer
    install_trace_ids()
    log.info("traces of each turn go to %s (service.instance.id %s)", target, instance_id(config))
    return telemetry


@contextlib.contextmanager
def exporting_to(exporter: Any) -> Iterator[None]:
    """Tests: runtimes started in the block trace into `exporter` (no endpoint needed)."""
    global _for_tests
    before, _for_tests = _for_tests, exporter
    try:
        yield
    finally:
        _for_tests = before
