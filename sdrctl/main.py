"""Entry point: `sdrctl [--config PATH] [--profile NAME] COMMAND ...`."""

from __future__ import annotations

import typer

from sdrctl import bench, chat, export, followups, kb, leads, migrate, profile, replay, report, serve, tune
from sdrctl.common import ConfigOpt, ProfileOpt

app = typer.Typer(
    name="sdrctl",
    help="The daemon and operations toolkit of the WhatsApp SDR agent.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def main(config: ConfigOpt = None, profile: ProfileOpt = None) -> None:
    """Options given here apply to every command."""


app.command("serve")(serve.serve)
app.add_typer(migrate.app, name="migrate")
app.command("chat")(chat.chat)
app.command("bench")(bench.bench)
app.command("replay")(replay.replay)
app.command("export")(export.export)
app.command("profile")(profile.profile)
app.command("report")(report.report)
app.add_typer(tune.app, name="tune")
app.add_typer(followups.app, name="followups")
app.add_typer(leads.app, name="leads")
app.add_typer(kb.app, name="kb")
