"""One turn per lead at a time, across processes: `SET NX PX` with an owner token,
renewed while the turn runs, released by compare-and-delete so a lock that expired and was
taken by another daemon is never freed by us."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from daemon.tasks import cancel_and_wait

log = logging.getLogger("sdr.locks")

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def lock_key(phone: str) -> str:
    # The hash tag keeps every key of one lead in one Redis Cluster slot.
    return f"sdr:lock:{{{phone}}}"


class LeadLocks:
    def __init__(self, redis: Redis, ttl: float, attempts: int, backoff: float) -> None:
        self.redis = redis
        self.ttl_ms = max(1, int(ttl * 1000))
        self.attempts = attempts
        self.backoff = backoff
        self._release = redis.register_script(_RELEASE)
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
        return bool(await self._release(keys=[lock_key(phone)], args=[token]))

    @contextlib.asynccontextmanager
    async def held(self, phone: str) -> AsyncIterator[bool]:
        """Yields whether the lock was taken; while held, it is renewed at a third of its TTL."""
        token = await self.try_acquire(phone)
        if token is None:
            yield False
            return
        renewer = asyncio.create_task(self._keep(phone, token), name=f"lock-renew:{phone}")
        try:
            yield True
        finally:
            await cancel_and_wait(renewer)
            try:
                await self.release(phone, token)
            except Exception as exc:  # it expires by its TTL anyway
                log.warning("could not release the lock of a lead: %s", exc)

    async def _keep(self, phone: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                renewed = await self._renew(keys=[lock_key(phone)], args=[token, self.ttl_ms])
            except Exception as exc:
                log.warning("could not renew the lock of a lead: %s", exc)
                continue
            if not renewed:
                log.warning("lost the lock of a lead mid-turn (it expired)")
                return
