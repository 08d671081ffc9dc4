"""The per-lead message buffer, in Redis: each message pushes the lead's deadline back by
the quiet window (trailing debounce), never past the first message plus the cap. Due leads
are claimed by one Lua script, so several daemons never flush the same burst twice.

Times come from Redis's own clock (TIME inside the scripts), so daemons on machines whose
clocks differ still agree. The messages themselves are in Postgres; Redis holds only when
each lead is due, and a restart re-arms every lead with unanswered messages."""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass

from daemon.config import Buffer
from daemon.connections import Redis
from daemon.models import MEDIA_KINDS
from daemon.tasks import cancel_and_wait

# One hash tag for all: the scripts touch them together, so in Redis Cluster they must live
# in one slot. (Per-lead keys, like locks, are tagged with the lead's phone instead.)
DUE = "sdr:{buffer}:due"  # zset: member -> deadline (unix seconds)
FIRST = "sdr:{buffer}:first"  # zset: member -> arrival of the burst's first message
TYPING = "sdr:{buffer}:typing"  # zset: member -> until when its "composing" counts
PRESENT = "sdr:{buffer}:present"  # zset: member -> when its presence was last seen
KEYS = [DUE, FIRST, TYPING, PRESENT]

# A member is a lead's phone (its whole burst becomes one turn) or, without coalescing,
# "phone|message id" (one turn per message, as the old system did).
#
# A message ends its lead's "composing" (WhatsApp clears it on send). A lead whose presence
# was seen lately gets at least ARGV presence window: its "composing", not a guess, says
# whether more is coming, so the turn waits out only the pause before typing starts.
_PRESENT_WINDOW = """
local function window(member, wait, now)
  redis.call('ZREM', KEYS[3], member)
  local seen = tonumber(redis.call('ZSCORE', KEYS[4], member))
  if seen and seen > now - tonumber(ARGV[#ARGV]) then
    return math.max(wait, tonumber(ARGV[#ARGV - 1]))
  end
  return wait
end
"""

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

_TOUCH_MANY = (
    _PRESENT_WINDOW
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local cap = tonumber(ARGV[1])
local soonest = math.huge
for i = 2, #ARGV - 2, 2 do
  local first = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[i]))
  if not first then
    first = now
    redis.call('ZADD', KEYS[2], now, ARGV[i])
  end
  local wait = window(ARGV[i], tonumber(ARGV[i + 1]), now)
  local deadline = math.min(now + wait, first + cap)
  redis.call('ZADD', KEYS[1], deadline, ARGV[i])
  soonest = math.min(soonest, deadline)
end
return tostring(soonest - now)
"""
)

# A due lead who is typing is not claimed yet: it is re-armed for when its "composing"
# runs out (a refresh, "paused" or a message decide sooner), but never past its first
# message plus the cap plus ARGV[2] (a lead who types forever is answered all the same).
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[3]))
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local claimed = {}
for _, member in ipairs(due) do
  local typing = tonumber(redis.call('ZSCORE', KEYS[3], member))
  local first = tonumber(redis.call('ZSCORE', KEYS[2], member)) or now
  local limit = first + tonumber(ARGV[2])
  if typing and now < limit then
    redis.call('ZADD', KEYS[1], math.min(typing, limit), member)
  else
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZREM', KEYS[2], member)
    claimed[#claimed + 1] = member
  end
end
local soonest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {claimed, soonest[2] and tostring(tonumber(soonest[2]) - now) or false}
"""

# ARGV: member, 'composing' | 'paused', typing ttl, presence window. "paused" brings a
# burst held for typing back to the presence window (the pause before typing resumes).
# Returns the seconds left of a pending burst, or false when nothing is pending.
_PRESENCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[4], now, ARGV[1])
local due = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if ARGV[2] == 'composing' then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
  if due and due > now + tonumber(ARGV[4]) then
    due = now + tonumber(ARGV[4])
    redis.call('ZADD', KEYS[1], due, ARGV[1])
  end
