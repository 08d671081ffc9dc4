"""People beside the bot: whole-message intents (opt-out, opt-in, asking for a person) and
the notice that tells the team a lead wants one.

An intent is the lead's whole message, not a word inside it: "PARAR!!!" and "parar, por
favor" are opt-outs, "não pare de me mandar ofertas" and "quero parar de pagar caro na
luz" are not. Messages and phrases are compared after the same normalisation: lower case,
no accents, no punctuation or emoji, polite fillers dropped, a final plural 's' dropped."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from daemon.config import HandoverKnobs
from daemon.metrics import Metrics
from daemon.text import phrase

log = logging.getLogger("sdr.handover")

Intent = Literal["opt_out", "opt_in", "handoff"]


@dataclass(frozen=True)
class Intents:
    opt_out: frozenset[str]
    opt_in: frozenset[str]
    handoff: frozenset[str]

    @classmethod
    def from_knobs(cls, k: HandoverKnobs) -> Intents:
        def phrases(text: str) -> frozenset[str]:
            return frozenset(n for p in text.split(",") if (n := phrase(p)))

        return cls(phrases(k.opt_out_phrases), phrases(k.opt_in_phrases), phrases(k.handoff_phrases))

    def of(self, texts: list[str]) -> Intent | None:
        """The burst's intent: one of its messages is, as a whole, one of the phrases (an
        opt-out wins over the rest: it is the lead's right)."""
        said = {phrase(t) for t in texts}
        for intent, phrases in (("opt_out", self.opt_out), ("opt_in", self.opt_in), ("handoff", self.handoff)):
            if said & phrases:
                return intent  # type: ignore[return-value]
        return None


class Notifier:
    """Hand-off notices to `[handover] notify_url`: JSON, sent in the background (a turn
    never waits on a team's webhook), retried with backoff, the queue bounded (a notice
    over the bound is dropped and counted, never blocking intake)."""

    def __init__(self, url: str, knobs: HandoverKnobs, metrics: Metrics) -> None:
        self.url = url
        self.knobs = knobs
        self.metrics = metrics
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=knobs.notify_queue)
        self._http = httpx.AsyncClient(timeout=knobs.notify_timeout)

    def notify(self, notice: dict[str, Any]) -> None:
        if not self.url:
            return
        try:
            self.queue.put_nowait(notice)
        except asyncio.QueueFull:
            self.metrics.handover_notices.labels("dropped").inc()
            log.warning("hand-off notice dropped: %d waiting already", self.queue.qsize())

    async def run(self) -> None:
        """The sender: one notice at a time, in order; owned and cancelled by the runtime."""
        while True:
            notice = await self.queue.get()
            outcome = await self._send(notice)
            self.metrics.handover_notices.labels(outcome).inc()

    async def _send(self, notice: dict[str, Any]) -> str:
        delay = self.knobs.notify_backoff
        for attempt in range(1, self.knobs.notify_attempts + 1):
            try:
                resp = await self._http.post(self.url, json=notice)
                if resp.status_code < 300:
                    return "sent"
                if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
                    log.warning("hand-off notice refused: HTTP %d", resp.status_code)
                    return "refused"
                error = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                error = exc.__class__.__name__
            if attempt < self.knobs.notify_attempts:
                log.info("hand-off notice failed (%s), try %d; retrying in %.1fs", error, attempt, delay)
                await asyncio.sleep(delay)
                delay *= 2
        log.warning("hand-off notice not delivered after %d tries", self.knobs.notify_attempts)
        return "failed"

    async def close(self) -> None:
        await self._http.aclose()
