"""The two-tier cache against a real Redis: hits by tier, bounds, TTLs, invalidation across
"daemons" (two cache objects on one Redis), Redis outages and concurrent loads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from daemon.cache import CHANNEL, CacheInvalidations, TwoTierCache
from daemon.embedded import Endpoints
from daemon.metrics import Metrics
from daemon.models import KbEntry
from daemon.tasks import cancel_and_wait
from tests.helpers import wait_for

Lead = dict[str, Any]


def redis_client(url: str) -> Redis:
    # As the runtime builds it: explicit timeouts, no hidden retries.
    return Redis.from_url(
        url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0), retry_on_error=[]
    )


@pytest.fixture
async def rds(clean: Endpoints) -> AsyncIterator[Redis]:
    r = redis_client(clean.redis_url)
    yield r
    await r.aclose()


def make_cache(redis: Redis, value_type: Any = Lead, name: str = "lead", **kw: Any) -> TwoTierCache[Any]:
    opts: dict[str, Any] = {"ttl": 60.0, "local_ttl": 30.0, "size": 100, "enabled": True, "metrics": Metrics()}
    return TwoTierCache(name, redis, value_type, **(opts | kw))


class Loader:
    """Counts its calls; can be held until released, to make loads overlap."""

    def __init__(self, value: Any, *, hold: bool = False) -> None:
        self.value = value
        self.calls = 0
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self) -> Any:
        self.calls += 1
        await self.release.wait()
        return self.value


def hits(cache: TwoTierCache[Any], metrics: Metrics, tier: str) -> float:
    labels = {"cache": cache.name, "tier": tier}
    return metrics.registry.get_sample_value("sdr_cache_hits_total", labels) or 0.0


def misses(cache: TwoTierCache[Any], metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("sdr_cache_misses_total", {"cache": cache.name}) or 0.0


async def subscribers(r: Redis) -> int:
    return int((await r.pubsub_numsub(CHANNEL))[0][1])


async def no_subscribers(r: Redis) -> bool:
    return await subscribers(r) == 0


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async def probe() -> bool:
        return check()

    await wait_for(probe, timeout)


async def test_miss_then_local_hit_then_redis_hit_in_another_daemon(rds: Redis) -> None:
    ma, mb = Metrics(), Metrics()
    a, b = make_cache(rds, metrics=ma), make_cache(rds, metrics=mb)
    load = Loader({"id": 7, "name": "Ana"})

    assert await a.get_or_load("5511999990001", load) == {"id": 7, "name": "Ana"}
    assert (load.calls, a.misses, a.hits, misses(a, ma)) == (1, 1, 0, 1)
    assert 0 < await rds.pttl("sdr:cache:lead:{5511999990001}") <= 60_000

    assert await a.get_or_load("5511999990001", load) == {"id": 7, "name": "Ana"}
    assert (load.calls, a.hits, hits(a, ma, "local")) == (1, 1, 1)

    # Another daemon: Redis answers first, then its own local tier.
    assert await b.get_or_load("5511999990001", load) == {"id": 7, "name": "Ana"}
    assert (load.calls, b.misses, hits(b, mb, "redis"), hits(b, mb, "local")) == (1, 0, 1, 0)
    assert await b.get("5511999990001") == {"id": 7, "name": "Ana"}
    assert (hits(b, mb, "redis"), hits(b, mb, "local"), b.hits) == (1, 1, 2)
    assert await b.get("5511999990002") is None
    assert b.misses == 1


async def test_local_tier_is_a_bounded_lru(rds: Redis) -> None:
    metrics = Metrics()
    cache = make_cache(rds, size=4, metrics=metrics)
    for i in range(12):
        await cache.get_or_load(f"k{i}", Loader({"i": i}))
        if i >= 2:
            assert await cache.get("k2") == {"i": 2}  # kept as most recently used
        assert len(cache) <= 4
    assert len(cache) == 4 and cache.misses == 12 and hits(cache, metrics, "local") == 10
    for key in ("k2", "k9", "k10", "k11"):  # the most recently used stayed in process
        await cache.get(key)
    assert hits(cache, metrics, "local") == 14
    assert await cache.get("k0") == {"i": 0}  # evicted locally, still in Redis
    assert hits(cache, metrics, "redis") == 1 and len(cache) == 4
    assert len(await rds.keys("sdr:cache:lead:*")) == 12


async def test_local_entries_expire_after_local_ttl(rds: Redis) -> None:
    metrics = Metrics()
    cache = make_cache(rds, local_ttl=0.05, metrics=metrics)
    load = Loader({"v": 1})
    await cache.get_or_load("k", load)
    assert await cache.get("k") == {"v": 1} and hits(cache, metrics, "local") == 1
    await asyncio.sleep(0.1)
    assert await cache.get_or_load("k", load) == {"v": 1}
    assert (load.calls, hits(cache, metrics, "redis")) == (1, 1)  # Redis still had it

    # A local entry never outlives its Redis copy: local_ttl is capped by ttl.
    short = make_cache(rds, name="short", ttl=0.05, local_ttl=30.0)
    await short.get_or_load("k", load)
    await asyncio.sleep(0.1)
    assert await short.get("k") is None
    assert short.misses == 2


async def test_redis_entries_expire_after_ttl_and_local_ttl_zero_disables_tier_one(rds: Redis) -> None:
    cache = make_cache(rds, list[str], ttl=0.1, local_ttl=0)
    load = Loader(["a", "b"])
    await cache.get_or_load("k", load)
    assert len(cache) == 0
    assert await cache.get_or_load("k", load) == ["a", "b"] and cache.hits == 1  # from Redis
    await asyncio.sleep(0.2)
    assert await rds.exists("sdr:cache:lead:{k}") == 0
    assert await cache.get_or_load("k", load) == ["a", "b"]
    assert load.calls == 2


async def test_invalidate_drops_the_key_in_another_daemons_local_tier(rds: Redis, clean: Endpoints) -> None:
    rb = redis_client(clean.redis_url)  # daemon B has its own connections
    a, b = make_cache(rds), make_cache(rb)
    other = make_cache(rb, name="kb", value_type=list[str])
    listener = asyncio.create_task(CacheInvalidations(rb, [b, other]).run())
    try:
        await wait_for(lambda: subscribers(rds), timeout=5)
        await a.get_or_load("5511", Loader({"stage": "new"}))
        await b.get_or_load("5511", Loader(None))
        await other.get_or_load("5511", Loader(["same key, other cache"]))
        assert len(b) == 1 and len(other) == 1

        await a.invalidate("5511")  # daemon A changed the lead
        assert len(a) == 0 and await rds.exists("sdr:cache:lead:{5511}") == 0
        await until(lambda: len(b) == 0)
        assert len(other) == 1  # only the named cache is touched
        fresh = Loader({"stage": "qualified"})
        assert await b.get_or_load("5511", fresh) == {"stage": "qualified"} and fresh.calls == 1
    finally:
        assert await cancel_and_wait(listener, timeout=5)
        await rb.aclose()
    assert listener.cancelled()
    await wait_for(lambda: no_subscribers(rds), timeout=5)  # the pubsub was closed


async def test_listener_survives_losing_its_connection(
    rds: Redis, clean: Endpoints, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sdr.cache")
    rb = redis_client(clean.redis_url)
    a, b = make_cache(rds), make_cache(rb)
    listener = asyncio.create_task(CacheInvalidations(rb, [b], retry_delay=0.05).run())
    try:
        await wait_for(lambda: subscribers(rds), timeout=5)
        await b.get_or_load("k", Loader({"v": 1}))
        await rds.client_kill_filter(_type="pubsub")  # what a Redis restart does to it
        await until(lambda: "listening again" in caplog.text)
        # Invalidations sent while it was away are lost, so it forgot its local tier.
        assert len(b) == 0
        await wait_for(lambda: subscribers(rds), timeout=5)
        await b.get_or_load("k", Loader(None))
        assert len(b) == 1
        await a.invalidate("k")
        await until(lambda: len(b) == 0)
    finally:
        await cancel_and_wait(listener, timeout=5)
        await rb.aclose()
    lost = [r for r in caplog.records if "lost Redis" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING


async def test_disabled_cache_always_calls_the_loader(rds: Redis) -> None:
    metrics = Metrics()
    cache = make_cache(rds, enabled=False, metrics=metrics)
    load = Loader({"v": 1})
    for _ in range(3):
        assert await cache.get_or_load("k", load) == {"v": 1}
    await cache.set("k", {"v": 2})
    assert await cache.get("k") is None
    assert (load.calls, cache.misses, cache.hits, misses(cache, metrics)) == (3, 4, 0, 4)
    assert len(cache) == 0 and await rds.keys("sdr:cache:*") == []
    # The same types as with the cache on.
    assert await cache.get_or_load("t", Loader({"tags": ("solar",)})) == {"tags": ["solar"]}


async def test_dead_redis_falls_back_to_the_loader(caplog: pytest.LogCaptureFixture) -> None:
    dead = Redis.from_url(
        "unix:///nonexistent.sock", socket_connect_timeout=0.2, socket_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    try:
        cache = make_cache(dead, local_ttl=0)  # no local tier: every call goes to Redis
        load = Loader({"v": 1})
        assert await cache.get_or_load("k", load) == {"v": 1}
        assert await cache.get_or_load("k", load) == {"v": 1}
        assert await cache.get("k") is None
        await cache.set("k", {"v": 2})
        await cache.invalidate("k")
        assert load.calls == 2 and cache.misses == 3
        # One warning for the outage, not one per call.
        assert len([r for r in caplog.records if r.name == "sdr.cache" and r.levelno == logging.WARNING]) == 1

        # The local tier still works without Redis, and invalidate still drops it.
        local = make_cache(dead)
        await local.get_or_load("k", load)
        assert await local.get_or_load("k", load) == {"v": 1} and load.calls == 3
        await local.invalidate("k")
        assert len(local) == 0
    finally:
        await dead.aclose()


async def test_concurrent_loads_of_one_key_call_the_loader_once(rds: Redis) -> None:
    cache = make_cache(rds)
    load = Loader({"v": 1}, hold=True)
    calls = [asyncio.create_task(cache.get_or_load("k", load)) for _ in range(20)]
    await until(lambda: load.calls > 0)
    await asyncio.sleep(0.02)  # let every caller reach the wait
    load.release.set()
    results = await asyncio.gather(*calls)
    assert results == [{"v": 1}] * 20 and load.calls == 1
    assert (cache.misses, cache.hits) == (1, 19)
    results[0]["v"] = 99  # each caller has its own copy
    assert results[1] == {"v": 1}


async def test_a_failed_or_cancelled_load_is_not_kept(rds: Redis) -> None:
    cache = make_cache(rds)

    async def boom() -> Lead:
        await asyncio.sleep(0.02)
        raise RuntimeError("database down")

    outcomes = await asyncio.gather(*(cache.get_or_load("k", boom) for _ in range(3)), return_exceptions=True)
    assert [str(o) for o in outcomes] == ["database down"] * 3
    load = Loader({"v": 1})
    assert await cache.get_or_load("k", load) == {"v": 1} and load.calls == 1

    # The caller that was loading is cancelled: the one waiting on it loads by itself.
    held = Loader({"v": 2}, hold=True)
    first = asyncio.create_task(cache.get_or_load("j", held))
    await until(lambda: held.calls == 1)
    second = asyncio.create_task(cache.get_or_load("j", Loader({"v": 3})))
    await asyncio.sleep(0.02)
    await cancel_and_wait(first)
    assert first.cancelled() and await second == {"v": 3}


async def test_a_load_dropped_midway_is_not_stored(rds: Redis) -> None:
    cache = make_cache(rds)
    load = Loader({"stage": "old"}, hold=True)
    task = asyncio.create_task(cache.get_or_load("k", load))
    await until(lambda: load.calls == 1)
    cache.drop_local("k")  # an invalidation arrives while the old value is being read
    load.release.set()
    assert await task == {"stage": "old"}  # the caller that asked before still gets it
    assert len(cache) == 0 and await rds.exists("sdr:cache:lead:{k}") == 0


async def test_values_decode_into_the_declared_type(rds: Redis) -> None:
    entries = [
        KbEntry(1, "precos", "Quanto custa", "Depende da conta de luz.", 0.9),
        KbEntry(2, "economia", "Quanto economizo", "Até 95% da conta.", 0.5),
    ]
    a = make_cache(rds, list[KbEntry], name="kb")
    b = make_cache(rds, list[KbEntry], name="kb")
    assert await a.get_or_load("conta de luz", Loader(entries)) == entries
    got = await b.get_or_load("conta de luz", Loader(None))
    assert got == entries and all(isinstance(e, KbEntry) for e in got) and b.hits == 1

    # An empty result is a result and is cached; None ("not found") is not.
    empty = Loader([])
    await a.get_or_load("nada", empty)
    assert await a.get_or_load("nada", empty) == [] and empty.calls == 1
    nothing = Loader(None)
    await a.get_or_load("ninguém", nothing)
    await a.get_or_load("ninguém", nothing)
    assert nothing.calls == 2

    # Every tier returns the types the decoder makes, so a miss matches a hit.
    leads = make_cache(rds)
    assert await leads.get_or_load("t", Loader({"tags": ("solar", "residencial")})) == {
        "tags": ["solar", "residencial"]
    }


async def test_set_writes_both_tiers_and_beats_a_load_in_flight(rds: Redis) -> None:
    a, b = make_cache(rds), make_cache(rds)
    old = Loader({"v": 1}, hold=True)
    loading = asyncio.create_task(a.get_or_load("k", old))
    await until(lambda: old.calls == 1)
    await a.set("k", {"v": 2})  # newer than what the load is reading
    old.release.set()
    await loading
    assert await a.get("k") == {"v": 2} and a.hits == 1
    assert await b.get("k") == {"v": 2} and b.hits == 1  # from Redis


async def test_a_redis_entry_of_another_shape_is_a_miss(rds: Redis) -> None:
    await rds.set("sdr:cache:kb:q", b'{"old": "shape"}')
    cache = make_cache(rds, list[KbEntry], name="kb")
    fresh = [KbEntry(1, "c", "t", "x", 1.0)]
    assert await cache.get_or_load("q", Loader(fresh)) == fresh
    assert cache.misses == 1 and await rds.get("sdr:cache:kb:q") is not None
    assert await make_cache(rds, list[KbEntry], name="kb").get("q") == fresh
