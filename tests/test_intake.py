"""The webhook: what it stores, what it ignores, what it refuses, and how."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.config import Config
from daemon.embedded import EmbeddedRedis, Endpoints
from tests.helpers import event, fetch, make_config, metric, run_daemon

PHONE = "5511987654321"


async def post(url: str, body: Any, path: str = "/webhook/evolution", **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url) as http:
        if isinstance(body, (bytes, str)):
            return await http.post(path, content=body, **kw)
        return await http.post(path, json=body, **kw)


async def stored(endpoints: Endpoints) -> list[Any]:
    return await fetch(
        endpoints.database_url, "SELECT provider_id, body FROM messages WHERE direction = 'in' ORDER BY id"
    )


async def test_stores_a_lead_message_and_answers_at_once(config: Config, clean: Endpoints) -> None:
    async with run_daemon(config) as d:
        resp = await post(d.url, event(PHONE, "Oi, tudo bem?", message_id="M1"))
    assert resp.status_code == 200
    assert resp.json() == {"status": "stored"}
    rows = await stored(clean)
    assert [(r["provider_id"], r["body"]) for r in rows] == [("M1", "Oi, tudo bem?")]


async def test_reads_extended_text_and_every_event_spelling(config: Config, clean: Endpoints) -> None:
    older = event(PHONE, "x", message_id="M2")
    older["event"] = "MESSAGES_UPSERT"
    older["data"]["message"] = {"extendedTextMessage": {"text": "texto estendido"}}
    per_event = event(PHONE, "pelo caminho", message_id="M3")
    del per_event["event"]  # per-event URLs name the event in the path
    async with run_daemon(config) as d:
        assert (await post(d.url, older)).json() == {"status": "stored"}
        resp = await post(d.url, per_event, path="/webhook/evolution/messages-upsert")
        assert resp.json() == {"status": "stored"}
    assert [r["body"] for r in await stored(clean)] == ["texto estendido", "pelo caminho"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda e: e["data"]["key"].update(remoteJid="120363025@g.us"), "group"),
        (lambda e: e["data"]["key"].update(remoteJid="status@broadcast"), "broadcast"),
        (lambda e: e.update(event="connection.update"), "event"),
        (lambda e: e.update(event="send.message"), "own_send"),
        (lambda e: e["data"].update(message={"reactionMessage": {"text": "👍"}}), "no_content"),
    ],
)
async def test_ignores_what_is_not_a_lead_message(config: Config, clean: Endpoints, change: Any, reason: str) -> None:
    body = event(PHONE, "ignorada")
    change(body)
    async with run_daemon(config) as d:
        resp = await post(d.url, body)
        async with httpx.AsyncClient(base_url=d.url) as http:
            metrics = (await http.get("/metrics")).text
    assert resp.status_code == 200
    assert resp.json() == {"status": "ignored", "reason": reason}
    assert metric(metrics, "sdr_ignored_total", reason=reason) == 1
    assert await stored(clean) == []


async def test_the_same_message_twice_is_stored_once(config: Config, clean: Endpoints) -> None:
    body = event(PHONE, "Olá", message_id="DUP1")
    async with run_daemon(config) as d:
        first = await post(d.url, body)
        second = await post(d.url, body)
    assert first.json() == {"status": "stored"}
    assert second.json() == {"status": "duplicate"}
    assert len(await stored(clean)) == 1


async def test_bearer_token_is_required_when_configured(clean: Endpoints) -> None:
    cfg = make_config(clean, SDRCTL_WEBHOOK_TOKEN="s3cret-token")
    body = event(PHONE, "Olá")
    async with run_daemon(cfg) as d:
        missing = await post(d.url, body)
        wrong = await post(d.url, body, headers={"authorization": "Bearer nope"})
        right = await post(d.url, body, headers={"authorization": "Bearer s3cret-token"})
    assert missing.status_code == wrong.status_code == 401
    assert "Bearer <token>" in missing.json()["error"]
    assert "s3cret" not in missing.text
    assert right.status_code == 200


async def test_oversized_body_is_refused_with_413(clean: Endpoints) -> None:
    cfg = make_config(clean, SDR_WEBHOOK_MAX_BODY_BYTES="2048")
    big = event(PHONE, "a" * 5000)
    async with run_daemon(cfg) as d:
        declared = await post(d.url, big)

        async def chunks():  # no Content-Length: the limit applies while streaming
            data = json.dumps(big).encode()
            for i in range(0, len(data), 512):
                yield data[i : i + 512]

        async with httpx.AsyncClient(base_url=d.url) as http:
            streamed = await http.post("/webhook/evolution", content=chunks())
    assert declared.status_code == streamed.status_code == 413
    assert "2048" in declared.json()["error"]
    assert await stored(clean) == []


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"event": "messages.upsert", "data": {"pushName": "x"}}', 422, "`key`"),
        (b'{"event": "messages.upsert", "data": {"key": {"remoteJid": "55@s.whatsapp.net"}}}', 422, "`id`"),
        (b'{"event": "messages.upsert"}', 422, "`data`"),
        (b'{"data": {}}', 422, "`event`"),
        (b'{"event": 7}', 422, "$.event"),
    ],
)
async def test_malformed_payloads_get_a_json_error_naming_the_problem(
    config: Config, clean: Endpoints, body: bytes, status: int, names: str
) -> None:
    async with run_daemon(config) as d:
        resp = await post(d.url, body)
    assert resp.status_code == status
    assert names in resp.json()["error"]


async def test_unknown_routes_and_methods_answer_json(config: Config) -> None:
    async with run_daemon(config) as d, httpx.AsyncClient(base_url=d.url) as http:
        missing = await http.get("/nope")
        wrong_method = await http.get("/webhook/evolution")
    assert missing.status_code == 404 and "error" in missing.json()
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


async def test_health_and_readiness(config: Config) -> None:
    async with run_daemon(config) as d, httpx.AsyncClient(base_url=d.url) as http:
        health = await http.get("/healthz")
        ready = await http.get("/readyz")
    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "database": "ok", "redis": "ok", "buffer": "ok", "intake": "ok"}


async def test_metrics_read_the_buffers_size_with_its_readiness_probe(clean: Endpoints) -> None:
    cfg = make_config(
        clean, SDR_BUFFER_QUIET_WINDOW="30", SDR_TIMEOUTS_MESSAGE_BUFFER="30", SDR_BUFFER_EXTENDED_WINDOW="30"
    )  # the burst stays pending
    async with run_daemon(cfg) as d, httpx.AsyncClient(base_url=d.url) as http:
        idle = (await http.get("/metrics")).text
        await post(d.url, event(PHONE, "Olá", message_id="WAIT1"))
        waiting = (await http.get("/metrics")).text
    assert metric(idle, "sdr_active_leads") == 0 and metric(waiting, "sdr_active_leads") == 1
    assert metric(waiting, "sdr_dependency_up", dependency="buffer") == 1


async def test_a_redis_outage_gives_503_and_readiness_names_it(clean: Endpoints, tmp_path: Path) -> None:
    own = EmbeddedRedis(tmp_path / "redis", start_timeout=15)
    cfg = make_config(clean, SDR_REDIS_URL=own.start())
    try:
        async with run_daemon(cfg) as d, httpx.AsyncClient(base_url=d.url) as http:
            before = (await http.get("/metrics")).text
            own.stop()
            ready = await http.get("/readyz")
            during = (await http.get("/metrics")).text
            refused = await post(d.url, event(PHONE, "Olá", message_id="OUT1"))
            own.start()
            recovered = await http.get("/readyz")
            after = (await http.get("/metrics")).text
            retried = await post(d.url, event(PHONE, "Olá", message_id="OUT1"))
    finally:
        own.stop()
    assert ready.status_code == 503
    assert ready.json()["redis"].startswith("down") and ready.json()["database"] == "ok"
    # The alerts read the same answer from /metrics (SdrStorageDown): 1 up, 0 down.
    up = [
        {dep: metric(text, "sdr_dependency_up", dependency=dep) for dep in ("database", "redis", "buffer")}
        for text in (before, during, after)
    ]
    assert up == [
        {"database": 1, "redis": 1, "buffer": 1},
        {"database": 1, "redis": 0, "buffer": 0},
        {"database": 1, "redis": 1, "buffer": 1},
    ]
    # Not armed in the buffer, so not accepted: Evolution must retry, and the retry works.
    assert refused.status_code == 503 and "retry" in refused.json()["error"]
    assert recovered.status_code == 200
    assert retried.status_code == 200
    assert len(await stored(clean)) == 1
