"""The pipeline end to end on the production shapes, with Debian's servers: PostgreSQL
behind PgBouncer in pool_mode = transaction (migrations over the direct socket), a
3-master Redis 7 Cluster, and one Redis 7 server over TCP. Each: `sdrctl migrate`, then a
real `sdrctl serve`, a burst from each of 30 leads, exactly one turn (one reply) per lead,
and no error in the daemon's log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from daemon.buffer import DUE
from daemon.cache import CacheInvalidations, TwoTierCache
from daemon.config import load_config
from daemon.connections import database_target, redis_client, redis_target
from daemon.embedded import Endpoints
from daemon.metrics import Metrics
from tests import servers
from tests.helpers import FAST_PROFILE, event, fetch, make_config, run_daemon, sdrctl, start_serve, wait_for

LEADS = 30
BURST = ("Oi, boa tarde", "Queria saber sobre energia solar", "Quanto custa pra instalar?")
# Windows wide enough that a burst posted 30 ms apart is one turn on a loaded 2-core
# machine (the test profile's 0.1-0.25 s windows are for single-lead tests).
WINDOWS = {
    "SDR_BUFFER_MIN_WINDOW": "1.0",
    "SDR_BUFFER_QUIET_WINDOW": "1.0",
    "SDR_BUFFER_EXTENDED_WINDOW": "1.5",
    "SDR_TIMEOUTS_MESSAGE_BUFFER": "3.0",
}


@pytest.fixture(scope="module")
def debian_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Below /tmp, not pytest's folder under /root: PgBouncer runs as the pgserver user.
    root = Path("/tmp") / f"sdrctl-prod-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o755)
    return root


@pytest.fixture(scope="module")
def cluster(debian_root: Path) -> Iterator[list[int]]:
    with servers.redis_cluster(debian_root / "cluster") as ports:
        yield ports


@contextlib.asynccontextmanager
async def fresh_database(endpoints: Endpoints) -> AsyncIterator[str]:
    """A new empty database on the embedded server; yields its direct URL."""
    name = f"prod_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(endpoints.database_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield endpoints.database_url.replace("/sdr?", f"/{name}?")
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def run_bursts(env: dict[str, str], log: Path, direct_url: str) -> None:
    """`sdrctl migrate` and `sdrctl serve` as a user runs them, then 30 leads' bursts."""
    code, out, err = await sdrctl("migrate", env=env)
    assert code == 0, out + err
    daemon = await start_serve({**env, **WINDOWS}, log)
    try:
        await daemon.wait_ready()
        phones = [f"55119877{i:05d}" for i in range(LEADS)]

        async def lead(http: httpx.AsyncClient, phone: str) -> None:
            for text in BURST:
                resp = await http.post("/webhook/evolution", json=event(phone, text))
                assert resp.status_code == 200, resp.text
                await asyncio.sleep(0.03)

        async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as http:
            await asyncio.gather(*(lead(http, p) for p in phones))

        async def all_answered() -> bool:
            rows = await fetch(
                direct_url, "SELECT count(*) AS n FROM messages WHERE direction = 'in' AND turn_id IS NULL"
            )
            replies = await fetch(direct_url, "SELECT count(DISTINCT phone_number) AS n FROM outbox")
            return rows[0]["n"] == 0 and replies[0]["n"] == LEADS

        await wait_for(all_answered, timeout=60)
        turns = await fetch(
            direct_url,
            """
            SELECT l.phone_number, count(DISTINCT t.id) AS turns, count(DISTINCT o.turn_id) AS replied,
                   max(t.messages_joined) AS joined
              FROM leads l JOIN turns t ON t.lead_id = l.id LEFT JOIN outbox o ON o.turn_id = t.id
             GROUP BY l.phone_number""",
        )
        assert sorted(r["phone_number"] for r in turns) == sorted(phones)
        assert {(r["turns"], r["replied"], r["joined"]) for r in turns} == {(1, 1, len(BURST))}
        stored = await fetch(direct_url, "SELECT count(*) AS n FROM messages WHERE direction = 'in'")
        assert stored[0]["n"] == LEADS * len(BURST)
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.log
    bad = [line for line in daemon.log.splitlines() if " ERROR " in line or " WARNING " in line or "Traceback" in line]
    assert not bad, "\n".join(bad)


async def test_behind_pgbouncer_in_transaction_mode(clean: Endpoints, debian_root: Path, tmp_path: Path) -> None:
    endpoints = clean  # the suite's Redis, emptied
    async with fresh_database(endpoints) as direct:
        name = direct.split("?")[0].rsplit("/", 1)[1]
        with servers.pgbouncer(direct, debian_root / f"pgbouncer-{name}") as port:
            # ?pgbouncer=true: the pooler is detected from the URL (and the flag removed).
            pooled = f"postgresql://postgres@127.0.0.1:{port}/{name}?pgbouncer=true"
            env = {"SDR_DATABASE_URL": pooled, "SDR_REDIS_URL": endpoints.redis_url}
            code, _, err = await sdrctl("migrate", env=env)
            assert code == 2 and "migrate_url" in err and "Traceback" not in err, err
            env["SDR_DATABASE_MIGRATE_URL"] = direct
            await run_bursts(env, tmp_path / "serve.log", direct)
            # The daemon (stopped now, its pools of 10 + 2 closed) went through the pooler:
            # what stays open are PgBouncer's server connections, at most its pool of 4.
            admin = await asyncpg.connect(direct)
            try:
                servers_open = await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name
                )
            finally:
                await admin.close()
            assert 1 <= servers_open <= 4


