"""How the daemon reaches PostgreSQL and Redis in each production shape: PostgreSQL direct
or through a transaction pooler (PgBouncer in pool_mode=transaction, Supabase's pooler on
port 6543), Redis as one server or as a Redis Cluster."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from daemon.config import Config
from daemon.errors import DatabaseError, DatabaseTimeout, UnavailableError

SUPABASE_POOLER_PORT = 6543  # Supabase's transaction pooler (Supavisor); 5432 is session mode
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# What an outage of PostgreSQL or Redis looks like above the stores: the intake answers
# 503, a turn is re-queued, a job tries again on its next run.
OUTAGE = (UnavailableError, RedisError, OSError, TimeoutError)

# --- PostgreSQL ---------------------------------------------------------------------------

P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C", bound=type)
# What asyncpg raises for a server that failed, went away or answered too late
# (InternalClientError: a connection the server dropped mid-query).
DRIVER_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def pg_boundary(cls: C) -> C:
    """A class decorator for the classes that run SQL: each public coroutine method turns
    the driver's errors into ours (`DatabaseTimeout`, `DatabaseError`), so nothing above
    the stores knows asyncpg."""
    for name, method in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(method):
            setattr(cls, name, _converting(method))
    return cls


def _converting(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except TimeoutError as exc:
            raise DatabaseTimeout(f"PostgreSQL did not answer in time ({method.__qualname__})") from exc
        except DRIVER_ERRORS as exc:
            raise DatabaseError(f"PostgreSQL failed ({method.__qualname__}): {exc.__class__.__name__}: {exc}") from exc

    return wrapper


def database_target(url: str, pooler: str) -> tuple[str, bool]:
    """(the URL asyncpg gets, whether it is a transaction pooler). `auto` trusts what a URL
    can say: Supabase's pooler port, or Prisma's `?pgbouncer=true` (removed: asyncpg would
    send it to the server as a setting, and PgBouncer refuses unknown settings)."""
    parts = urlsplit(url)
    pairs = parts.query.split("&") if parts.query else []
    flags = [p.partition("=")[2].lower() for p in pairs if p.partition("=")[0] == "pgbouncer"]
    flagged = any(v in ("1", "true", "yes") for v in flags)
    # The rest of the query is kept as written (asyncpg reads `host=/socket/dir` as is).
    rest = "&".join(p for p in pairs if p.partition("=")[0] != "pgbouncer")
    clean = urlunsplit(parts._replace(query=rest)) if flags else url
    if pooler == "auto":
        try:
            port = parts.port
        except ValueError:
            port = None
        return clean, flagged or port == SUPABASE_POOLER_PORT
    return clean, pooler == "transaction"


def pg_options(pooled: bool) -> dict[str, Any]:
    """asyncpg connect options. Through a transaction pooler no prepared statement outlives
    its transaction, so no statement cache (asyncpg then uses unnamed statements: checked
    against PgBouncer 1.18 with 20 clients on 2 server connections, no error)."""
    return {"statement_cache_size": 0} if pooled else {}


# --- Redis --------------------------------------------------------------------------------


def redis_target(url: str, cluster: bool) -> tuple[str, bool]:
    """(the URL redis-py gets, whether it is a Redis Cluster): `redis+cluster://` or
    `[redis] cluster = true`."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in CLUSTER_SCHEMES:
        return f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}", True
    return url, cluster


Redis = aioredis.Redis | RedisCluster


def redis_client(url: str, cluster: bool, config: Config) -> Redis:
    """One client for the whole daemon. Explicit timeouts and no hidden retries: a failed
    connect must fail fast."""
    t, size = config.profile.timeouts, config.profile.pools.redis_max_connections
    if cluster:
        # Follows MOVED/ASK redirections and refreshes its slot map itself, a pool per
        # node; one immediate retry after a node error, once the slot map is re-read.
        return RedisCluster.from_url(
            url,
            max_connections=size,
            socket_timeout=t.redis,
            socket_connect_timeout=t.redis,
            retry=AsyncRetry(NoBackoff(), 1),
        )
    # A blocking pool: at its size, callers wait (up to the Redis timeout) instead of
    # failing at once.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=size,
        timeout=t.redis,
        socket_timeout=t.redis,
        socket_connect_timeout=t.redis,
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it


async def subscriber(client: Redis) -> PubSub:
    """A pub/sub connection. In a Redis Cluster a PUBLISH on any node reaches the
    subscribers of every node; the cluster's pub/sub needs the slot map read first."""
    if isinstance(client, RedisCluster):
        await client.initialize()  # a no-op once the slot map is known
    return client.pubsub()
