"""The runtime owns everything it opens: a start that fails part-way closes what it opened
and says why in one line; a turn's children (typing..., the knowledge search) never
outlive their turn, whichever way it ends."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from daemon.agents import AgentReply, TurnInput
from daemon.config import Config
from daemon.embedded import Endpoints
from daemon.errors import DatabaseError, UnavailableError
from daemon.followups.jobs import Jobs
from daemon.metrics import Metrics
from daemon.runtime import Runtime
from daemon.store import Store
from daemon.tasks import cancel_and_wait
from daemon.testing.fake_evolution import run_fake_evolution
from tests.helpers import event, fetch, make_config, metric, run_daemon, sdrctl, wait_for

PHONE = "5511987650101"


async def post_all(url: str, events: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        for body in events:
            (await http.post("/webhook/evolution", json=body)).raise_for_status()


def _children() -> list[str]:
    """The turns' child tasks alive now (named typing:<phone> and kb:<phone>)."""
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(("typing:", "kb:")))


async def _pg_connections(clean: Endpoints, role: str = "postgres") -> int:
    rows = await fetch(
        clean.database_url,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE usename = $1 AND pid <> pg_backend_pid()",
        role,
    )
    return int(rows[0]["n"])


async def _redis_clients(clean: Endpoints) -> int:
    r = aioredis.Redis.from_url(clean.redis_url)
    try:
        return len(await r.client_list()) - 1  # not this one
    finally:
        await r.aclose()


