"""Small helpers for owned asyncio tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[Any], timeout: float | None = None, msg: str | None = None) -> bool:
    """Cancels `task` and waits (at most `timeout`) for it to end; returns whether it
    ended. Unlike `suppress(CancelledError): await task`, a cancellation of the *caller*
    while it waits still propagates."""
    task.cancel(msg)
    await asyncio.wait({task}, timeout=timeout)
    if not task.done():
        return False
    if not task.cancelled():
        task.exception()  # retrieved: the task's own error was logged where it happened
    return True


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop when it is installed (it is, with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:  # not available on every platform
        return asyncio.run(main)
    return uvloop.run(main)
