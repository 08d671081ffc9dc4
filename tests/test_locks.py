"""Lead locks and the buffer's claim, on the real Redis: the two things that keep several
daemons from answering one lead twice."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from daemon.buffer import MessageBuffer
from daemon.embedded import Endpoints
from daemon.locks import LeadLocks, again_key, lock_key

PHONE = "5511966665555"


def locks_on(r: aioredis.Redis, ttl: float, attempts: int, backoff: float) -> tuple[LeadLocks, MessageBuffer]:
    buffer = MessageBuffer(r, quiet_window=0.05, cap=1, claim_batch=10)
    return LeadLocks(r, ttl=ttl, attempts=attempts, backoff=backoff, buffer=buffer), buffer


async def test_a_lock_is_exclusive_and_only_its_owner_releases_it(clean: Endpoints) -> None:
    r = aioredis.Redis.from_url(clean.redis_url)
    locks, _ = locks_on(r, ttl=5, attempts=3, backoff=0.01)
    try:
        mine = await locks.try_acquire(PHONE)
        theirs = await locks.try_acquire(PHONE)
        await locks.release(PHONE, "not-the-owner")
        still_held = await r.get(lock_key(PHONE))
        await locks.release(PHONE, mine.token if mine else "")
        again = await locks.try_acquire(PHONE)
    finally:
        await r.aclose()
    assert mine is not None and theirs is None
    assert still_held == mine.token.encode()  # a wrong token frees nothing
    assert again is not None and again.fence > mine.fence  # each acquisition: a newer token


async def test_a_busy_lead_is_handed_back_by_its_holder(clean: Endpoints) -> None:
    """A daemon that finds the lead held leaves a flag; the holder, on release, re-arms
    the lead in the buffer (due at once), and only the holder does."""
    r = aioredis.Redis.from_url(clean.redis_url)
    locks, buffer = locks_on(r, ttl=5, attempts=2, backoff=0.01)
    try:
        async with locks.held(PHONE) as first:
            async with locks.held(PHONE) as second:  # another daemon, same lead
                pass
            during = await buffer.claim_due()  # the loser does not hand off; the holder will
        handed = await buffer.claim_due()
        flag_left = await r.exists(again_key(PHONE))
        async with locks.held(PHONE) as third:
            pass
        again = await buffer.claim_due()
    finally:
        await r.aclose()
    assert first and not second and third
    assert during == [] and handed == [PHONE]  # once, by the holder, after its release
    assert flag_left == 0 and again == []


async def test_a_held_lock_is_renewed_past_its_ttl_and_freed_after(clean: Endpoints) -> None:
    r = aioredis.Redis.from_url(clean.redis_url)
    locks, _ = locks_on(r, ttl=0.3, attempts=1, backoff=0.01)
    try:
        async with locks.held(PHONE) as got:
            await asyncio.sleep(0.8)  # well past the TTL: only renewal keeps it
            during = await locks.try_acquire(PHONE)
        after = await r.exists(lock_key(PHONE))
    finally:
        await r.aclose()
    assert got and during is None and after == 0


async def test_a_turn_ends_even_if_its_lock_renewal_swallows_the_cancel(clean: Endpoints) -> None:
    """The bench's rare unanswered bursts: a renewal cancelled inside the Redis client did
    not end, the turn waited for it forever with the lock still renewed, and the lead was
    never answered again. The turn now ends, frees the lock, and the renewal stops."""
    r = aioredis.Redis.from_url(clean.redis_url)
    locks, _ = locks_on(r, ttl=0.3, attempts=1, backoff=0.01)
    renew = locks._renew
    inside = asyncio.Event()

    async def swallows_one_cancel(keys: list[str], args: list[object]) -> object:
        inside.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:  # like a client that finishes its own clean-up first
            await asyncio.sleep(0.05)
            return await renew(keys=keys, args=args)
        return None

    locks._renew = swallows_one_cancel  # type: ignore[assignment]
    try:
        async with asyncio.timeout(5):
            async with locks.held(PHONE) as got:
                await inside.wait()
            after = await r.exists(lock_key(PHONE))
            while locks._stragglers:  # it stops on its own at its next step
                await asyncio.sleep(0.05)
    finally:
        await r.aclose()
    assert got and after == 0


async def test_acquisition_backs_off_and_succeeds_when_the_holder_lets_go(clean: Endpoints) -> None:
    r = aioredis.Redis.from_url(clean.redis_url)
    locks, _ = locks_on(r, ttl=5, attempts=6, backoff=0.02)
    try:
        first = await locks.try_acquire(PHONE)
        assert first is not None
        waiter = asyncio.create_task(locks.try_acquire(PHONE))
        await asyncio.sleep(0.1)
        await locks.release(PHONE, first.token)
        second = await waiter
    finally:
        await r.aclose()
    assert second is not None and second.token != first.token and second.fence > first.fence


async def test_concurrent_claims_hand_each_due_lead_to_one_claimer(clean: Endpoints) -> None:
    r = aioredis.Redis.from_url(clean.redis_url)
    buffers = [MessageBuffer(r, quiet_window=0.05, cap=1, claim_batch=7) for _ in range(4)]
    try:
        for i in range(100):
            await buffers[0].add(f"55119{i:08d}")
        await asyncio.sleep(0.1)
        claimed: list[str] = []
        while len(claimed) < 100:
            rounds = await asyncio.gather(*(b.claim_due() for b in buffers))
            claimed += [p for batch in rounds for p in batch]
            assert all(len(batch) <= 7 for batch in rounds)
    finally:
        await r.aclose()
    assert sorted(claimed) == sorted(f"55119{i:08d}" for i in range(100))  # each exactly once


async def test_the_window_never_passes_the_cap(clean: Endpoints) -> None:
    r = aioredis.Redis.from_url(clean.redis_url)
    buffer = MessageBuffer(r, quiet_window=10, cap=0.5, claim_batch=10)
    try:
        first = await buffer.add(PHONE)
        await asyncio.sleep(0.2)
        later = await buffer.add(PHONE)
    finally:
        await r.aclose()
    assert first <= 0.5 and later <= 0.3 + 0.01