async def test_a_start_that_fails_late_closes_everything_it_opened(
    clean: Endpoints, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last step of start() (re-queueing unanswered messages) fails: one SdrError that
    names the step, and no PostgreSQL or Redis connection, media worker or background task
    is left behind."""

    async def broken(self: Store) -> list[tuple[str, int]]:
        raise DatabaseError("PostgreSQL failed (Store.unanswered): relation is gone")

    monkeypatch.setattr(Store, "unanswered", broken)
    pg_before, redis_before = await _pg_connections(clean), await _redis_clients(clean)
    rt = Runtime(config, clean, auto_migrate=False)
    with pytest.raises(DatabaseError, match="Store.unanswered"):
        await rt.start()
    assert rt.pool.is_closing() and rt.intake_pool.is_closing()
    assert await _pg_connections(clean) == pg_before
    assert await _redis_clients(clean) == redis_before
    assert rt.media.pool._shutdown_thread  # the process pool was shut down
    assert not rt.accepting
    assert [t.get_name() for t in asyncio.all_tasks() if t.get_name() in ("buffer-flush", "cache-invalidations")] == []


async def test_an_outage_during_start_is_one_line_naming_the_step(clean: Endpoints, config: Config) -> None:
    """Redis refuses connections: UnavailableError('Redis is unreachable: ...'), not a
    driver's traceback, and the PostgreSQL pools opened before it are closed."""
    pg_before = await _pg_connections(clean)
    broken = dataclasses.replace(clean, redis_url="redis://127.0.0.1:9/0")
    rt = Runtime(config, broken, auto_migrate=False)
    with pytest.raises(UnavailableError, match=r"^Redis is unreachable: "):
        await rt.start()
    assert rt.pool.is_closing() and rt.intake_pool.is_closing()
    assert await _pg_connections(clean) == pg_before


async def test_serve_that_fails_a_start_step_prints_one_line_and_leaves_nothing(clean: Endpoints) -> None:
    """`sdrctl serve` against a database whose schema check passes but whose tables the
    daemon's role may not read: one line, exit 1, no traceback, and no connection of that
    role left open in PostgreSQL."""
    role = "sdr_no_tables"
    conn = await asyncpg.connect(clean.database_url)
    try:
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.execute(f"CREATE ROLE {role} LOGIN")
        await conn.execute(f"GRANT SELECT ON schema_migrations TO {role}")
        url = clean.database_url.replace("postgres@", f"{role}@")
        code, out, err = await sdrctl(
            "serve",
            "--profile",
            "tests/fast.toml",
            env={"SDR_DATABASE_URL": url, "SDR_REDIS_URL": clean.redis_url},
        )
        left = await _pg_connections(clean, role)
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()
    assert code == 1, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "permission denied" in lines[0], err
    assert left == 0


class FailingAgent:
    """An agent that fails every turn after it started (the turn falls back)."""

    name = "failing"

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def respond(self, turn: TurnInput) -> AgentReply:
        self.entered.set()
        await asyncio.sleep(0.3)  # long enough for "typing..." to be under way
        raise RuntimeError("the model is down")


class HangingAgent(FailingAgent):
    async def respond(self, turn: TurnInput) -> AgentReply:
        self.entered.set()
        await asyncio.Event().wait()  # until the turn is cancelled
        raise AssertionError("unreachable")


def _typing_config(clean: Endpoints, evolution_url: str, **env: str) -> Config:
    """Replies through a fake Evolution API, "typing..." from the turn's first instant."""
    return make_config(
        clean, SDR_EVOLUTION_BASE_URL=evolution_url, SDR_FEATURES_TYPING_AFTER="0", SDR_BUFFER_SPECULATE="false", **env
    )


async def test_a_turn_whose_agent_and_store_fail_leaves_no_task_running(
    clean: Endpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent fails, then writing the turn fails too (the turn ends with an error, not
    with its reply): "typing..." and the knowledge search end with it all the same."""
    writes = 0

    async def failing_write(self: Store, *args: Any, **kwargs: Any) -> None:
        nonlocal writes
        writes += 1
        raise DatabaseError("PostgreSQL failed (Store.finish_turn): the disk is full")

    async with run_fake_evolution() as fake, run_daemon(_typing_config(clean, fake.url)) as d:
        agent = FailingAgent(d.runtime.runner.agent)
        d.runtime.runner.agent = agent  # type: ignore[assignment]
        monkeypatch.setattr(Store, "finish_turn", failing_write)
        await post_all(d.url, [event(PHONE, "quanto custa a instalação?")])
        await asyncio.wait_for(agent.entered.wait(), 10)
        await wait_for(lambda: _true(writes > 0))
        await wait_for(lambda: _true(not d.runtime._tasks), timeout=10)  # the turn ended
        assert fake.presences, "typing... was never shown: the test would prove nothing"
        assert _children() == []
        await wait_for(lambda: _true(fake.presence_open(PHONE) == []))  # the lead sees it stop


async def test_a_cancelled_turn_leaves_no_task_running(clean: Endpoints) -> None:
    """A turn cancelled while the agent still thinks (as shutdown does once its grace
    period is over): its "typing..." and knowledge search end with it, while the daemon
    and its clients still run."""
    async with run_fake_evolution() as fake:
        cfg = _typing_config(clean, fake.url, SDR_TIMEOUTS_AGENT="60")
        async with run_daemon(cfg) as d:
            agent = HangingAgent(d.runtime.runner.agent)
            d.runtime.runner.agent = agent  # type: ignore[assignment]
            await post_all(d.url, [event(PHONE, "qual o preço da instalação?")])
            await asyncio.wait_for(agent.entered.wait(), 10)
            await wait_for(lambda: _true(bool(fake.presences)))
            assert _children() != []  # under way while the turn runs
            [turn] = d.runtime._tasks
            await cancel_and_wait(turn, 5)
            assert turn.cancelled()
            assert _children() == []
            await wait_for(lambda: _true(fake.presence_open(PHONE) == []))


async def _true(value: bool) -> bool:
    return value


async def test_serve_on_a_port_in_use_says_so_in_one_line(clean: Endpoints) -> None:
    """The port is bound before anything starts: one line naming it, exit 1, nothing
    started (not uvicorn's log line after the runtime and the embedded servers started)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, out, err = await sdrctl(
            "serve",
            "--profile",
            "tests/fast.toml",
            env={
                "SDR_DATABASE_URL": clean.database_url,
                "SDR_REDIS_URL": clean.redis_url,
                "SDR_DAEMON_PORT": str(port),
            },
        )
    assert code == 1, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; stop what holds the port, or set [daemon] port"
    ]
    assert "applied migration" not in out + err and "serving on" not in out + err


async def test_stopping_cancels_a_running_job_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A job mid-run at shutdown is cancelled and ends quietly: APScheduler logs any
    exception a job raises, CancelledError included, as "raised an exception" with a
    traceback (the fault suite fails a daemon whose log has one)."""
    started, ran = asyncio.Event(), []

    async def slow() -> None:
        started.set()
        await asyncio.sleep(60)
        ran.append("finished")

    jobs = Jobs(Metrics())
    jobs.every("slow", 0.01, slow)
    jobs.start()
    await asyncio.wait_for(started.wait(), 10)
    assert len(jobs.running) == 1
    await jobs.stop()
    await asyncio.sleep(0.05)  # APScheduler's wrapper sees the job's end on the next pass
    assert not jobs.running and ran == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert metric(jobs.metrics.render().decode(), "sdr_jobs_total", job="slow", outcome="failed") == 0
