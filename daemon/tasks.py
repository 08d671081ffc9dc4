"""Small helpers for owned asyncio tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("sdr.tasks")


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


class Children:
    """The child tasks of one piece of work (a turn's typing, knowledge search): started
    with `start`, and all cancelled when the block ends, on every path (a return, an error,
    a cancel of the work itself). Like a TaskGroup, but a child's error stays its own (it
    is logged where it happens; the work goes on without it) and the wait at the end is
    bounded: a library that swallows a cancellation cannot hold the work (and the lead's
    lock) forever. A child still running after `grace` goes to `stragglers`, owned by the
    caller until it ends, and cancelled again at shutdown."""

    def __init__(self, grace: float, stragglers: set[asyncio.Task[Any]]) -> None:
        self.grace = grace
        self.stragglers = stragglers
        self.tasks: set[asyncio.Task[Any]] = set()

    def start(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        return task

    async def stop(self, task: asyncio.Task[Any]) -> None:
        """Cancels one child now (bounded, like the rest at the end)."""
        await self._cancel({task})

    async def __aenter__(self) -> Children:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._cancel(self.tasks)

    async def _cancel(self, tasks: set[asyncio.Task[Any]]) -> None:
        for task in list(tasks):
            self.tasks.discard(task)
            if not await cancel_and_wait(task, self.grace):
                log.warning("task %s did not end when cancelled", task.get_name())
                self.stragglers.add(task)
                task.add_done_callback(self.stragglers.discard)