end
if due then return tostring(due - now) end
return false
"""

# What held replies need to know, for all of them in one call: whether each lead is armed
# again (in DUE: a message arrived, or a copy of one Evolution delivered twice), is
# typing, is known to send presence. ARGV: presence memory, then the members.
_STATES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local out = {}
for i = 2, #ARGV do
  local typing = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[i]))
  local seen = tonumber(redis.call('ZSCORE', KEYS[4], ARGV[i]))
  out[#out + 1] = redis.call('ZSCORE', KEYS[1], ARGV[i]) or ''
  out[#out + 1] = (typing and typing > now) and 1 or 0
  out[#out + 1] = (seen and seen > now - tonumber(ARGV[1])) and 1 or 0
end
return out
"""


@dataclass(frozen=True)
class LeadState:
    pending: str  # the lead's deadline when it is armed again (a message arrived), else ""
    typing: bool  # "composing" seen and not yet ended
    present: bool  # this lead's presence reaches us


class MessageBuffer:
    def __init__(
        self,
        redis: Redis,
        quiet_window: float,
        cap: float,
        claim_batch: int,
        *,
        presence_window: float = 0.0,
        typing_ttl: float = 10.0,
        presence_memory: float = 3600.0,
        typing_hold: float = 0.0,
        poll: float = 0.25,
    ) -> None:
        self.redis = redis
        self.quiet_window = quiet_window
        self.cap = cap
        self.claim_batch = claim_batch
        self.presence_window = presence_window  # least window for a lead whose presence we see
        self.typing_ttl = typing_ttl
        self.presence_memory = presence_memory
        self.typing_hold = cap + typing_hold  # a typing lead is claimed at first + this at the latest
        self._touch = redis.register_script(_TOUCH)
        self._touch_many = redis.register_script(_TOUCH_MANY)
        self._claim = redis.register_script(_CLAIM)
        self._presence = redis.register_script(_PRESENCE)
        self._states = redis.register_script(_STATES)
        # Held replies ask for their lead's state; one poller answers them all with one
        # call per `poll`, however many are held (a call each would crowd the Redis pool).
        self.poll = poll
        self._asking: dict[str, list[asyncio.Future[LeadState]]] = {}
        self._poller: asyncio.Task[None] | None = None
        # The claim loop sleeps until the soonest deadline in Redis (`next_due`, as of its
        # last claim), or until this daemon arms one sooner: not a claim every poll.
        self.next_due: float | None = None  # seconds from the last claim; None: none pending
        self._armed = math.inf  # loop time of the soonest deadline armed here since that claim
        self._sleeping_until = -math.inf
        self._wake = asyncio.Event()
        self._stopped = False

    def _presence_args(self) -> list[float]:
        return [self.presence_window, self.presence_memory]

    async def add(self, member: str, window: float | None = None) -> float:
        """A message arrived: the member is due `window` seconds from now (never later
        than its first message plus the cap). Returns the seconds left."""
        wait = self.quiet_window if window is None else window
        left = float(await self._touch(keys=KEYS, args=[member, wait, self.cap, 0]))
        self._arm(left)
        return left

    async def add_many(self, items: list[tuple[str, float]]) -> None:
        """New messages, several members in one round trip (the intake's group commit):
        like `add`, and each ends its lead's "composing"."""
        if items:
            args: list[str | float] = [self.cap]
            for value, window in items:
                args += [value, window]
            self._arm(float(await self._touch_many(keys=KEYS, args=[*args, *self._presence_args()])))

    async def add_if_absent(self, member: str, window: float) -> bool:
        """Arms a member only if it is not pending already (a safety net that must never
        push back a deadline someone else set)."""
        left = await self._touch(keys=KEYS, args=[member, window, self.cap, 2])
        if left is not None:
            self._arm(float(left))
        return left is not None

    async def extend(self, member: str, window: float) -> float | None:
        """Pushes back a pending member's deadline (the lead is typing); a member with
        nothing pending is left alone. Returns the seconds left, or None."""
        left = await self._touch(keys=KEYS, args=[member, window, self.cap, 1])
        return None if left is None else float(left)

    async def presence(self, member: str, state: str) -> float | None:
        """The lead's "composing" (held for typing_ttl) or "paused"; returns the seconds
        left of its pending burst, or None when nothing is pending."""
        left = await self._presence(keys=KEYS, args=[member, state, self.typing_ttl, self.presence_window])
        if left is None:
            return None
        self._arm(float(left))  # "paused" can bring a held burst's deadline closer
        return float(left)

    async def state(self, member: str) -> LeadState:
        """The lead's state as of the next poll (at most `poll` from now)."""
        future: asyncio.Future[LeadState] = asyncio.get_running_loop().create_future()
        self._asking.setdefault(member, []).append(future)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="buffer-states")
        return await future

    async def _poll(self) -> None:
        while self._asking:
            asking, self._asking = self._asking, {}
            members = list(asking)
            try:
                flat = await self._states(keys=KEYS, args=[self.presence_memory, *members])
            except Exception as exc:  # each asker fails its own way (the turn is re-queued)
                for futures in asking.values():
                    for f in futures:
                        if not f.done():
                            f.set_exception(exc)
            else:
                for i, member in enumerate(members):
                    pending, typing, present = flat[3 * i : 3 * i + 3]
                    state = LeadState(
                        pending.decode() if isinstance(pending, bytes) else str(pending), bool(typing), bool(present)
                    )
                    for f in asking[member]:
                        if not f.done():
                            f.set_result(state)
            await asyncio.sleep(self.poll)

    async def close(self) -> None:
        """Stops the poller (shutdown); askers still waiting get CancelledError."""
        if self._poller is not None:
            await cancel_and_wait(self._poller)
        for futures in self._asking.values():
            for f in futures:
                f.cancel()
        self._asking.clear()

    async def claim_due(self) -> list[str]:
        """Takes the members whose window has closed (and who are not typing); each is
        returned to one caller only. Sets `next_due`."""
        self._armed = math.inf  # what is armed from now on, this claim may not have seen
        due, soonest = await self._claim(keys=KEYS, args=[self.claim_batch, self.typing_hold, self.presence_memory])
        self.next_due = None if soonest is None else max(0.0, float(soonest))
        return [p.decode() if isinstance(p, bytes) else p for p in due]

    async def sleep_until_due(self, least: float, most: float) -> None:
        """The claim loop's wait: until the soonest deadline (`next_due`) or one this daemon
        armed since, at least `least` and at most `most` seconds (other daemons' bursts are
        claimed by them; `most` bounds how late a dead daemon's are picked up here)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        floor = now + least
        until = now + (most if self.next_due is None else min(most, max(least, self.next_due)))
        try:
            while (until := min(until, max(floor, self._armed))) > loop.time():
                self._sleeping_until = until
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(until):
                        await self._wake.wait()
                if self._stopped:
                    return
        finally:
            self._sleeping_until = -math.inf

    def wake(self) -> None:
        """Ends the claim loop's wait now, for good (shutdown)."""
        self._stopped = True
        self._wake.set()

    def _arm(self, seconds: float) -> None:
        """A member armed by this daemon is due in `seconds`: a sleeping claim loop that
        would wake later wakes then."""
        at = asyncio.get_running_loop().time() + seconds
        self._armed = min(self._armed, at)
        if at < self._sleeping_until:
            self._wake.set()

    async def pending(self) -> int:
        return int(await self.redis.zcard(DUE))


# Media the lead usually follows up (a photo, then its caption; a voice note, then another);
# a sticker ends a thought like a short text.
FOLLOWED_UP = MEDIA_KINDS - {"sticker"}


def window_for(kind: str, text: str, settings: Buffer) -> float:
    """How long to wait for more after this message. A question or a long complete
    message is likely the end of a thought: close sooner. Media take the lead a while
    (a photo, then its caption; a voice note, then another): wait longer."""
    if not settings.adaptive:
        return settings.quiet_window
    if kind in FOLLOWED_UP:
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
