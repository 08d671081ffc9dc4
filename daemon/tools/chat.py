"""`sdrctl chat`: talk to a running daemon as a lead would. Each line becomes a real-shaped
webhook event; replies are read from the outbox table as the daemon writes them."""

from __future__ import annotations

import secrets
from types import TracebackType

import asyncpg
import httpx

from daemon.config import Config
from daemon.errors import UnavailableError
from daemon.evolution import text_event
from daemon.store import Store, connect


class ChatSession:
    def __init__(
        self, config: Config, database_url: str, phone: str, name: str | None, url: str, *, pooled: bool = False
    ) -> None:
        self.config = config
        self.database_url = database_url
        self.pooled = pooled
        self.phone = phone
        self.name = name
        self.url = url.rstrip("/")
        self.last_seen = 0
        headers = {"authorization": f"Bearer {config.webhook_token}"} if config.webhook_token else {}
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=config.profile.timeouts.webhook)

    async def __aenter__(self) -> ChatSession:
        try:
            resp = await self.http.get("/healthz")
            resp.raise_for_status()
        except httpx.HTTPError:
            await self.http.aclose()
            raise UnavailableError(
                f"no daemon answers at {self.url}; start one with `make serve` (or `sdrctl serve`)"
            ) from None
        try:
            self.pool = await connect(self.database_url, self.config.profile, pooled=self.pooled)
        except (OSError, asyncpg.PostgresError) as exc:
            await self.http.aclose()
            raise UnavailableError(f"PostgreSQL is unreachable: {exc}") from None
        self.store = Store(self.pool, self.config.profile)
        self.last_seen = await self.store.last_outbox_id(self.phone)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.http.aclose()
        await self.pool.close()

    async def send(self, text: str) -> None:
        event = text_event(
            self.phone,
            text,
            message_id="CHAT" + secrets.token_hex(8).upper(),
            instance=self.config.evolution.instance,
            push_name=self.name,
        )
        resp = await self.http.post("/webhook/evolution", json=event)
        if resp.status_code != 200:
            raise UnavailableError(f"the daemon refused the message: HTTP {resp.status_code} {resp.text}")

    async def replies(self) -> list[str]:
        """Replies written since the last call."""
        rows = await self.store.outbox_after(self.phone, self.last_seen)
        if rows:
            self.last_seen = rows[-1][0]
        return [body for _, body in rows]
