"""The commands a user types: `sdrctl serve` on the embedded default, and `sdrctl chat`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx

from daemon.embedded import Endpoints
from daemon.server import bind_host
from tests.helpers import REPO, child_env, event, fetch, make_config, run_daemon, start_serve, wait_for


async def test_serve_on_the_embedded_default_answers_a_lead_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    env = {"SDR_DAEMON_DATA_DIR": str(data_dir)}
    serve = await start_serve(env, tmp_path / "serve.log")
    try:
        await serve.wait_ready()
        async with httpx.AsyncClient(base_url=serve.url) as http:
            resp = await http.post("/webhook/evolution", json=event("5511955554444", "Olá, boa tarde!"))
            assert resp.json() == {"status": "stored"}
            db = f"postgresql://postgres@/sdr?host={data_dir / 'pg'}"
            [row] = await wait_for(lambda: fetch(db, "SELECT body FROM outbox"))
            assert "Sol Nascente" in row["body"]
            # Other commands use the same embedded PostgreSQL, and leave it running.
            status = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sdrctl",
                "migrate",
                "status",
                "--json",
                cwd=REPO,
                env=child_env(**env),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(status.communicate(), timeout=60)
            assert status.returncode == 0, err.decode()
            assert all(m["state"] == "applied" for m in json.loads(out)["migrations"])
            assert (await http.get("/readyz")).status_code == 200
    finally:
        code = await serve.stop()
    log = serve.log
    assert code == 0, log
    assert "serving on http://127.0.0.1" in log and "stopped" in log
    assert "Traceback" not in log
    # The embedded servers this serve started are stopped with it.
    assert not (data_dir / "pg" / "postmaster.pid").exists()
    assert not (data_dir / "redis" / "redis.sock").exists()


async def test_chat_posts_lines_as_a_lead_and_prints_the_replies(clean: Endpoints) -> None:
    cfg = make_config(clean)
    async with run_daemon(cfg) as d:
        env = child_env(SDR_DATABASE_URL=clean.database_url, SDR_REDIS_URL=clean.redis_url)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdrctl",
            "chat",
            "--phone",
            "5511933332222",
            "--url",
            d.url,
            "--profile",
            str(REPO / "tests" / "fast.toml"),
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate("Oi\nmeu nome é Bia\n".encode()), timeout=60)
    text = " ".join(out.decode().split())
    assert proc.returncode == 0, err.decode()
    assert text.count("bot>") == 1  # two lines, one burst, one reply
    assert "Olá, Bia!" in text and "conta de luz" in text
    rows = await fetch(clean.database_url, "SELECT body FROM messages WHERE direction = 'in' ORDER BY id")
    assert [r["body"] for r in rows] == ["Oi", "meu nome é Bia"]


async def test_chat_without_a_daemon_says_how_to_start_one(clean: Endpoints) -> None:
    env = child_env(SDR_DATABASE_URL=clean.database_url, SDR_REDIS_URL=clean.redis_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sdrctl",
        "chat",
        "--phone",
        "5511933332222",
        "--url",
        "http://127.0.0.1:9",
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(b""), timeout=60)
    assert proc.returncode == 1
    assert "no daemon answers at http://127.0.0.1:9" in err.decode() and "make serve" in err.decode()
    assert "Traceback" not in err.decode()


async def test_chat_refuses_a_bad_phone_with_exit_code_2() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sdrctl",
        "chat",
        "--phone",
        "+55 11 9999",
        cwd=REPO,
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "--phone '+55 11 9999': must be a phone number of 8 to 15 digits" in err.decode()


def test_without_a_webhook_token_serve_binds_loopback_only(clean: Endpoints) -> None:
    open_to_all = make_config(clean, SDR_DAEMON_HOST="0.0.0.0")
    assert bind_host(open_to_all) == "127.0.0.1"
    with_token = make_config(clean, SDR_DAEMON_HOST="0.0.0.0", SDRCTL_WEBHOOK_TOKEN="t")
    assert bind_host(with_token) == "0.0.0.0"


def test_the_wheel_ships_profiles_and_migrations(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        env=child_env(),
    )
    [wheel] = tmp_path.glob("sdrctl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "daemon/_data/profiles/recommended.toml",
        "daemon/_data/profiles/legacy.toml",
        "daemon/_data/sql/0001_schema.sql",
        "sdrctl/main.py",
    } <= names
    shipped = {
        f"daemon/_data/knowledge/{p.relative_to(REPO / 'knowledge').as_posix()}"
        for p in (REPO / "knowledge").rglob("*.md")
    }
    assert len(shipped) == 61 and shipped <= names  # the knowledge base a new database imports
