"""The per-lead message buffer, in Redis: each message pushes the lead's deadline back by
the quiet window (trailing debounce), never past the first message plus the cap. Due leads
are claimed by one Lua script, so several daemons never flush the same burst twice.

Times come from Redis's own clock (TIME inside the scripts), so daemons on machines whose
clocks differ still agree. The messages themselves are in Postgres; Redis holds only when
each lead is due, and a restart re-arms every lead with unanswered messages."""

from __future__ import annotations

from daemon.connections import Redis

from daemon.config import Buffer

# One hash tag for both: the scripts touch them together, so in Redis Cluster they must
# live in one slot. (Per-lead keys, like locks, are tagged with the lead's phone instead.)
DUE = "sdr:{buffer}:due"  # zset: member -> deadline (unix seconds)
FIRST = "sdr:{buffer}:first"  # zset: member -> arrival of the burst's first message

# A member is a lead's phone (its whole burst becomes one turn) or, without coalescing,
# "phone|message id" (one turn per message, as the old system did).
_TOUCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local first = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
if first and ARGV[4] == '2' then return false end
if not first then
  if ARGV[4] == '1' then return false end
  first = now
  redis.call('ZADD', KEYS[2], now, ARGV[1])
end
local deadline = math.min(now + tonumber(ARGV[2]), first + tonumber(ARGV[3]))
if ARGV[4] == '1' then  -- extending never brings a deadline closer
  local current = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
  if current and current > deadline then deadline = current end
end
redis.call('ZADD', KEYS[1], deadline, ARGV[1])
return tostring(deadline - now)
"""

_TOUCH_MANY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local cap = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local first = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[i]))
  if not first then
    first = now
    redis.call('ZADD', KEYS[2], now, ARGV[i])
  end
  redis.call('ZADD', KEYS[1], math.min(now + tonumber(ARGV[i + 1]), first + cap), ARGV[i])
end
return (#ARGV - 1) / 2
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
        self._touch_many = redis.register_script(_TOUCH_MANY)
        self._claim = redis.register_script(_CLAIM)

    async def add(self, member: str, window: float | None = None) -> float:
        """A message arrived: the member is due `window` seconds from now (never later
        than its first message plus the cap). Returns the seconds left."""
        wait = self.quiet_window if window is None else window
        left = await self._touch(keys=[DUE, FIRST], args=[member, wait, self.cap, 0])
        return float(left)

    async def add_many(self, items: list[tuple[str, float]]) -> None:
        """`add` for several members in one round trip (the intake's group commit)."""
        if items:
            args: list[str | float] = [self.cap]
            for value, window in items:
                args += [value, window]
            await self._touch_many(keys=[DUE, FIRST], args=args)

    async def add_if_absent(self, member: str, window: float) -> bool:
        """Arms a member only if it is not pending already (a safety net that must never
        push back a deadline someone else set)."""
        left = await self._touch(keys=[DUE, FIRST], args=[member, window, self.cap, 2])
        return left is not None

    async def extend(self, member: str, window: float) -> float | None:
        """Pushes back a pending member's deadline (the lead is typing); a member with
        nothing pending is left alone. Returns the seconds left, or None."""
        left = await self._touch(keys=[DUE, FIRST], args=[member, window, self.cap, 1])
        return None if left is None else float(left)

    async def claim_due(self) -> list[str]:
        """Takes the members whose window has closed; each is returned to one caller only."""
        due = await self._claim(keys=[DUE, FIRST], args=[self.claim_batch])
        return [p.decode() if isinstance(p, bytes) else p for p in due]

    async def pending(self) -> int:
        return int(await self.redis.zcard(DUE))


MEDIA_KINDS = frozenset({"image", "audio", "video", "document"})


def window_for(kind: str, text: str, settings: Buffer) -> float:
    """How long to wait for more after this message. A question or a long complete
    message is likely the end of a thought: close sooner. Media take the lead a while
    (a photo, then its caption; a voice note, then another): wait longer."""
    if not settings.adaptive:
        return settings.quiet_window
    if kind in MEDIA_KINDS:
        return settings.extended_window
    body = text.strip()
    if body.endswith("?"):
        return settings.min_window
    if len(body) >= settings.long_message_chars and body[-1:] in ".!?…":
        return settings.min_window
    return settings.quiet_window


def member(phone: str, message_id: int | None, coalesce: bool) -> str:
    """The buffer member for a message: the lead, or without coalescing the message."""
    return phone if coalesce or message_id is None else f"{phone}|{message_id}"


def parse_member(value: str) -> tuple[str, int | None]:
    phone, _, message_id = value.partition("|")
    return phone, int(message_id) if message_id else None
