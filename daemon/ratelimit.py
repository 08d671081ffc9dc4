"""Per-lead rate limit on the webhook: a token bucket per phone number.

One misbehaving lead (or a script posting as one) must not flood the intake and the
agent, while every other lead is still served. Buckets live in this process only: behind
a load balancer one number gets at most N times the rate over N daemons, still bounded,
and no shared store (Redis) is consulted on the hot path. Memory is bounded too: past
`tracked` phones the least recently seen one is forgotten; a forgotten phone starts again
with a full bucket, which only ever errs on the side of serving a lead."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class LeadRateLimiter:
    """`rate` webhooks per second per phone, bursts of up to `burst`; `rate` 0 = no limit."""

    def __init__(self, rate: float, burst: int, tracked: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.tracked = tracked
        self.clock = clock
        # phone -> [tokens left, when they were counted]; order = least recently seen first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def wait(self, phone: str) -> float:
        """Takes a token for `phone`: 0.0 when allowed, else seconds until one is free."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(phone)
        if bucket is None:
            bucket = self._buckets[phone] = [float(self.burst), now]
            if len(self._buckets) > self.tracked:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(phone)
            bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate  # a refused request takes no token


def retry_after(wait: float) -> str:
    """The `Retry-After` header: whole seconds, never 0 (0 would invite an instant retry)."""
    return str(max(1, math.ceil(wait)))
