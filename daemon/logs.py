"""Logging setup, with phone numbers masked (5511*****0000) in every record unless the
operator explicitly asked for them (`[daemon] log_phones = true`, for debugging).

Two formats (`[daemon] log_format`): text, one line for a person, with ` trace=<id>` at
the end of a line written inside a traced turn; json, one object a line for a log shipper:
time (ISO 8601, UTC), level, logger, message, and when known the turn's fields (lead, its
phone masked like the message; turn id; stage; outcome) and trace_id/span_id. The fields
come from `extra=` or from the block they were logged in (`fields`: a turn sets its lead,
and its id and outcome once known)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# 10 to 15 digits standing alone: a WhatsApp number (E.164 without the +), or its JID.
PHONE = re.compile(r"(?<!\d)(\d{4})(\d{2,7})(\d{4})(?!\d)")


def mask(text: str) -> str:
    return PHONE.sub(lambda m: m[1] + "*" * len(m[2]) + m[3], text)


class MaskPhones(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if masked != message:  # formatted once here; the handler prints it as is
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
        return True


class OutageOneLiners(logging.Filter):
    """asyncpg's pool logs a full traceback each time it fails to reconnect while the
    database is down; one line with the error says as much, and keeps the log readable."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncpg.pool" and record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()} ({exc.__class__.__name__}: {exc})", None
            record.exc_info, record.exc_text = None, None
        return True


# The structured fields a line may carry, by `extra=` or from its block (`fields`).
FIELDS = ("lead", "turn", "stage", "outcome")
_fields: ContextVar[dict[str, Any] | None] = ContextVar("sdr_log_fields", default=None)


@contextlib.contextmanager
def fields(**values: Any) -> Iterator[dict[str, Any]]:
    """Fields every line logged in the block carries (and tasks it starts): a turn's lead."""
    token = _fields.set({**(_fields.get() or {}), **values})
    try:
        yield _fields.get() or {}
    finally:
        _fields.reset(token)


def annotate(**values: Any) -> None:
    """More fields for the rest of the current block (a turn's id, once stored)."""
    current = _fields.get()
    if current is not None:
        current.update({k: v for k, v in values.items() if v is not None})


def install_trace_ids() -> None:
    """Every record made from now on carries the current span's trace_id and span_id (32
    and 16 hex digits) when a span is current, and its block's fields (`sdr_fields`). A
    record factory, not a handler's filter: pytest's caplog sees them too. Idempotent."""
    from opentelemetry import trace

    base = logging.getLogRecordFactory()
    if getattr(base, "_sdr_trace_ids", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = f"{ctx.trace_id:032x}"
            record.span_id = f"{ctx.span_id:016x}"
        if (values := _fields.get()) is not None:
            record.sdr_fields = values
        return record

    factory._sdr_trace_ids = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class TextLines(logging.Formatter):
    """The text format: time, level, logger, message, and ` trace=<id>` inside a trace."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)-14s %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        trace_id = getattr(record, "trace_id", None)
        return f"{line} trace={trace_id}" if trace_id else line


class JsonLines(logging.Formatter):
    """The json format: one object a line. Phone numbers are masked in every value (the
    lead field included) unless `log_phones`."""

    def __init__(self, log_phones: bool = False) -> None:
        super().__init__()
        self.clean: Callable[[str], str] = (lambda text: text) if log_phones else mask

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        doc: dict[str, Any] = {
            "time": at.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        block = getattr(record, "sdr_fields", None) or {}
        for key in FIELDS:
            value = record.__dict__.get(key, block.get(key))
            if value is not None:
                doc[key] = value if isinstance(value, int | float | bool) else str(value)
        for key in ("trace_id", "span_id"):
            if value := getattr(record, key, None):
                doc[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["error"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        for key, value in doc.items():
            if isinstance(value, str) and key not in ("time", "trace_id", "span_id"):
                doc[key] = self.clean(value)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: str, *, log_phones: bool = False, log_format: str = "text") -> None:
    """Logs to stderr, in `log_format` (text or json); phones masked unless `log_phones`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(log_phones) if log_format == "json" else TextLines())
    if log_format == "json":  # the turn's fields come with each record
        install_trace_ids()
    handler.addFilter(OutageOneLiners())
    if not log_phones:
        handler.addFilter(MaskPhones())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Every scheduled run would be two INFO lines: only its problems are worth reading.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))
