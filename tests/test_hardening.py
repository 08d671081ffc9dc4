"""The webhook against hostile input, on a real daemon (real PostgreSQL and Redis): no
body earns a 5xx, every refusal is a JSON error, adversarial text is stored verbatim, auth
failures never log a token, and the served OpenAPI document holds under schemathesis.

Hypothesis runs in a worker thread with a blocking client while the daemon serves from
the test's event loop, so one daemon serves all of a test's examples."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from daemon.app import create_app
from daemon.config import Config
from daemon.embedded import Endpoints
from tests.helpers import event, fetch, make_config, metric, run_daemon

PHONE = "5511987654321"
LIMIT = 128 * 1024  # [webhook] max_body_bytes while fuzzing: oversized bodies stay cheap
FUZZ = settings(
    max_examples=500,
    deadline=None,
    # A failing example is saved here (git-ignored) and replayed first on the next run; on
    # a fresh machine (CI) the failure prints @reproduce_failure(...), which replays it exactly.
    database=DirectoryBasedExampleDatabase(Path(__file__).parent.parent / ".hypothesis" / "examples"),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
_phones = itertools.count(5511900000000)

# --- strategies ---------------------------------------------------------------------

SQL = [
    "'; DROP TABLE messages; --",
    "' OR '1'='1",
    "Robert'); DROP TABLE leads;--",
    "1; SELECT pg_sleep(10)--",
    "' UNION SELECT phone_number FROM leads --",
    "$1 $2::jsonb",
    "$$; DELETE FROM leads; $$",
    "\\'; --",
    "%s %n {0} {{}}",
    "E'\\\\x00'",
    "/* */ -- #",
]
ODD = [
    "😀👍🏽👨‍👩‍👧‍👦🇧🇷",
    "مرحبا، أريد الطاقة الشمسية",
    "שלום עולם",
    "\u202eevil\u202c",
    "zero\u200bwidth\u200d\ufeff",
    "a\u0301e\u0300",
    "\U0010fffd\U0001f9ea",
    "\r\n\t\x0b\x0c",
    "<script>alert(1)</script>",
    "null",
    "\\u0000",
    "नमस्ते",
    "Ω≈ç√∫˜µ≤",
    "ção à vista? R$ 350,00",
]
EVENT_NAMES = [
    "messages.upsert",
    "MESSAGES_UPSERT",
    "messages-upsert",
    "presence.update",
    "PRESENCE_UPDATE",
    "connection.update",
    "send.message",
    "",
]


def _long(s: str) -> str:
    return (s * (65536 // len(s) + 1))[:65536]  # 64 K characters, up to 256 KB in UTF-8


adversarial_text = st.one_of(
    st.sampled_from(SQL + ODD),
    st.text(min_size=1, max_size=200),
    st.lists(st.sampled_from(SQL + ODD) | st.text(max_size=20), min_size=2, max_size=6).map("".join),
    st.sampled_from(SQL + ODD + ["a", "ç"]).map(_long),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50) | st.sampled_from(SQL + ODD),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
FIELDS = [
    ("event",),
    ("instance",),
    ("data",),
    ("data", "key"),
    ("data", "key", "remoteJid"),
    ("data", "key", "id"),
    ("data", "key", "fromMe"),
    ("data", "pushName"),
    ("data", "message"),
    ("data", "message", "conversation"),
    ("data", "messageTimestamp"),
    ("data", "messageType"),
]


def _mutated(path: tuple[str, ...], value: Any, delete: bool, text: str, phone: str = PHONE) -> bytes:
    """A valid event with one field replaced by anything, or removed."""
    body = event(phone, text)
    parent = body
    for part in path[:-1]:
        parent = parent[part]
    if delete:
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value
    return json.dumps(body).encode()


def _deep(depth: int) -> bytes:
    valid = event(PHONE, "x")
    head, _, tail = json.dumps(valid).encode().rpartition(b"}")
    return head + b', "nested": ' + b"[" * depth + b"]" * depth + b"}" + tail


def _padded(size: int) -> bytes:
    """A valid event made `size` bytes longer by an unused field."""
    return _deep(0)[:-1] + b', "pad": "' + b"a" * size + b'"}'


def _with_bytes(raw: bytes, phone: str = PHONE) -> bytes:
    """Arbitrary bytes (mostly invalid UTF-8) inside the message text."""
    head, _, tail = json.dumps(event(phone, "MARK")).encode().partition(b"MARK")
    return head + raw + tail


# Many leads, so what reaches storage is spread over leads as in production (and no lead's
# own limits decide what the fuzzer gets to exercise).
phones = st.integers(0, 99_999_999).map(lambda n: f"55119{n:08d}")
Request = tuple[str, bytes]  # (path, body)
bodies: st.SearchStrategy[Request] = st.one_of(
    json_values.map(lambda v: ("/webhook/evolution", json.dumps(v).encode())),
    st.builds(_mutated, st.sampled_from(FIELDS), json_values, st.booleans(), adversarial_text, phones).map(
        lambda b: ("/webhook/evolution", b)
    ),
    st.builds(_mutated, st.just(("data", "pushName")), adversarial_text, st.just(False), adversarial_text, phones).map(
        lambda b: ("/webhook/evolution", b)
    ),
    st.binary(max_size=500).map(lambda b: ("/webhook/evolution", b)),
    st.builds(_with_bytes, st.binary(min_size=1, max_size=50), phones).map(lambda b: ("/webhook/evolution", b)),
    st.integers(1, 20000).map(lambda n: ("/webhook/evolution", _deep(n))),
    st.integers(LIMIT - 200, LIMIT * 2).map(lambda n: ("/webhook/evolution", _padded(n))),
    st.tuples(st.sampled_from(EVENT_NAMES) | st.text(min_size=1, max_size=30), json_values).map(
        lambda t: ("/webhook/evolution", json.dumps({"event": t[0], "instance": "sdr", "data": t[1]}).encode())
    ),
    st.tuples(st.text(min_size=1, max_size=30), st.booleans()).map(
        lambda t: (f"/webhook/evolution/{quote(t[0], safe='')}", _mutated(("event",), None, t[1], "pelo caminho"))
    ),
)


def check_answer(resp: httpx.Response, sent: bytes = b"") -> None:
    """Never a 5xx; a refusal is always a JSON error that says something."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:500], sent[:500])
    if resp.status_code >= 400:
        error = resp.json().get("error")
        assert isinstance(error, str) and error, (resp.text[:500], sent[:500])
    elif resp.status_code == 200:
        assert resp.json()["status"] in {"stored", "duplicate", "ignored", "presence"}


