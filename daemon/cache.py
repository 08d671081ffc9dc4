"""Two-tier cache: a bounded in-process LRU (with TTL) in front of Redis, shared by every
daemon. Used for lead-by-phone and knowledge-base search results.

Both tiers hold the msgspec JSON bytes and every read decodes them, so a caller gets the
same types whichever tier answered (or the loader), and can never mutate a cached entry.
Redis trouble never fails a caller: reads fall back to the loader, writes are skipped.
`CacheInvalidations` carries invalidations to the local tiers of the other daemons."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar, cast

import msgspec
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from daemon.connections import Redis, subscriber
from daemon.metrics import Metrics

log = logging.getLogger("sdr.cache")

T = TypeVar("T")
CHANNEL = "sdr:cache:invalidate"
SEP = "\x1f"
RECONNECT_DELAY = 0.5  # seconds between attempts to resubscribe after a Redis error
ALL = "\x00all"  # an invalidation of every key of a cache
REDIS_ERRORS = (RedisError, OSError, TimeoutError)


class TwoTierCache(Generic[T]):
    def __init__(
        self,
        name: str,
        redis: Redis,
        value_type: type[T],
        *,
        ttl: float,
        local_ttl: float,
        size: int,
        enabled: bool,
        metrics: Metrics,
    ) -> None:
        if SEP in name:
            raise ValueError(f"cache name {name!r} must not contain \\x1f")
        self.name = name
        self.redis = redis
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self._ttl_ms = max(1, int(ttl * 1000))
        # An entry never outlives its Redis copy; local_ttl == 0 turns the local tier off.
        self._local_ttl = min(ttl, local_ttl) if local_ttl > 0 else 0.0
        self._size = size
        self._local: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        # One load per missing key at a time; the entry goes when the load ends.
        self._loading: dict[str, asyncio.Future[bytes | None]] = {}
        self._drops = 0  # bumped by every drop: a read that spans one must not fill the local tier
        self._redis_down = False
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder(value_type).decode
        self._local_hit = metrics.cache_hits.labels(cache=name, tier="local")
        self._redis_hit = metrics.cache_hits.labels(cache=name, tier="redis")
        self._miss = metrics.cache_misses.labels(cache=name)

    def __len__(self) -> int:
        return len(self._local)

    def redis_key(self, key: str) -> str:
        return redis_key(self.name, key)

    # --- reads ----------------------------------------------------------------------

    async def get_or_load(self, key: str, loader: Callable[[], Awaitable[T]]) -> T:
        if not self.enabled:
            self._count(None)
            loaded = await loader()
            # Same types as with the cache on, so a profile switch cannot change behaviour.
            return loaded if loaded is None else self._decode(self._encode(loaded))
        while True:
            if (data := self._local_get(key)) is not None:
                self._count("local")
                return self._decode(data)
            pending = self._loading.get(key)
            if pending is None:
                break
            try:
                # shield: a follower that is cancelled must not cancel the others' load.
                data = await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and not (task and task.cancelling()):
                    continue  # the caller that was loading got cancelled, not us: load ourselves
                raise
            if data is None:  # the loader found nothing: we would not find more
                self._count(None)
                return cast(T, None)  # such a loader returns Optional values
            self._count("local")  # served in process without a load
            return self._decode(data)
        return await self._load(key, loader)

    async def _load(self, key: str, loader: Callable[[], Awaitable[T]]) -> T:
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut  # before any await, so concurrent callers join this load
        data: bytes | None
        try:
            found = await self._redis_get(key)
            if found is not None:
                self._count("redis")
                data, value = found
                if self._loading.get(key) is fut:
                    self._local_put(key, data)
            else:
                self._count(None)
                loaded = await loader()
                data = None if loaded is None else self._encode(loaded)
                # Through JSON like every hit, so a miss returns the same types as a hit
                # (and a loader returning the wrong shape fails here, before it is stored).
                value = loaded if data is None else self._decode(data)
                # Dropped while loading (invalidated): the value may predate the change.
                if data is not None and self._loading.get(key) is fut:
                    self._local_put(key, data)
                    await self._redis_set(key, data)
        except Exception as exc:
            fut.set_exception(exc)  # the callers waiting on this load see its error
            fut.exception()  # marked retrieved: with no follower asyncio would log it
            raise
        except BaseException:
            fut.cancel()  # we were cancelled: the callers waiting load themselves
            raise
        else:
            fut.set_result(data)
        finally:
            if self._loading.get(key) is fut:
                del self._loading[key]
        return value

    async def get(self, key: str) -> T | None:
        if not self.enabled:
            self._count(None)
            return None
        if (data := self._local_get(key)) is not None:
            self._count("local")
            return self._decode(data)
        drops = self._drops
        found = await self._redis_get(key)
        if found is None:
            self._count(None)
            return None
        self._count("redis")
        if drops == self._drops:
            self._local_put(key, found[0])
        return found[1]

    # --- writes ---------------------------------------------------------------------

    async def set(self, key: str, value: T) -> None:
        """Stores a value in both tiers. It does not reach other daemons' local tiers:
        when the source changed, `invalidate` first (a fill after a miss needs nothing)."""
        if not self.enabled:
            return
        data = self._encode(value)
        self._forget(key)  # a load in flight must not overwrite this newer value
        self._local_put(key, data)
        await self._redis_set(key, data)

    async def replace(self, key: str, value: T) -> None:
        """The source changed: other daemons drop their copy; here and Redis hold the new one."""
        await self.invalidate(key)
        await self.set(key, value)

    async def invalidate(self, key: str) -> None:
        """Drops the key here, in Redis and in the local tiers of every other daemon."""
        self.drop_local(key)
        try:
            # Two commands, not a pipeline: a Redis Cluster refuses PUBLISH in a pipeline.
            await self.redis.delete(self.redis_key(key))
            await self.redis.publish(CHANNEL, f"{self.name}{SEP}{key}")
            self._redis_ok()
        except REDIS_ERRORS as exc:
            self._redis_failed("invalidation", exc)

    async def invalidate_all(self) -> None:
        """Drops every entry, here, in Redis and in every other daemon's local tier (the
        source changed as a whole, e.g. the knowledge base was edited)."""
        self.clear_local()
        try:
            await drop_everywhere(self.redis, self.name)
            self._redis_ok()
        except REDIS_ERRORS as exc:
            self._redis_failed("invalidation", exc)

    def drop_local(self, key: str) -> None:
        self._local.pop(key, None)
        self._forget(key)

    def clear_local(self) -> None:
        """Forgets the whole local tier (invalidations may have been missed)."""
        self._local.clear()
        self._loading.clear()
        self._drops += 1

    # --- internals ------------------------------------------------------------------

    def _forget(self, key: str) -> None:
        # The load keeps running for the callers already waiting on it, but its result
        # is not stored; later callers start a fresh one.
        self._loading.pop(key, None)
        self._drops += 1

    def _local_get(self, key: str) -> bytes | None:
        entry = self._local.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._local[key]
            return None
        self._local.move_to_end(key)
        return entry[1]

    def _local_put(self, key: str, data: bytes) -> None:
        if self._local_ttl <= 0 or self._size <= 0:
            return
        self._local[key] = (time.monotonic() + self._local_ttl, data)
        self._local.move_to_end(key)
        while len(self._local) > self._size:
            self._local.popitem(last=False)

    async def _redis_get(self, key: str) -> tuple[bytes, T] | None:
        try:
            data = await self.redis.get(self.redis_key(key))
        except REDIS_ERRORS as exc:
            self._redis_failed("read", exc)
            return None
        self._redis_ok()
        if data is None:
            return None
        data = data.encode() if isinstance(data, str) else data  # a decode_responses client
        try:
            return data, self._decode(data)
        except msgspec.DecodeError:  # written by a version with another shape: a miss
            log.warning("cache %s: ignoring an entry that no longer decodes", self.name)
            return None

    async def _redis_set(self, key: str, data: bytes) -> None:
        try:
            await self.redis.set(self.redis_key(key), data, px=self._ttl_ms)
        except REDIS_ERRORS as exc:
            self._redis_failed("write", exc)
        else:
            self._redis_ok()

    def _count(self, tier: str | None) -> None:
        if tier is None:
            self.misses += 1
            self._miss.inc()
            return
        self.hits += 1
        (self._local_hit if tier == "local" else self._redis_hit).inc()

    def _redis_failed(self, what: str, exc: BaseException) -> None:
        # Once per outage: at a thousand turns a second a warning per call is noise.
        if not self._redis_down:
            self._redis_down = True
            log.warning(
                "cache %s: Redis %s failed (%s: %s); serving from the loader until it is back",
                self.name,
                what,
                exc.__class__.__name__,
                exc,
            )

    def _redis_ok(self) -> None:
        if self._redis_down:
            self._redis_down = False
            log.info("cache %s: Redis is back", self.name)


def redis_key(cache: str, key: str) -> str:
    """A cache entry's Redis key. The key is a hash tag: a lead's entries share its slot
    with its lock in Redis Cluster."""
    return f"sdr:cache:{cache}:{{{key}}}"


async def drop_everywhere(redis: Redis, cache: str) -> None:
    """Deletes a cache's Redis tier and tells every daemon to forget its local tier (what
    `invalidate_all` does besides clearing its own; `sdrctl kb import` calls it with no
    cache of its own). Redis errors are the caller's to handle."""
    async for keys in _batches(redis.scan_iter(match=redis_key(cache, "*"), count=500), 500):
        await redis.unlink(*keys)
    await redis.publish(CHANNEL, f"{cache}{SEP}{ALL}")


