"""HTTP routes (bare Starlette: the intake is on the hot path).

The webhook bounds the webhooks in flight, authenticates, bounds the body, parses the
Evolution event, holds each lead to its rate limit, stores the message durably and answers
at once; it never waits for the agent. GET /openapi.json describes every route and answer."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemon import telemetry
from daemon.connections import OUTAGE
from daemon.errors import BadPayload, TooLarge
from daemon.evolution import Edit, Ignored, Typing, parse_envelope, parse_event
from daemon.models import Takeover
from daemon.openapi import openapi
from daemon.ratelimit import LeadRateLimiter, retry_after
from daemon.runtime import Runtime

log = logging.getLogger("sdr.intake")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Refusals:
    """One warning per `[limits] error_log_interval` while webhooks are refused for being
    too many in flight, not one per refusal: an overloaded daemon should not also flood
    its log."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.since_warned = 0
        self.warned_at = -self.every

    def note(self, limit: int) -> None:
        self.since_warned += 1
        now = time.monotonic()
        if now - self.warned_at >= self.every:
            log.warning(
                "webhooks refused with 503 (%d since the last such warning): %d already in flight, "
                "the limit ([pools] webhooks_in_flight)",
                self.since_warned,
                limit,
            )
            self.since_warned, self.warned_at = 0, now


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` (never read whole first)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(rt: Runtime) -> Starlette:
    cfg = rt.config
    token = f"Bearer {cfg.webhook_token}".encode() if cfg.webhook_token else None
    token_raw = (cfg.webhook_token or "").encode()
    instance_token = cfg.evolution_instance_token or cfg.evolution_api_key
    body_key = instance_token.encode() if token is not None and instance_token else None
    limit = cfg.webhook.max_body_bytes
    webhook_timeout = cfg.profile.timeouts.webhook
    count = rt.metrics.webhooks
    lim = cfg.profile.limits
    limiter = LeadRateLimiter(lim.lead_rate, lim.lead_burst, lim.rate_tracked_leads)
    document = openapi(cfg)
    most_in_flight = cfg.profile.pools.webhooks_in_flight
    in_flight = 0
    refused = Refusals(lim.error_log_interval)

    async def webhook(request: Request) -> Response:
        # Requests being handled, not open connections: idle or half-sent connections (a
        # slowloris; request_read closes them) never take a real webhook's place. The bound
        # keeps the intake's group-commit queue, and memory, finite; 503 makes Evolution retry.
        nonlocal in_flight
        if in_flight >= most_in_flight:
            count.labels("overloaded").inc()
            refused.note(most_in_flight)
            return error(503, f"{most_in_flight} webhooks already in flight, the limit; retry")
        in_flight += 1
        try:
            # Traced, each webhook is a trace of its own; the message it stores keeps its
            # span for the turn that answers it to link to (daemon.telemetry).
            with telemetry.span("webhook", kind=SpanKind.SERVER) as span:
                response = await handle(request)
                if span is not None:
                    span.set_attribute("http.response.status_code", response.status_code)
                return response
        finally:
            in_flight -= 1

    def refuse(request: Request) -> Response:
        count.labels("unauthorized").inc()
        # The address only: a token, even a wrong one, never goes to the log.
        log.warning("webhook refused: no valid credentials from %s", request.client.host if request.client else "?")
        return error(
            401,
            "missing or invalid credentials: send `Authorization: Bearer <token>`, post to "
            "/webhook/evolution/<token>, or carry the instance token in the body's `apikey`",
        )

    async def handle(request: Request) -> Response:
        # Three ways in, for every Evolution set-up (README: Webhook authentication): the
        # bearer header (per-instance webhooks' custom headers), the token as a path segment,
        # or the instance token in the body (a global webhook sends no custom headers).
        path_event = request.path_params.get("event")
        authed = token is None
        if not authed and (path_token := request.path_params.get("token")) is not None:
            authed = hmac.compare_digest(path_token.encode(), token_raw)
            if not authed:
                return refuse(request)
        elif not authed and path_event is not None and hmac.compare_digest(path_event.encode(), token_raw):
            authed, path_event = True, None  # /webhook/evolution/<token>
        if not authed:
            authed = hmac.compare_digest(request.headers.get("authorization", "").encode(), token or b"")
        if not authed and body_key is None:
            return refuse(request)
        if not rt.accepting:
            count.labels("unavailable").inc()
            return error(503, "the daemon is shutting down; retry")
        try:
            body = await read_limited(request, limit)
        except TooLarge:
            count.labels("too_large").inc()
            return error(413, f"body larger than the limit of {limit} bytes")
        except ClientDisconnect:
            # The sender hung up, or its body did not arrive within [timeouts] request_read
            # and we closed the connection: nobody reads this answer.
            count.labels("disconnected").inc()
            return error(400, "the client disconnected before the whole body arrived")
        try:
            envelope = parse_envelope(body)
            if not authed and not hmac.compare_digest((envelope.apikey or "").encode(), body_key or b""):
                return refuse(request)
            event = parse_event(envelope, path_event)
        except BadPayload as exc:
            if not authed:  # nothing is said about a body from someone unknown
                return refuse(request)
            count.labels("invalid").inc()
            return error(exc.status, str(exc))
        if isinstance(event, Ignored):
            count.labels("ignored").inc()
            rt.metrics.ignored.labels(event.reason).inc()
            return JSONResponse({"status": "ignored", "reason": event.reason})
        # After parsing: the limit is per lead, so only a lead's messages and typing count.
        wait = 0.0 if isinstance(event, Edit | Takeover) else limiter.wait(event.phone)
        if wait:
            count.labels("rate_limited").inc()
            return JSONResponse(
                {
                    "error": f"too many webhooks for this lead: the limit is {limiter.rate:g}/s "
                    f"(bursts of {limiter.burst}) per lead; retry later"
                },
                status_code=429,
                headers={"Retry-After": retry_after(wait)},
            )
        try:
            async with asyncio.timeout(webhook_timeout):
                if isinstance(event, Typing):
                    outcome = await rt.typing(event)
                    count.labels(f"presence_{outcome}").inc()
                    return JSONResponse({"status": "presence", "buffer": outcome})
                if isinstance(event, Edit):
                    outcome = await rt.edit(event)
                    count.labels(f"edit_{outcome}").inc()
                    return JSONResponse({"status": "edit", "edit": outcome})
                if isinstance(event, Takeover):  # 'takeover', 'echo' or 'duplicate'
                    outcome = await rt.takeover(event)
                    count.labels(outcome).inc()
                    return JSONResponse({"status": outcome})
                outcome = await rt.ingest(event)
        except OUTAGE as exc:
            # Not stored durably: 503 so that Evolution retries; never 200.
            count.labels("unavailable").inc()
            log.warning("webhook not stored: %s: %s", exc.__class__.__name__, exc)
            return error(503, "storage unavailable; the message was not stored, retry")
        count.labels(outcome).inc()
        return JSONResponse({"status": outcome})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks = await rt.readiness()
        ready = rt.accepting and all(v == "ok" for v in checks.values())
        checks["intake"] = "ok" if rt.accepting else "stopped"
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        # Read at scrape time: the readiness probes (sdr_dependency_up, and the buffer's
        # size with its probe), three calls per scrape, not one per buffer poll.
        await rt.readiness()
        return Response(rt.metrics.render(), media_type=rt.metrics.content_type)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(document)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, exc.detail)

    async def crash(request: Request, exc: Exception) -> Response:
        # A bug, never the sender's fault: JSON like every other answer; Starlette still
        # logs the traceback.
        return error(500, "internal error; the message may not be stored, retry")

    return Starlette(
        exception_handlers={HTTPException: http_error, Exception: crash},
        routes=[
            Route("/webhook/evolution", webhook, methods=["POST"]),
            Route("/webhook/evolution/{event}", webhook, methods=["POST"]),
            Route("/webhook/evolution/{token}/{event}", webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
        ],
    )
