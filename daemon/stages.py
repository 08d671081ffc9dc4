"""A turn's stages, timed: each runs under its timeout from the profile; one that times out
or fails is recorded on the turn, counted, and raised as StageFailed. Traced, each stage is
a span of the turn's trace, named after it (daemon.telemetry)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from daemon import telemetry
from daemon.errors import StageFailed
from daemon.metrics import Metrics

log = logging.getLogger("sdr.turn")
T = TypeVar("T")


@dataclass
class StageClock:
    """Times each stage of one turn; records which timed out or failed, and cache use."""

    metrics: Metrics
    times: dict[str, float] = field(default_factory=dict)
    timeouts: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0

    async def run(
        self, stage: str, work: Awaitable[T], timeout: float | None, passthrough: tuple[type[Exception], ...] = ()
    ) -> T:
        """`passthrough`: exceptions that are not the stage's failure (a streamed reply
        stopped by its turn), raised as they are."""
        start = time.perf_counter()
        with telemetry.span(stage, errors=False) as span:
            try:
                async with asyncio.timeout(timeout or None):
                    return await work
            except passthrough:
                raise
            except TimeoutError:
                self.timeouts.append(stage)
                self.metrics.timeouts.labels(stage).inc()
                telemetry.failed(span, f"timed out after {timeout}s")
                log.warning("stage %s timed out after %.2fs", stage, timeout, extra={"stage": stage})
                raise StageFailed(stage) from None
            except Exception as exc:
                self.failures.append(stage)
                self.metrics.failures.labels(stage).inc()
                telemetry.failed(span, f"{exc.__class__.__name__}: {exc}")
                log.warning("stage %s failed: %s: %s", stage, exc.__class__.__name__, exc, extra={"stage": stage})
                raise StageFailed(stage) from exc
            finally:
                elapsed = time.perf_counter() - start
                self.times[stage] = round(elapsed * 1000, 3)
                self.metrics.stage_time.labels(stage).observe(elapsed)

    def cache_use(self, hit: bool) -> None:
        if hit:
            self.cache_hits += 1
        else:
            self.cache_misses += 1
