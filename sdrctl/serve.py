"""`sdrctl serve`: run the daemon."""

from __future__ import annotations

import typer

from daemon.server import serve as run_server
from sdrctl.common import ConfigOpt, ProfileOpt, friendly_errors, load, setup_logging


@friendly_errors
def serve(ctx: typer.Context, config: ConfigOpt = None, profile: ProfileOpt = None) -> None:
    """Run the daemon: webhook intake, buffer, turns, replies, metrics.

    With no database/redis URL configured, starts the embedded PostgreSQL and Redis under
    [daemon] data_dir, migrates and seeds them."""
    cfg = load(ctx, config, profile)
    setup_logging(cfg.daemon.log_level, log_phones=cfg.daemon.log_phones)
    run_server(cfg)
