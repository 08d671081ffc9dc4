"""sdr.toml + profile + SDR_ environment: what loads, and how bad input is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_config, load_profile
from daemon.errors import ConfigError
from tests.helpers import child_env

REPO = Path(__file__).resolve().parent.parent


def test_defaults_and_the_shipped_profiles_load() -> None:
    cfg = load_config(REPO / "sdr.toml", env={})
    assert cfg.daemon.port == 8080 and cfg.daemon.profile == "recommended"
    assert cfg.profile.name == "recommended"
    assert cfg.profile.timeouts.agent == 30 and cfg.profile.timeouts.redis_lock_ttl == 10
    legacy = load_profile("legacy", env={})
    assert (legacy.timeouts.webhook, legacy.timeouts.agent, legacy.timeouts.knowledge_base) == (30, 45, 5)
    assert legacy.timeouts.image_processing == 0  # the old system had none


def test_built_in_defaults_match_the_shipped_sdr_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no sdr.toml here: built-in defaults
    built_in = load_config(env={})
    shipped = load_config(REPO / "sdr.toml", env={})
    assert built_in.source == "built-in defaults"
    for section in ("daemon", "database", "redis", "evolution", "webhook", "agent", "slo"):
        assert getattr(built_in, section) == getattr(shipped, section)


def test_environment_overrides_every_key() -> None:
    cfg = load_config(
        REPO / "sdr.toml",
        env={
            "SDR_DAEMON_PORT": "8099",
            "SDR_DAEMON_DATA_DIR": "/tmp/x",
            "SDR_DATABASE_URL": "postgresql://db/x",
            "SDR_EVOLUTION_BASE_URL": "http://evo:8080",
            "SDR_EVOLUTION_INSTANCE": "vendas",
            "SDR_TIMEOUTS_AGENT": "12.5",
            "SDR_BUFFER_QUIET_WINDOW": "2",
            "EVOLUTION_API_KEY": "k",
            "SDRCTL_WEBHOOK_TOKEN": "t",
        },
    )
    assert cfg.daemon.port == 8099 and cfg.daemon.data_dir == "/tmp/x"
    assert cfg.database.url == "postgresql://db/x"
    assert (cfg.evolution.base_url, cfg.evolution.instance) == ("http://evo:8080", "vendas")
    assert cfg.profile.timeouts.agent == 12.5 and cfg.profile.buffer.quiet_window == 2.0
    assert (cfg.evolution_api_key, cfg.webhook_token) == ("k", "t")
    assert "'k'" not in repr(cfg) and "'t'" not in repr(cfg)  # secrets are never printed


def write(tmp_path: Path, text: str, name: str = "sdr.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[daemon]\nprot = 80\n", "unknown key [daemon] prot; allowed: host, port"),
        ("[deamon]\nport = 80\n", "unknown section [deamon]"),
        ('[daemon]\nport = "eighty"\n', "[daemon] port = 'eighty': must be an integer from 1 to 65535"),
        ("[daemon]\nport = 70000\n", "must be an integer from 1 to 65535"),
        ('[agent]\nbackend = "gpt"\n', "[agent] backend = 'gpt': must be one of playbook"),
        ('[daemon]\nprofile = "turbo"\n', "profile 'turbo' not found; available: legacy, recommended"),
        ("[daemon\nport = 1\n", "invalid TOML"),
    ],
)
def test_invalid_config_names_the_file_the_key_and_what_is_allowed(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert expected in str(err.value)
    if "profile" not in expected:
        assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[timeouts]\nagent = -1\n", "[timeouts] agent = -1: must be a number from 0.05 to 300 (s)"),
        ("[timeouts]\nagnet = 3\n", "unknown key [timeouts] agnet"),
        ("[buffer]\nquiet_window = 25.0\n", "quiet_window = 25 must not exceed [timeouts] message_buffer = 20"),
        ("[pools]\ndb_min_size = 20\ndb_max_size = 5\n", "db_min_size = 20 must not exceed db_max_size = 5"),
    ],
)
def test_invalid_profile_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text, "mine.toml")
    with pytest.raises(ConfigError) as err:
        load_profile(str(path), env={})
    assert expected in str(err.value) and str(path) in str(err.value)


def test_bad_environment_values_and_unknown_variables_are_refused() -> None:
    with pytest.raises(ConfigError, match="environment SDR_DAEMON_PORT = 'abc': must be an integer"):
        load_config(REPO / "sdr.toml", env={"SDR_DAEMON_PROT": "1", "SDR_DAEMON_PORT": "abc"})
    with pytest.raises(ConfigError, match="environment SDR_DAEMON_PROT: unknown setting"):
        load_config(REPO / "sdr.toml", env={"SDR_DAEMON_PROT": "1"})


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdrctl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )


@pytest.mark.parametrize(
    "command", [["serve"], ["migrate"], ["migrate", "status"], ["chat", "--phone", "5511999990000"]]
)
def test_cli_config_errors_are_one_line_with_exit_code_2(tmp_path: Path, command: list[str]) -> None:
    bad = write(tmp_path, "[daemon]\nport = 0\n")
    result = run_cli("--config", str(bad), *command)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")
    assert "[daemon] port = 0: must be an integer from 1 to 65535" in " ".join(result.stderr.split())


def test_cli_profile_option_after_the_command_and_missing_profile(tmp_path: Path) -> None:
    result = run_cli("serve", "--profile", "nope")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "profile 'nope' not found" in result.stderr
