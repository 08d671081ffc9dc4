"""`sdrctl serve`: run the daemon."""

from __future__ import annotations

import logging

import typer

from daemon import unguarded
from daemon.errors import ConfigError
from daemon.server import serve as run_server
from sdrctl.common import ConfigOpt, ProfileOpt, friendly_errors, load, setup_logging


@friendly_errors
def serve(ctx: typer.Context, config: ConfigOpt = None, profile: ProfileOpt = None) -> None:
    """Run the daemon: webhook intake, buffer, turns, replies, metrics.

    With no database/redis URL configured, starts the embedded PostgreSQL and Redis under
    [daemon] data_dir, migrates and seeds them."""
    cfg = load(ctx, config, profile)
    setup_logging(cfg.daemon.log_level, log_phones=cfg.daemon.log_phones, log_format=cfg.daemon.log_format)
    if off := unguarded.switched_off():
        if unknown := off - set(unguarded.GUARDS):
            allowed = ", ".join(unguarded.GUARDS)
            raise ConfigError(
                f"{unguarded.VARIABLE}: unknown guard(s) {', '.join(sorted(unknown))} (allowed: {allowed})"
            )
        logging.getLogger("sdr").warning(
            "%s=%s: guards switched off, for tests only", unguarded.VARIABLE, ",".join(sorted(off))
        )
    run_server(cfg)
