"""Logging setup, with phone numbers masked (5511*****0000) in every record unless the
operator explicitly asked for them (`[daemon] log_phones = true`, for debugging)."""

from __future__ import annotations

import logging
import re
import sys

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


def setup_logging(level: str, *, log_phones: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)-14s %(message)s", "%H:%M:%S"))
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
