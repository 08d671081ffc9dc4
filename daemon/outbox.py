"""Replies whose send may or may not have arrived: settled before anything is sent again.

A send that timed out after its request was written, lost its connection or got a 5xx
may have been delivered (Evolution holds sendText until WhatsApp took the message). Such a
reply is 'uncertain', not failed: before a re-send, Evolution's history is searched
(findMessages, a bounded look-back) when the instance keeps one; when it keeps none, or
cannot be asked, `[evolution] on_uncertain_send` decides (README: Uncertain sends)."""

from __future__ import annotations

import logging
from datetime import datetime

import httpx

from daemon.config import Config
from daemon.evolution import EvolutionClient
from daemon.identity import jid
from daemon.metrics import Metrics
from daemon.store import Store

log = logging.getLogger("sdr.outbox")

LOOK_BACK_PAGES = 3  # findMessages pages searched per chat (newest first)


class UncertainSends:
    def __init__(self, config: Config, sender: EvolutionClient, store: Store, metrics: Metrics) -> None:
        self.sender = sender
        self.store = store
        self.metrics = metrics
        self.policy = config.evolution.on_uncertain_send
        setting = config.evolution.stores_messages
        self._history: bool | None = None if setting == "auto" else setting == "yes"
        self._warned = False

    async def keeps_history(self) -> bool | None:
        """Whether findMessages can answer, decided once (`auto`: is a reply we know
        arrived in the instance's history?); None while nothing was sent to ask about."""
        if self._history is None:
            probe = await self.store.last_sent()
            if probe is None:
                return None
            identity, provider_id = probe
            self._history = await self.sender.keeps_history(jid(identity), provider_id)
            log.info("the Evolution instance %s message history", "keeps" if self._history else "keeps no")
        return self._history

    async def settle(self, identity: str, lid: str | None, text: str, since: datetime) -> tuple[str, str | None]:
        """('arrived', provider id) | ('absent', None): send it | ('resend' | 'skip', None):
        the history could not tell, and the policy chose."""
        try:
            if self._history is not False:
                jids = list(dict.fromkeys([jid(identity), *([lid] if lid else [])]))
                found = await self.sender.was_sent(jids, text, since, LOOK_BACK_PAGES)
                if found is not None:  # found: there is a history
                    self._history = True
                    self.metrics.uncertain.labels("arrived").inc()
                    return "arrived", found
                if await self.keeps_history():  # a history without it: it never arrived
                    self.metrics.uncertain.labels("absent").inc()
                    return "absent", None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("cannot tell whether a reply arrived (%s: %s)", exc.__class__.__name__, exc)
        if not self._warned:
            self._warned = True
            log.warning(
                "a reply's send is uncertain and the Evolution instance keeps no history to check it "
                "(DATABASE_SAVE_DATA_NEW_MESSAGE=true lets it): following on_uncertain_send = %s",
                self.policy,
            )
        self.metrics.uncertain.labels(self.policy).inc()
        return self.policy, None