# --- tests --------------------------------------------------------------------------


async def test_no_body_gets_a_server_error_and_every_refusal_is_json(clean: Endpoints) -> None:
    # The per-lead rate limit off: with it, most valid bodies were refused before storage
    # and the fuzzer exercised the 429 path instead of the pipeline.
    cfg = make_config(clean, SDR_WEBHOOK_MAX_BODY_BYTES=str(LIMIT), SDR_LIMITS_LEAD_RATE="0")
    outcomes: Counter[str] = Counter()
    async with run_daemon(cfg) as d:

        def fuzz() -> None:
            with httpx.Client(base_url=d.url, timeout=30) as http:

                @FUZZ
                @given(bodies)
                def one(request: Request) -> None:
                    path, body = request
                    resp = http.post(path, content=body, headers={"content-type": "application/json"})
                    check_answer(resp, body)
                    outcomes[
                        resp.json().get("status", str(resp.status_code))
                        if resp.status_code == 200
                        else str(resp.status_code)
                    ] += 1

                one()

        await asyncio.to_thread(fuzz)
        assert d.runtime.accepting  # nothing took the daemon down either
        stored = await fetch(clean.database_url, "SELECT count(DISTINCT lead_id) AS leads, count(*) AS n FROM messages")
    # The fuzzer reached the pipeline, not only the refusals: a good share of its bodies
    # were stored, for many leads.
    assert outcomes["429"] == 0, outcomes
    assert outcomes["stored"] >= 0.15 * sum(outcomes.values()), outcomes
    assert stored[0]["n"] >= outcomes["stored"] and stored[0]["leads"] >= 20, (dict(stored[0]), outcomes)


def _changed(change: Callable[[dict[str, Any]], object]) -> bytes:
    body = event(PHONE, "texto")
    change(body)
    return json.dumps(body).encode()


INCOMPRESSIBLE = "".join(chr(0x4E00 + i * 7919 % 20000) for i in range(1000))  # 3 KB in UTF-8


@pytest.mark.parametrize(
    ("body", "status"),
    [
        # Each of these once answered 500, or 503 failing every message of its group commit.
        pytest.param(_changed(lambda e: e["data"].update(messageTimestamp="nan")), 200, id="nan-timestamp"),
        pytest.param(_changed(lambda e: e["data"].update(messageTimestamp="inf")), 200, id="inf-timestamp"),
        pytest.param(_changed(lambda e: e["data"].update(messageTimestamp=10**400)), 200, id="huge-int-timestamp"),
        pytest.param(_changed(lambda e: e["data"].update(messageTimestamp=1e300)), 200, id="year-overflow"),
        pytest.param(_changed(lambda e: e["data"]["message"].update(conversation="a \x00 b")), 200, id="nul-text"),
        pytest.param(_changed(lambda e: e["data"].update(pushName="\x00")), 200, id="nul-name"),
        pytest.param(_changed(lambda e: e["data"]["key"].update(id=INCOMPRESSIBLE)), 422, id="long-id"),
        pytest.param(_changed(lambda e: e["data"]["key"].update(id="a\x00b")), 422, id="nul-id"),
        pytest.param(_with_bytes(b"\x80\xff"), 400, id="invalid-utf8"),
        pytest.param(_deep(5000), 400, id="deep-nesting"),
        # Not a 5xx, but wrong: other scripts' digits are not a phone number.
        pytest.param(
            _changed(lambda e: e["data"]["key"].update(remoteJid="٥٥١١٩٨٧٦٥٤٣٢١@s.whatsapp.net")),
            200,
            id="arabic-digits",
        ),
    ],
)
async def test_edge_cases_found_by_fuzzing(clean: Endpoints, body: bytes, status: int) -> None:
    async with run_daemon(make_config(clean)) as d, httpx.AsyncClient(base_url=d.url) as http:
        resp = await http.post("/webhook/evolution", content=body)
    check_answer(resp, body)
    assert resp.status_code == status, resp.text[:300]
    if "٥".encode() in body:
        assert resp.json() == {"status": "ignored", "reason": "not_a_phone"}
    elif status == 200 and b"\\u0000" in body:  # stored, without the NUL
        sql = "SELECT m.body, l.push_name FROM messages m JOIN leads l ON l.id = m.lead_id"
        rows = await fetch(clean.database_url, sql)
        assert [(r["body"], r["push_name"]) for r in rows] in ([("a  b", None)], [("texto", "")])


