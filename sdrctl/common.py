"""What every command shares: --config/--profile, logging, and errors as one line."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from daemon.config import Config, load_config
from daemon.errors import ConfigError, SdrError

F = TypeVar("F", bound=Callable[..., Any])
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="sdr.toml to read (default: ./sdr.toml if present)"),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="profile name in profiles/ or a .toml path"),
]


def load(ctx: typer.Context, config: Path | None, profile: str | None) -> Config:
    """The command's own --config/--profile win over those given before the command."""
    top = ctx.find_root().params
    return load_config(config or top.get("config"), profile or top.get("profile"))


def setup_logging(level: str, *, log_phones: bool = False, log_format: str = "text") -> None:
    """Logs to stderr (text or json lines); leads' phone numbers masked unless `log_phones`."""
    from daemon.logs import setup_logging as setup

    setup(level, log_phones=log_phones, log_format=log_format)


def fail(message: str) -> None:
    """One line on stderr, never wrapped, our text never read as rich markup."""
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


def friendly_errors(fn: F) -> F:
    """Our errors become one line and an exit code: 2 for bad input, 1 for the rest."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc))
            raise typer.Exit(2) from None
        except SdrError as exc:
            fail(str(exc))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
