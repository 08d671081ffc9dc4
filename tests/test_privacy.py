"""Privacy: phone numbers masked in logs; secrets never printed."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from daemon.embedded import Endpoints
from daemon.logs import MaskPhones, mask
from tests.helpers import REPO, child_env, event, fetch, start_serve, wait_for

PHONE = "5511922221111"


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdrctl", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(**env),
    )


def test_phone_numbers_are_masked_in_text() -> None:
    assert mask("turn for 5511999990000 done") == "turn for 5511*****0000 done"
    assert mask("jid 5511987654321@s.whatsapp.net") == "jid 5511*****4321@s.whatsapp.net"
    assert mask("5521912345678, 551133334444") == "5521*****5678, 5511****4444"
    assert mask("took 1234 ms, id 42, year 2026") == "took 1234 ms, id 42, year 2026"  # short numbers stay


def test_log_records_are_masked_args_and_tracebacks_included(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("sdr.test-privacy")
    log.addFilter(MaskPhones())
    with caplog.at_level(logging.INFO, logger="sdr.test-privacy"):
        log.info("lead %s wrote", "5511999990000")
        try:
            raise ValueError("bad lead 5511888887777")
        except ValueError:
            log.exception("failed")
    text = caplog.text
    assert "5511*****0000 wrote" in text and "5511999990000" not in text
    assert "5511*****7777" in text and "5511888887777" not in text


async def test_serve_masks_phones_in_its_logs_and_never_prints_the_token(clean: Endpoints, tmp_path: Path) -> None:
    secret = "s3cr3t-token-value"
    env = {
        "SDR_DATABASE_URL": clean.database_url,
        "SDR_REDIS_URL": clean.redis_url,
        "SDRCTL_WEBHOOK_TOKEN": secret,
        "SDR_DAEMON_LOG_LEVEL": "debug",
    }
    serve = await start_serve(env, tmp_path / "serve.log")
    try:
        await serve.wait_ready()
        async with httpx.AsyncClient(base_url=serve.url) as http:
            auth = {"authorization": f"Bearer {secret}"}
            assert (await http.post("/webhook/evolution", json=event(PHONE, "Oi"), headers=auth)).status_code == 200
            bad = {"authorization": "Bearer wrong-token-value"}
            assert (await http.post("/webhook/evolution", json=event(PHONE, "Oi"), headers=bad)).status_code == 401
        await wait_for(lambda: fetch(clean.database_url, "SELECT 1 FROM outbox"))
    finally:
        assert await serve.stop() == 0
    log = serve.log
    assert PHONE not in log and PHONE[-4:] in log  # e.g. "turn done for ...2222", masked ids
    assert secret not in log and "wrong-token-value" not in log
    assert "webhook refused" in log  # the auth failure is logged, without the token


def test_tune_show_and_errors_never_print_secrets() -> None:
    secrets = {"OPENAI_API_KEY": "sk-live-abcdef", "SDRCTL_WEBHOOK_TOKEN": "tok-abcdef"}
    shown = run(["tune", "show", "--json"], **secrets)
    broken = run(["tune", "show", "nope"], **secrets)
    for result in (shown, broken):
        assert "sk-live-abcdef" not in result.stdout + result.stderr
        assert "tok-abcdef" not in result.stdout + result.stderr
    assert shown.returncode == 0 and broken.returncode == 2