async def test_on_a_redis_cluster(endpoints: Endpoints, cluster: list[int], tmp_path: Path) -> None:
    async with fresh_database(endpoints) as direct:
        env = {"SDR_DATABASE_URL": direct, "SDR_REDIS_URL": f"redis+cluster://127.0.0.1:{cluster[0]}"}
        await run_bursts(env, tmp_path / "serve.log", direct)
    # The keys really were spread over the masters (the test means nothing otherwise).
    counts = []
    for port in cluster:
        r = aioredis.Redis(port=port)
        counts.append(await r.dbsize())
        await r.flushall()
        await r.aclose()
    assert sum(1 for n in counts if n) >= 2, counts


async def test_on_one_redis_server_over_tcp(endpoints: Endpoints, debian_root: Path, tmp_path: Path) -> None:
    with servers.redis_server(debian_root / "redis-tcp") as port:
        async with fresh_database(endpoints) as direct:
            env = {"SDR_DATABASE_URL": direct, "SDR_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
            await run_bursts(env, tmp_path / "serve.log", direct)


async def test_cache_invalidations_reach_daemons_on_other_cluster_nodes(cluster: list[int]) -> None:
    """Daemon B subscribes through one node, daemon A publishes through whichever node
    its client picks: B still drops its local copy."""
    cfg = load_config(None, FAST_PROFILE, {})
    a = redis_client(f"redis://127.0.0.1:{cluster[0]}", True, cfg)
    b = redis_client(f"redis://127.0.0.1:{cluster[2]}", True, cfg)
    kw: dict[str, Any] = {"ttl": 60, "local_ttl": 60, "size": 10, "enabled": True, "metrics": Metrics()}
    cache_a = TwoTierCache("lead", a, dict[str, Any], **kw)
    cache_b = TwoTierCache("lead", b, dict[str, Any], **kw)
    listener = asyncio.create_task(CacheInvalidations(b, [cache_b], retry_delay=0.1).run())
    try:
        keys = [f"55119{i:08d}" for i in range(20)]  # spread over the slots
        for key in keys:
            await cache_b.set(key, {"v": 1})
        await asyncio.sleep(0.2)  # the listener is subscribed
        for key in keys:
            await cache_a.invalidate(key)

        async def dropped() -> bool:
            return all(cache_b._local.get(k) is None for k in keys)

        await wait_for(dropped, timeout=10)
        assert [await cache_b.get(k) for k in keys] == [None] * len(keys)  # gone from Redis too
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await a.aclose()
        await b.aclose()


@pytest.mark.parametrize(
    ("url", "setting", "expected"),
    [
        ("postgresql://u:p@db.example.supabase.co:5432/postgres", "auto", False),
        ("postgresql://u:p@aws-0-sa-east-1.pooler.supabase.com:6543/postgres", "auto", True),
        ("postgresql://u@host:6432/db?pgbouncer=true&sslmode=require", "auto", True),
        ("postgresql://u@host:6432/db", "auto", False),
        ("postgresql://u@host:6432/db", "transaction", True),
        ("postgresql://u@host:6543/db", "none", False),
    ],
)
def test_transaction_pooler_detection(url: str, setting: str, expected: bool) -> None:
    clean, pooled = database_target(url, setting)
    assert pooled is expected
    assert "pgbouncer" not in clean and clean.startswith(url.split("?")[0])
    assert ("sslmode=require" in clean) == ("sslmode=require" in url)


def test_redis_cluster_urls() -> None:
    assert redis_target("redis+cluster://h:7000/0", False) == ("redis://h:7000/0", True)
    assert redis_target("rediss+cluster://h:7000", False) == ("rediss://h:7000", True)
    assert redis_target("redis://h:6379/0", True) == ("redis://h:6379/0", True)
    assert redis_target("unix:///tmp/r.sock", False) == ("unix:///tmp/r.sock", False)


async def test_not_ready_while_redis_refuses_the_buffer_and_one_log_line(
    clean: Endpoints, cluster: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    """A plain client pointed at a cluster node that does not own the buffer's slot: PING
    answers, every claim gets MOVED (what the daemon did before it spoke Cluster)."""
    slot = int(
        subprocess.run(
            [servers.REDIS_CLI, "-p", str(cluster[0]), "cluster", "keyslot", DUE],
            capture_output=True,
            text=True,
            check=True,
            env=servers._server_env(),
        ).stdout
    )
    r = aioredis.Redis(port=cluster[0])
    owners = {int(p) for lo, hi, (_, p, *_), *_ in await r.cluster("SLOTS") if lo <= slot <= hi}  # type: ignore[misc]
    await r.aclose()
    wrong = next(p for p in cluster if p not in owners)
    config = make_config(clean, SDR_REDIS_URL=f"redis://127.0.0.1:{wrong}/0")
    with caplog.at_level(logging.WARNING, logger="sdr.runtime"):
        async with run_daemon(config, Endpoints(clean.database_url, f"redis://127.0.0.1:{wrong}/0")) as d:
            async with httpx.AsyncClient(base_url=d.url) as http:

                async def refused() -> dict[str, Any] | None:
                    resp = await http.get("/readyz")
                    return resp.json() if resp.status_code == 503 else None

                body = await wait_for(refused)
                assert body["redis"] == "ok" and "MovedError" in body["buffer"], body
                polls = d.runtime.config.profile.buffer.poll_interval
                await asyncio.sleep(polls * 50)  # dozens of failed polls
    lines = [r for r in caplog.records if "cannot claim due bursts" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
