"""One turn per lead at a time, across processes: `SET NX PX` with an owner token,
renewed while the turn runs, released by compare-and-delete so a lock that expired and was
taken by another daemon is never freed by us.

Hand-off instead of waiting: a daemon that finds a lead's lock taken leaves a flag; the
holder, on release, takes the flag and re-queues the lead at once. So messages that arrive
during a turn are answered right after it, with no backoff overshoot, and no daemon sits
waiting on a lock.

The lock is not the only guard: a process paused past its TTL (GC, a stalled VM, SIGSTOP)
still believes it holds it. So each acquisition also yields a fencing token, newer than
every earlier one of the lead, that PostgreSQL checks where a turn writes (sql/0010), and a
turn checks its `Lease` before it writes: a lapsed lease stops it before anything is
written or sent. The token is Redis's clock in microseconds, kept above the lead's last
token: it survives Redis losing its data (a plain INCR would start again at 1, below the
tokens PostgreSQL already holds, and fence the lead out for good). The lead's last token
is kept for one lock TTL: past it, the clock alone keeps tokens increasing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from daemon import telemetry, unguarded
from daemon.buffer import MessageBuffer
from daemon.connections import Redis
from daemon.tasks import cancel_and_wait

log = logging.getLogger("sdr.locks")

_NEXT_FENCE = """
local now = redis.call('TIME')
local fence = math.max(now[1] * 1000000 + now[2], (tonumber(redis.call('GET', KEYS[2])) or 0) + 1)
fence = string.format('%d', fence)
redis.call('SET', KEYS[2], fence, 'PX', ARGV[3])
return fence
"""
_ACQUIRE = "if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end" + _NEXT_FENCE
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return redis.call('GETDEL', KEYS[2])
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def lock_key(phone: str) -> str:
    # The hash tag keeps every key of one lead in one Redis Cluster slot.
    return f"sdr:lock:{{{phone}}}"


def again_key(phone: str) -> str:
    return f"sdr:again:{{{phone}}}"


def fence_key(phone: str) -> str:
    return f"sdr:fence:{{{phone}}}"


@dataclass
class Lease:
    """A held lock: until `expires_at` (the event loop's clock), unless a renewal found it
    gone. A process paused past its TTL wakes up with a lapsed lease (the monotonic clock
    ran on), before any renewal could tell it."""

    token: str  # the owner's, in the lock key
    fence: int  # the fencing token: PostgreSQL refuses a write with an older one
    expires_at: float
    lost: bool = False

    @property
    def lapsed(self) -> bool:
        return self.lost or asyncio.get_running_loop().time() >= self.expires_at


class LeadLocks:
    def __init__(self, redis: Redis, ttl: float, attempts: int, backoff: float, buffer: MessageBuffer) -> None:
        self.redis = redis
        self.buffer = buffer  # where a lead handed back is re-armed
        self.ttl_ms = max(1, int(ttl * 1000))
        self.attempts = attempts
        self.backoff = backoff
        self._acquire = redis.register_script(_ACQUIRE)
        self._next_fence = redis.register_script(_NEXT_FENCE)
        self._release = redis.register_script(_RELEASE)
        self._stragglers: set[asyncio.Task[None]] = set()
        self._renew = redis.register_script(_RENEW)

    async def _take(self, phone: str) -> Lease | None:
        asked = asyncio.get_running_loop().time()
        token = secrets.token_hex(8)
        fence = await self._acquire(keys=[lock_key(phone), fence_key(phone)], args=[token, self.ttl_ms, self.ttl_ms])
        return None if fence is None else Lease(token, int(fence), asked + self.ttl_ms / 1000)

    async def try_acquire(self, phone: str) -> Lease | None:
        """The lease, or None when the lock stayed taken through every try."""
        delay = self.backoff
        for attempt in range(self.attempts):
            if lease := await self._take(phone):
                return lease
            if attempt + 1 < self.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        return None

    async def release(self, phone: str, token: str) -> bool:
        """Frees our lock (never another's); returns whether someone asked for a hand-off."""
        flag = await self._release(keys=[lock_key(phone), again_key(phone)], args=[token])
        return flag is not None

    async def acquire_or_flag(self, phone: str) -> Lease | None:
        """Takes the lock, or leaves the hand-off flag for its holder and tries again (the
        holder may have released it between our try and the flag)."""
        if lease := await self._take(phone):
            return lease
        await self.redis.set(again_key(phone), "1", px=self.ttl_ms * 2)
        return await self.try_acquire(phone)

    @contextlib.asynccontextmanager
    async def held(self, phone: str) -> AsyncIterator[Lease | None]:
        """Yields the lease, or None when the lock stayed taken; while held, it is renewed
        at a third of its TTL. After release, if another daemon asked for the lead
        (messages arrived while we held it), the lead is re-armed in the buffer to be
        answered at once."""
        if unguarded.off("lock"):  # test-only: every caller gets the lead (with a token)
            fence = await self._next_fence(keys=[lock_key(phone), fence_key(phone)], args=[0, 0, self.ttl_ms])
            yield Lease("unguarded", int(fence), float("inf"))
            return
        with telemetry.span("lock") as span:  # traced: the acquisition, not the hold
            lease = await self.acquire_or_flag(phone)
            if span is not None:
                span.set_attribute("sdr.lock.taken", lease is not None)
        if lease is None:
            yield None
            return
        stop = asyncio.Event()
        renewer = asyncio.create_task(self._keep(phone, lease, stop), name=f"lock-renew:{phone}")
        try:
            yield lease
        finally:
            # Bounded: a renewal cancelled inside the Redis client may not end at once
            # (seen in benches: the turn, and with it the lead, waited forever). It stops
            # at its next step (the flag), and is kept here until then, owned.
            stop.set()
            if not await cancel_and_wait(renewer, self.ttl_ms / 1000):
                log.warning("a lock renewal did not end when cancelled; it ends at its next step")
                self._stragglers.add(renewer)
                renewer.add_done_callback(self._stragglers.discard)
            try:
                handoff = await self.release(phone, lease.token)
            except Exception as exc:  # it expires by its TTL anyway
                log.warning("could not release the lock of a lead: %s", exc)
                handoff = False
            if handoff:
                await self.buffer.add(phone, window=0)

    async def close(self, timeout: float) -> None:
        """Cancels the renewals that did not end with their turn (shutdown)."""
        for task in list(self._stragglers):
            await cancel_and_wait(task, timeout)

    async def _keep(self, phone: str, lease: Lease, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await asyncio.sleep(self.ttl_ms / 3000)
            if stop.is_set():
                return
            asked = loop.time()
            if asked >= lease.expires_at:  # paused past the TTL: the lock may be another's now
                lease.lost = True
            try:
                renewed = await self._renew(keys=[lock_key(phone)], args=[lease.token, self.ttl_ms])
            except Exception as exc:
                log.warning("could not renew the lock of a lead: %s", exc)
                continue
            if renewed and not lease.lost:
                lease.expires_at = asked + self.ttl_ms / 1000
            else:
                lease.lost = True
                if not stop.is_set():
                    log.warning("lost the lock of a lead mid-turn (it expired)")
                return