async def _batches(items: Any, size: int) -> Any:
    batch: list[Any] = []
    async for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class CacheInvalidations:
    """Listens on a Redis pub/sub channel and drops invalidated keys from the local tiers
    of the caches registered with it, so several daemons sharing Redis never serve a lead
    another daemon changed."""

    def __init__(
        self, redis: Redis, caches: Iterable[TwoTierCache[Any]], *, retry_delay: float = RECONNECT_DELAY
    ) -> None:
        self.redis = redis
        self.caches = {c.name: c for c in caches}
        self.retry_delay = retry_delay

    async def run(self) -> None:
        """Runs until cancelled; reconnects after Redis errors."""
        down = False
        while True:
            pubsub: PubSub | None = None
            try:
                pubsub = await subscriber(self.redis)
                await pubsub.subscribe(CHANNEL)
                if down:
                    # What was published while we were away is lost: forget every local entry.
                    self._clear()
                    log.info("cache invalidations: listening again")
                    down = False
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self._apply(message["data"])
            except REDIS_ERRORS as exc:
                if not down:
                    down = True
                    self._clear()  # from now on we cannot hear other daemons' changes
                    log.warning(
                        "cache invalidations: lost Redis (%s: %s); retrying every %.1fs",
                        exc.__class__.__name__,
                        exc,
                        self.retry_delay,
                    )
            finally:
                if pubsub is not None:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            await asyncio.sleep(self.retry_delay)

    def _apply(self, data: bytes | str) -> None:
        text = data.decode(errors="replace") if isinstance(data, bytes) else data
        name, sep, key = text.partition(SEP)
        cache = self.caches.get(name)
        if sep and cache is not None:
            if key == ALL:
                cache.clear_local()
            else:
                cache.drop_local(key)

    def _clear(self) -> None:
        for cache in self.caches.values():
            cache.clear_local()
