"""`sdrctl chat`: talk to the running bot from a terminal, as a lead would."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer
from rich.markup import escape

from daemon.config import Config
from daemon.embedded import Endpoints, services
from daemon.identity import IDENTITY_HELP, parse_identity
from daemon.tools.chat import ChatSession
from sdrctl.common import ConfigOpt, ProfileOpt, err, fail, friendly_errors, load, out


async def _chat(cfg: Config, endpoints: Endpoints, phone: str, name: str | None, url: str) -> None:
    p = cfg.profile
    # After the last line, wait for its reply at most one buffer window plus one agent call.
    patience = p.timeouts.message_buffer + p.timeouts.agent
    session = ChatSession(cfg, endpoints.direct_url, phone, name, url, pooled=endpoints.direct_pooled)
    async with session as chat:
        err.print(f"chatting with {url} as {phone}; type a message, Ctrl-D to quit")
        awaiting = False

        async def show_replies() -> None:
            nonlocal awaiting
            while True:
                for body in await chat.replies():
                    awaiting = False
                    out.print(f"[bold green]bot>[/] {escape(body)}\n")
                await asyncio.sleep(p.buffer.poll_interval * 4)

        poller = asyncio.create_task(show_replies())
        try:
            while True:
                line = await asyncio.to_thread(sys.stdin.readline)
                if not line:  # Ctrl-D
                    break
                if line.strip():
                    await chat.send(line.rstrip("\n"))
                    awaiting = True
            loop = asyncio.get_running_loop()
            deadline = loop.time() + patience
            while awaiting and loop.time() < deadline:
                await asyncio.sleep(p.buffer.poll_interval)
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        for body in await chat.replies():
            out.print(f"[bold green]bot>[/] {escape(body)}\n")


@friendly_errors
def chat(
    ctx: typer.Context,
    phone: Annotated[str, typer.Option(help="the lead's phone number, digits only (e.g. 5511999990000)")],
    name: Annotated[str | None, typer.Option(help="the lead's WhatsApp profile name")] = None,
    url: Annotated[str | None, typer.Option(help="daemon URL (default: from [daemon] host/port)")] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Talk to the running daemon: each line is posted as a WhatsApp message; replies print
    as they arrive. Ctrl-D quits."""
    if parse_identity(phone) != phone:
        fail(f"--phone {phone!r}: must be {IDENTITY_HELP}")
        raise typer.Exit(2)
    cfg = load(ctx, config, profile)
    base = url or f"http://{cfg.daemon.host}:{cfg.daemon.port}"
    with services(cfg, redis=False) as endpoints:
        asyncio.run(_chat(cfg, endpoints, phone, name, base))