async def test_adversarial_text_is_stored_verbatim(clean: Endpoints) -> None:
    cfg = make_config(clean, SDR_LIMITS_LEAD_RATE="0")
    conn = await asyncpg.connect(clean.database_url)
    loop = asyncio.get_running_loop()

    def query(sql: str, *args: Any) -> asyncpg.Record | None:  # from the worker thread
        return asyncio.run_coroutine_threadsafe(conn.fetchrow(sql, *args), loop).result(timeout=30)

    try:
        async with run_daemon(cfg) as d:

            def fuzz() -> None:
                with httpx.Client(base_url=d.url, timeout=30) as http:

                    @settings(FUZZ, max_examples=200)
                    @given(text=adversarial_text, name=st.none() | adversarial_text)
                    def one(text: str, name: str | None) -> None:
                        phone = str(next(_phones))
                        body = event(phone, text, push_name=name)
                        resp = http.post("/webhook/evolution", json=body)
                        check_answer(resp)
                        expected = text.replace("\x00", "")  # PostgreSQL text cannot hold NUL
                        if not expected.strip():
                            assert resp.json() == {"status": "ignored", "reason": "no_content"}
                            return
                        assert resp.json() == {"status": "stored"}
                        row = query(
                            "SELECT m.body, l.push_name FROM messages m JOIN leads l ON l.id = m.lead_id "
                            "WHERE m.provider_id = $1",
                            body["data"]["key"]["id"],
                        )
                        assert row is not None
                        assert row["body"] == expected
                        assert row["push_name"] == (None if name is None else name.replace("\x00", ""))

                    one()

            await asyncio.to_thread(fuzz)
    finally:
        await conn.close()


async def test_auth_failures_are_counted_and_logged_without_any_token(
    clean: Endpoints, caplog: pytest.LogCaptureFixture
) -> None:
    right, wrong = "right-token-7f3a9c", "wrong-token-b41d27"
    caplog.set_level(logging.DEBUG)
    cfg = make_config(clean, SDRCTL_WEBHOOK_TOKEN=right)
    async with run_daemon(cfg) as d, httpx.AsyncClient(base_url=d.url) as http:
        missing = await http.post("/webhook/evolution", json=event(PHONE, "oi"))
        refused = await http.post(
            "/webhook/evolution", json=event(PHONE, "oi"), headers={"authorization": f"Bearer {wrong}"}
        )
        accepted = await http.post(
            "/webhook/evolution", json=event(PHONE, "oi"), headers={"authorization": f"Bearer {right}"}
        )
        metrics = (await http.get("/metrics")).text
    assert missing.status_code == refused.status_code == 401 and accepted.status_code == 200
    assert metric(metrics, "sdr_webhooks_total", outcome="unauthorized") == 2
    warnings = [r for r in caplog.records if r.name == "sdr.intake" and r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("127.0.0.1" in r.getMessage() for r in warnings)
    for record in caplog.records:
        logged = f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        assert right not in logged and wrong not in logged


async def test_the_openapi_document_covers_every_route(config: Config) -> None:
    async with run_daemon(config) as d, httpx.AsyncClient(base_url=d.url) as http:
        resp = await http.get("/openapi.json")
        routes = {r.path for r in create_app(d.runtime).routes if isinstance(r, Route)}
    doc = resp.json()
    assert resp.status_code == 200 and doc["openapi"].startswith("3.0")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.0 meta-schema
    assert set(doc["paths"]) == routes
    webhook = doc["paths"]["/webhook/evolution"]["post"]["responses"]
    assert {"200", "400", "401", "413", "422", "429", "503"} <= set(webhook)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


async def test_schemathesis_finds_no_server_error_and_the_answers_match_the_document(
    clean: Endpoints,
) -> None:
    async with run_daemon(make_config(clean)) as d:

        def run() -> None:
            schema = schemathesis.openapi.from_url(f"{d.url}/openapi.json")
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(FUZZ, max_examples=100)
                @given(case=schema.as_strategy(generation_mode=mode))
                def one(case: Any) -> None:
                    case.call_and_validate(base_url=d.url, checks=CHECKS)

                one()

        await asyncio.to_thread(run)
