"""A lead is its WhatsApp identity: its phone number when known, else its LID jid.

Since Evolution 2.3.5 many leads arrive LID-addressed (`remoteJid: "<lid>@lid"`, the
phone in `remoteJidAlt` only when WhatsApp gives it). Every message that carries both
teaches the pair (stored on the lead, see sql/0007); a message that carries only the LID
is then filed under the phone. Locks, caches, the buffer, follow-ups and exports all key
on the identity this module settles, and replies go to it (`jid()` for the API's searches).
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from daemon.cache import TwoTierCache
from daemon.models import Inbound

if TYPE_CHECKING:  # the store imports the outbox, which addresses chats with `jid` from here
    from daemon.store import Store

LID_SERVER = "@lid"


def is_lid(identity: str) -> bool:
    return identity.endswith(LID_SERVER)


def parse_identity(text: str) -> str | None:
    """A lead as people type it: a phone in any format ('+55 (11) 98765-4321' ->
    '5511987654321', 8 to 15 digits) or a LID jid ('187654321098765@lid'); None otherwise."""
    text = text.strip()
    if text.endswith(LID_SERVER):
        user = text[: -len(LID_SERVER)]
        return text if user.isascii() and user.isdigit() and 1 <= len(user) <= 20 else None
    if re.search(r"[^\d\s+().-]", text):
        return None
    phone = re.sub(r"\D", "", text)
    return phone if 8 <= len(phone) <= 15 else None


IDENTITY_HELP = "a phone number of 8 to 15 digits (5511987654321) or a LID jid (187654321098765@lid)"


def jid(number: str) -> str:
    """The chat jid Evolution sends to and files messages under for a `number`, as its
    `createJid` makes it (src/utils/createJid.ts:35-71, v2.3.6): a jid is kept as is (a
    LID); otherwise digits only, long ones are groups, then the Mexican/Argentinian and
    Brazilian mobile fixes (a BR number loses its ninth digit when its area code is 31 or
    more and the next digit 7 or more), on `@s.whatsapp.net`. findMessages must search the
    jid this makes, not `<number>@s.whatsapp.net`."""
    number = re.sub(r":\d+", "", number, count=1)
    if any(s in number for s in ("@g.us", "@s.whatsapp.net", "@lid", "@broadcast")):
        return number
    for c in (" ", "\t", "\n", "+", "(", ")"):
        number = number.replace(c, "")
    number = number.split(":")[0].split("@")[0]
    if "-" in number and len(number) >= 24:
        return re.sub(r"[^\d-]", "", number) + "@g.us"
    number = re.sub(r"\D", "", number)
    if len(number) >= 18:
        return number + "@g.us"
    if number[:2] in ("52", "54") and len(number) == 13:  # formatMXOrARNumber
        number = number[:2] + number[3:]
    br = re.fullmatch(r"(\d{2})(\d{2})\d(\d{8})", number)  # formatBRNumber
    if br and br[1] == "55" and not (int(br[3][0]) < 7 or int(br[2]) < 31):
        number = br[1] + br[2] + br[3]
    return number + "@s.whatsapp.net"


class Identities:
    """Settles each message's identity before it is stored. LID -> phone pairs never
    change, so the ones seen are kept in a bounded LRU: a LID-addressed lead costs one
    lookup, not one per message."""

    def __init__(self, store: Store, size: int, leads: TwoTierCache[dict[str, Any]]) -> None:
        self.store = store
        self.size = size
        self.leads = leads  # identities whose lead row changed are dropped from it
        self._phones: OrderedDict[str, str] = OrderedDict()  # lid -> phone

    def _remember(self, lid: str, phone: str) -> None:
        self._phones[lid] = phone
        self._phones.move_to_end(lid)
        while len(self._phones) > self.size:
            self._phones.popitem(last=False)

    def known(self, lid: str) -> str | None:
        phone = self._phones.get(lid)
        if phone is not None:
            self._phones.move_to_end(lid)
        return phone

    async def settle(self, msgs: list[Inbound]) -> list[Inbound]:
        """The messages with the identity each belongs to (a LID-only message of a lead
        whose phone is known goes to the phone)."""
        if not any(m.lid for m in msgs):
            return msgs
        learned = {m.lid: m.phone for m in msgs if m.lid and m.phone != m.lid and self.known(m.lid) != m.phone}
        if learned:
            changed = await self.store.link_lids(learned)
            for lid, phone in learned.items():
                self._remember(lid, phone)
            if changed:
                for identity in changed:  # renamed or merged: cached copies are stale
                    await self.leads.invalidate(identity)
        unknown = sorted({m.lid for m in msgs if m.lid and m.phone == m.lid and self.known(m.lid) is None})
        if unknown:
            for lid, phone in (await self.store.phones_for_lids(unknown)).items():
                if not is_lid(phone):
                    self._remember(lid, phone)
        return [
            dataclasses.replace(m, phone=self.known(m.lid) or m.phone) if m.lid and m.phone == m.lid else m
            for m in msgs
        ]

    async def of(self, who: str, lid: str | None) -> str:
        """The identity for a presence event (`who` is a phone or a LID)."""
        if lid is None or who != lid:
            return who
        if (phone := self.known(lid)) is None:
            found = (await self.store.phones_for_lids([lid])).get(lid)
            if found is not None and not is_lid(found):
                self._remember(lid, found)
                phone = found
        return phone or who
