"""The per-lead message buffer, in Redis: each message pushes the lead's deadline back by
the quiet window (trailing debounce), never past the first message plus the cap. Due leads
are claimed by one Lua script, so several daemons never flush the same burst twice.

Times come from Redis's own clock (TIME inside the scripts), so daemons on machines whose
clocks differ still agree. The messages themselves are in Postgres; Redis holds only when
each lead is due, and a restart re-arms every lead with unanswered messages."""

from __future__ import annotations

from redis.asyncio import Redis

DUE = "sdr:buffer:due"  # zset: phone -> deadline (unix seconds)
FIRST = "sdr:buffer:first"  # zset: phone -> arrival of the burst's first message

_TOUCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local first = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
if not first then
  first = now
  redis.call('ZADD', KEYS[2], now, ARGV[1])
end
local deadline = math.min(now + tonumber(ARGV[2]), first + tonumber(ARGV[3]))
redis.call('ZADD', KEYS[1], deadline, ARGV[1])
return tostring(deadline - now)
"""

_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, phone in ipairs(due) do
  redis.call('ZREM', KEYS[1], phone)
  redis.call('ZREM', KEYS[2], phone)
end
return due
"""


class MessageBuffer:
    def __init__(self, redis: Redis, quiet_window: float, cap: float, claim_batch: int) -> None:
        self.redis = redis
        self.quiet_window = quiet_window
        self.cap = cap
        self.claim_batch = claim_batch
        self._touch = redis.register_script(_TOUCH)
        self._claim = redis.register_script(_CLAIM)

    async def add(self, phone: str, window: float | None = None) -> float:
        """A message arrived for `phone`; returns seconds until the lead is due."""
        wait = self.quiet_window if window is None else window
        left = await self._touch(keys=[DUE, FIRST], args=[phone, wait, self.cap])
        return float(left)

    async def claim_due(self) -> list[str]:
        """Takes the leads whose window has closed; each is returned to one caller only."""
        due = await self._claim(keys=[DUE, FIRST], args=[self.claim_batch])
        return [p.decode() if isinstance(p, bytes) else p for p in due]

    async def pending(self) -> int:
        return int(await self.redis.zcard(DUE))
