"""One turn per lead at a time, across processes: `SET NX PX` with an owner token,
renewed while the turn runs, released by compare-and-delete so a lock that expired and was
taken by another daemon is never freed by us.

Hand-off instead of waiting: a daemon that finds a lead's lock taken leaves a flag; the
holder, on release, takes the flag and re-queues the lead at once. So messages that arrive
during a turn are answered right after it, with no backoff overshoot, and no daemon sits
waiting on a lock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from daemon.buffer import MessageBuffer
from daemon.connections import Redis
from daemon.tasks import cancel_and_wait

log = logging.getLogger("sdr.locks")

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


class LeadLocks:
    def __init__(self, redis: Redis, ttl: float, attempts: int, backoff: float, buffer: MessageBuffer) -> None:
        self.redis = redis
        self.buffer = buffer  # where a lead handed back is re-armed
        self.ttl_ms = max(1, int(ttl * 1000))
        self.attempts = attempts
        self.backoff = backoff
        self._release = redis.register_script(_RELEASE)
        self._stragglers: set[asyncio.Task[None]] = set()
        self._renew = redis.register_script(_RENEW)

    async def try_acquire(self, phone: str) -> str | None:
        """Returns the owner token, or None when the lock stayed taken through every try."""
        token = secrets.token_hex(8)
        delay = self.backoff
        for attempt in range(self.attempts):
            if await self.redis.set(lock_key(phone), token, nx=True, px=self.ttl_ms):
                return token
            if attempt + 1 < self.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        return None

    async def release(self, phone: str, token: str) -> bool:
        """Frees our lock (never another's); returns whether someone asked for a hand-off."""
        flag = await self._release(keys=[lock_key(phone), again_key(phone)], args=[token])
        return flag is not None

    async def acquire_or_flag(self, phone: str) -> str | None:
        """Takes the lock, or leaves the hand-off flag for its holder and tries again (the
        holder may have released it between our try and the flag)."""
        if await self.redis.set(lock_key(phone), token := secrets.token_hex(8), nx=True, px=self.ttl_ms):
            return token
        await self.redis.set(again_key(phone), "1", px=self.ttl_ms * 2)
        return await self.try_acquire(phone)

    @contextlib.asynccontextmanager
    async def held(self, phone: str) -> AsyncIterator[bool]:
        """Yields whether the lock was taken; while held, it is renewed at a third of its
        TTL. After release, if another daemon asked for the lead (messages arrived while
        we held it), the lead is re-armed in the buffer to be answered at once."""
        token = await self.acquire_or_flag(phone)
        if token is None:
            yield False
            return
        stop = asyncio.Event()
        renewer = asyncio.create_task(self._keep(phone, token, stop), name=f"lock-renew:{phone}")
        try:
            yield True
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
                handoff = await self.release(phone, token)
            except Exception as exc:  # it expires by its TTL anyway
                log.warning("could not release the lock of a lead: %s", exc)
                handoff = False
            if handoff:
                await self.buffer.add(phone, window=0)

    async def close(self, timeout: float) -> None:
        """Cancels the renewals that did not end with their turn (shutdown)."""
        for task in list(self._stragglers):
            await cancel_and_wait(task, timeout)

    async def _keep(self, phone: str, token: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.ttl_ms / 3000)
            if stop.is_set():
                return
            try:
                renewed = await self._renew(keys=[lock_key(phone)], args=[token, self.ttl_ms])
            except Exception as exc:
                log.warning("could not renew the lock of a lead: %s", exc)
                continue
            if not renewed:
                if not stop.is_set():
                    log.warning("lost the lock of a lead mid-turn (it expired)")
                return
