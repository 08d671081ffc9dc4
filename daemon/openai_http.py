"""What the OpenAI-compatible clients (chat completions, transcriptions) share: error
text from an answer, and one-line messages that never repeat the API key."""

from __future__ import annotations

import httpx


def one_line(what: object, key: str | None) -> str:
    # Error bodies can echo the request (some proxies print the key): never repeat it.
    text = " ".join(str(what).split()) or what.__class__.__name__
    if key:
        text = text.replace(key, "***")
    return text[:200]


def error_text(resp: httpx.Response) -> str:
    """OpenAI's `{"error": {"message": ...}}` when present, else the body's start."""
    try:
        message = resp.json()["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return resp.text[:200] or resp.reason_phrase
