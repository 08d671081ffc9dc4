"""Structured logs (issue #20): `[daemon] log_format = "json"` writes one JSON object a
line (time in ISO 8601 UTC, level, logger, message; the turn's lead masked, its id, stage
and outcome when known; trace_id/span_id inside a traced turn), phones masked in every
value unless log_phones; the text format ends a traced turn's lines with `trace=<id>`."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from daemon import logs
from daemon.embedded import Endpoints
from tests.helpers import event, fetch, start_serve, wait_for
from tests.test_telemetry import receiver

PHONE = "5511966665555"
TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def record(message: str, *args: Any, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("sdr.turn", logging.WARNING, __file__, 1, message, args, None)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_the_fields_and_mask_phones() -> None:
    rec = record("stage %s failed for %s", "agent", PHONE, stage="agent", trace_id=TRACE, span_id=SPAN)
    rec.sdr_fields = {"lead": PHONE, "turn": 42, "outcome": "fallback"}
    doc = json.loads(logs.JsonLines().format(rec))
    assert doc == {
        "time": doc["time"],
        "level": "WARNING",
        "logger": "sdr.turn",
        "message": "stage agent failed for 5511*****5555",
        "lead": "5511*****5555",
        "turn": 42,
        "stage": "agent",
        "outcome": "fallback",
        "trace_id": TRACE,
        "span_id": SPAN,
    }
    at = datetime.fromisoformat(doc["time"])
    assert doc["time"].endswith("Z") and abs(at - datetime.now(UTC)) < timedelta(seconds=5)
    # log_phones: the operator asked for them, in JSON too.
    assert json.loads(logs.JsonLines(log_phones=True).format(rec))["lead"] == PHONE
    # `extra=` wins over the block's fields; an exception comes as `error`, masked.
    rec = record("plain", outcome="ok")
    rec.sdr_fields = {"outcome": "fallback"}
    try:
        raise ValueError(f"bad lead {PHONE}")
    except ValueError:
        rec.exc_info = sys.exc_info()
    doc = json.loads(logs.JsonLines().format(rec))
    assert doc["outcome"] == "ok" and "ValueError: bad lead 5511*****5555" in doc["error"] and PHONE not in doc["error"]
    assert set(json.loads(logs.JsonLines().format(record("bare")))) == {"time", "level", "logger", "message"}


def test_text_lines_end_with_the_trace_inside_a_trace_only() -> None:
    text = logs.TextLines()
    assert text.format(record("turn done", trace_id=TRACE)).endswith(f"turn done trace={TRACE}")
    assert text.format(record("turn done")).endswith("turn done")
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING sdr\.turn +turn done", text.format(record("turn done")))


async def test_serve_writes_json_lines_with_the_turn_trace(clean: Endpoints, tmp_path: Path) -> None:
    async with receiver() as collector:
        env = {
            "SDR_DATABASE_URL": clean.database_url,
            "SDR_REDIS_URL": clean.redis_url,
            "SDR_DAEMON_LOG_LEVEL": "debug",
            "SDR_DAEMON_LOG_FORMAT": "json",
            "SDR_TELEMETRY_OTLP_ENDPOINT": collector.url,
        }
        serve = await start_serve(env, tmp_path / "serve.log")
        try:
            await serve.wait_ready()
            async with httpx.AsyncClient(base_url=serve.url) as http:
                for text in ("Oi", "quanto custa?"):
                    assert (await http.post("/webhook/evolution", json=event(PHONE, text))).status_code == 200
            await wait_for(lambda: fetch(clean.database_url, "SELECT 1 FROM turns"), timeout=30)
        finally:
            assert await serve.stop() == 0
        spans = collector.spans()
    lines = serve.log.splitlines()
    docs = [json.loads(line) for line in lines]  # every line, one object
    assert len(docs) >= 5 and all({"time", "level", "logger", "message"} <= set(d) for d in docs)
    assert PHONE not in serve.log
    [turn] = [s for _, s in spans if s.name == "turn"]
    [done] = [d for d in docs if "turn done" in d["message"]]
    assert done["trace_id"] == turn.trace_id.hex() and done["span_id"] == turn.span_id.hex()
    [row] = await fetch(clean.database_url, "SELECT id, outcome FROM turns")
    assert done["lead"] == "5511*****5555" and done["turn"] == row["id"] and done["outcome"] == row["outcome"]
    assert done["logger"] == "sdr.runtime" and done["level"] == "INFO"
    # Lines outside a turn carry no trace.
    assert not any("trace_id" in d for d in docs if d["message"].startswith("serving on"))
