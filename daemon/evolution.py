"""The Evolution API (v2): its webhook events in, `sendText` out.

Parsing turns a body into a lead message or a reason to ignore it; the client sends with
one pooled httpx client and retries only what certainly did not arrive."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

from daemon.config import Config
from daemon.errors import BadPayload, MediaUnavailable, SendFailed
from daemon.models import Inbound, Takeover

log = logging.getLogger("sdr.evolution")

UPSERT = "messages.upsert"
PRESENCE = "presence.update"
EDITED = "messages.edited"  # a lead edited a message: the raw protocolMessage
SENT = "send.message"  # our own sends through the API (Evolution runs Baileys with emitOwnEvents off)
TYPING = frozenset({"composing", "recording"})
STOPPED = frozenset({"paused", "available", "unavailable"})  # Baileys' WAPresence, the rest
MEDIA_FIELDS = {  # Baileys' message field -> our kind (daemon.models.MEDIA_KINDS)
    "imageMessage": "image",
    "audioMessage": "audio",
    "videoMessage": "video",
    "documentMessage": "document",
    "stickerMessage": "sticker",
}


class Key(msgspec.Struct, kw_only=True):
    remoteJid: str
    id: str
    fromMe: bool = False
    participant: str | None = None
    # Since Evolution 2.3.5 the key is Baileys' own: a LID-addressed chat has remoteJid
    # "<lid>@lid" and, when WhatsApp sends it, the phone in remoteJidAlt (in a phone-
    # addressed chat, remoteJidAlt may be the LID instead).
    remoteJidAlt: str | None = None
    addressingMode: str | None = None


class MessageData(msgspec.Struct, kw_only=True):
    key: Key
    pushName: str | None = None
    message: dict[str, Any] | None = None
    messageType: str | None = None
    messageTimestamp: int | float | str | None = None


class Envelope(msgspec.Struct, kw_only=True):
    event: str | None = None
    instance: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"null")
    # The instance's token (when Evolution exposes it): how a global webhook, which sends
    # no custom headers, can be authenticated.
    apikey: str | None = None


class EditData(msgspec.Struct, kw_only=True):
    """`messages.edited`: the protocolMessage as is. Its key is the editor's (fromMe, the
    business's jid), so only `key.id`, the edited message's id, tells whose message it is."""

    key: Key
    type: str | int | None = None
    editedMessage: dict[str, Any] | None = None
    timestampMs: int | str | None = None


class PresenceData(msgspec.Struct, kw_only=True):
    id: str
    presences: dict[str, dict[str, Any]] = {}


_envelope = msgspec.json.Decoder(Envelope)
_message = msgspec.json.Decoder(MessageData)
_presence = msgspec.json.Decoder(PresenceData)
_edit = msgspec.json.Decoder(EditData)


@dataclass(frozen=True)
class Ignored:
    reason: str  # own_send | group | broadcast | event | no_content | not_a_phone | presence | edit


@dataclass(frozen=True)
class Edit:
    """A lead changed the text of one of its messages (`provider_id`)."""

    provider_id: str
    text: str
    edit_id: str  # unique per edit: the original id and the edit's time


@dataclass(frozen=True)
class Typing:
    """The lead's chat presence: "composing" (typing or recording: its burst is not over)
    or "paused" (stopped: "paused", "available" or "unavailable")."""

    phone: str
    lid: str | None = None
    state: str = "composing"


def normalise_event(name: str) -> str:
    """`MESSAGES_UPSERT`, `messages-upsert` and `messages.upsert` are one event."""
    return name.strip().lower().replace("_", ".").replace("-", ".")


def parse_envelope(body: bytes) -> Envelope:
    """The event's envelope, its `data` left raw; BadPayload when it is not one."""
    try:
        return _envelope.decode(body)
    except msgspec.ValidationError as exc:
        raise BadPayload(422, f"invalid event: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadPayload(400, f"body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:  # msgspec < 0.23's answer to a non-UTF-8 string (0.23: DecodeError)
        raise BadPayload(400, "body is not valid JSON: a string is not valid UTF-8") from None
    except RecursionError:  # msgspec's answer to very deep nesting; no event nests deeply
        raise BadPayload(400, "body nests too deeply to be an event") from None


def parse_event(body: bytes | Envelope, path_event: str | None = None) -> Inbound | Takeover | Typing | Edit | Ignored:
    env = body if isinstance(body, Envelope) else parse_envelope(body)
    name = env.event or path_event
    if not name:
        raise BadPayload(422, "invalid event: Object missing required field `event`")
    event = normalise_event(name)
    if event == SENT:
        return Ignored("own_send")
    if event not in (UPSERT, PRESENCE, EDITED):
        return Ignored("event")
    if bytes(env.data) in (b"", b"null"):
        raise BadPayload(422, "invalid event: Object missing required field `data`")
    try:
        if event == PRESENCE:
            return _to_typing(_presence.decode(env.data))
        if event == EDITED:
            return _to_edit(_edit.decode(env.data))
        return _to_inbound(_message.decode(env.data), env.instance)
    except msgspec.ValidationError as exc:
        raise BadPayload(422, f"invalid event: {exc} (in `data`)") from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        # `data` was kept raw above, so its strings are checked only now; msgspec 0.23
        # raises DecodeError for invalid UTF-8, older versions UnicodeDecodeError.
        raise BadPayload(400, "body is not valid JSON: a string is not valid UTF-8") from None
    except RecursionError:
        raise BadPayload(400, "body nests too deeply to be an event") from None


def _phone(jid: str) -> str | None:
    """A phone jid's number (`5511...@s.whatsapp.net`, device suffix dropped); None for any
    other jid: a LID's digits are not a phone number."""
    user, _, server = jid.partition("@")
    if server not in ("s.whatsapp.net", "c.us", ""):
        return None
    phone = user.split(":", 1)[0]
    # isascii: str.isdigit() also takes other scripts' digits ("٥٥١١..."), not a number
    return phone if phone.isascii() and phone.isdigit() and 8 <= len(phone) <= 15 else None


def _lid(jid: str | None) -> str | None:
    """`187654321098765@lid` (device suffix dropped) when `jid` is a LID, else None."""
    if not jid:
        return None
    user, _, server = jid.partition("@")
    user = user.split(":", 1)[0]
    if server != "lid" or not (user.isascii() and user.isdigit() and 1 <= len(user) <= 20):
        return None
    return f"{user}@lid"


def identity(key: Key) -> tuple[str, str | None] | None:
    """(the lead's identity, its LID when known): the phone when the event gives it (in
    remoteJid or remoteJidAlt), else the `@lid` jid, which Evolution's sendText accepts as
    a number. None when neither names a person."""
    phone = _phone(key.remoteJid) or (_phone(key.remoteJidAlt) if key.remoteJidAlt else None)
    lid = _lid(key.remoteJid) or _lid(key.remoteJidAlt)
    if phone is not None:
        return phone, lid
    return (lid, lid) if lid is not None else None


MAX_ID_CHARS = 256  # WhatsApp ids are ~20-32; provider_id's unique index takes ~2.7 KB at most


def _no_nul(value: Any) -> Any:
    """PostgreSQL text and jsonb cannot hold NUL: a `\\u0000` would fail the insert (and
    every message sharing its group commit), so it is dropped from what we store."""
    if isinstance(value, str):
        return value.replace("\x00", "") if "\x00" in value else value
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    return value


def _to_typing(data: PresenceData) -> Typing | Ignored:
    """Baileys' presence map: {jid: {"lastKnownPresence": "composing" | "recording" | ...}};
    the chat's jid may be a phone's or a LID."""
    lid = _lid(data.id)
    who = _phone(data.id) or lid
    if who is None:
        return Ignored("presence")
    states = {str(p.get("lastKnownPresence", "")) for p in data.presences.values() if isinstance(p, dict)}
    if states & TYPING:
        return Typing(who, lid)
    if states & STOPPED:
        return Typing(who, lid, "paused")
    return Ignored("presence")


def _to_inbound(data: MessageData, instance: str | None) -> Inbound | Takeover | Ignored:
    jid = data.key.remoteJid
    if jid.endswith("@g.us"):
        return Ignored("group")
    if jid.endswith("@broadcast") or jid.endswith("@newsletter"):
        return Ignored("broadcast")
    who = identity(data.key)
    if who is None:
        return Ignored("not_a_phone")
    phone, lid = who
    if len(data.key.id) > MAX_ID_CHARS or "\x00" in data.key.id:
        raise BadPayload(422, f"invalid event: `key.id` must be at most {MAX_ID_CHARS} characters, without NUL")
    kind, body, media = _content(data.message or {})
    if data.key.fromMe:  # a person wrote from the business's number (any content counts)
        return Takeover(
            phone, lid, data.key.id, _no_nul(body or f"[{kind or 'message'}]"), _timestamp(data.messageTimestamp)
        )
    if kind is None:
        return Ignored("no_content")
    if media is not None:  # what fetching the bytes later needs, when the event has none
        media["key"] = {"id": data.key.id, "remoteJid": jid, "fromMe": False}
        media["instance"] = instance
        media = _no_nul(media)
    return Inbound(
        phone=phone,
        push_name=_no_nul(data.pushName),
        provider_id=data.key.id,
        kind=kind,
        body=body,
        media=media,
        provider_ts=_timestamp(data.messageTimestamp),
        lid=lid,
    )


def _to_edit(data: EditData) -> Edit | Ignored:
    """Any protocolMessage (a deletion, disappearing-message settings) arrives as
    `messages.edited`: only a MESSAGE_EDIT (14) with a new text is an edit."""
    if data.type not in ("MESSAGE_EDIT", 14) or not isinstance(data.editedMessage, dict):
        return Ignored("edit")
    kind, text, _ = _content(data.editedMessage)
    if kind != "text" or len(data.key.id) > MAX_ID_CHARS or "\x00" in data.key.id:
        return Ignored("edit")
    return Edit(
        provider_id=data.key.id, text=text, edit_id=f"{data.key.id}:edit:{data.timestampMs or ''}"[:MAX_ID_CHARS]
    )


def _content(message: dict[str, Any]) -> tuple[str | None, str, dict[str, Any] | None]:
    text = message.get("conversation")
    if not text and isinstance(message.get("extendedTextMessage"), dict):
        text = message["extendedTextMessage"].get("text")
    if isinstance(text, str) and (text := _no_nul(text)).strip():
        return "text", text, None
    for field, kind in MEDIA_FIELDS.items():
        part = message.get(field)
        if isinstance(part, dict):
            caption = _no_nul(part["caption"]) if isinstance(part.get("caption"), str) else ""
            # Scalars only (a type, a size, a duration): nothing nested, however deep, is kept.
            media = {k: v for k in ("mimetype", "fileLength", "seconds") if (v := _scalar(part.get(k))) is not None}
            # With "webhook base64" on, Evolution puts the decrypted file here. Never the
            # part's `url`: that is WhatsApp's encrypted CDN file.
            if isinstance(message.get("base64"), str):
                media["base64"] = message["base64"]
            return kind, caption or "", media
    return None, "", None


def _scalar(value: Any) -> str | int | float | None:
    """A string or number as is; WhatsApp's 64-bit numbers, which Evolution 2.3.6 passes on
    as protobuf Longs (`{"low": .., "high": .., "unsigned": ..}`), as an int."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, dict) and isinstance(value.get("low"), int) and isinstance(value.get("high"), int):
        low, high = value["low"] & 0xFFFFFFFF, value["high"]
        number = (high & 0xFFFFFFFF) << 32 | low
        if not value.get("unsigned") and number >= 1 << 63:
            number -= 1 << 64
        return int(number)
    return None


def _timestamp(value: int | float | str | None) -> datetime:
    try:
        seconds = float(value) if value is not None else None
    except (ValueError, OverflowError):  # not a number, or an integer beyond any float
        seconds = None
    if seconds is None or seconds <= 0:
        return datetime.now(UTC)
    if seconds > 1e11:  # some senders use milliseconds
        seconds /= 1000
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):  # NaN, infinity, past year 9999
        return datetime.now(UTC)


# --- sending ----------------------------------------------------------------------------


PRESENCE_MAX_MS = 20_000  # Evolution loops composing -> paused -> composing past 20 s
_TRANSIENT = (
    "connection closed",
    "timed out",
    "rate-overlimit",
    "connection failure",
    "stream errored",
    "connection lost",
)


def classify(status: int, body: str) -> str:
    """What an Evolution error answer means, from its real bodies (see
    tests/fixtures/evolution/SOURCES.md): every send error comes wrapped in a 400
    `{"status":400,"error":"Bad Request","response":{"message":[...]}}`."""
    try:
        doc = msgspec.json.decode(body)
        messages = (doc.get("response") or {}).get("message")
    except (msgspec.DecodeError, AttributeError):
        messages = None
    items = messages if isinstance(messages, list) else [messages]
    if any(isinstance(m, dict) and m.get("exists") is False for m in items):
        return "unreachable"
    text = " ".join(str(m) for m in items if m is not None).lower()
    if any(t in text for t in _TRANSIENT) and status in (400, 500):
        # Failed before WhatsApp took the message (the socket was closed or reconnecting,
        # the number check timed out, a rate limit): sending again is safe.
        return "transient"
    if status in (429, 503):  # rate-limited, or not taken in at all
        return "transient"
    if status >= 500 or status == 408:  # it may have failed after WhatsApp took the message
        return "uncertain"
    return "refused"


class EvolutionClient:
    def __init__(self, config: Config) -> None:
        p = config.profile
        self.instance = config.evolution.instance
        self.attempts = p.limits.send_attempts
        self.backoff = p.limits.send_backoff
        headers = {"apikey": config.evolution_api_key} if config.evolution_api_key else {}
        self.http = httpx.AsyncClient(
            base_url=config.evolution.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(p.timeouts.evolution_send, connect=p.timeouts.evolution_read),
            limits=httpx.Limits(max_connections=p.pools.http_max_connections),
        )
        # "typing..." requests are cancelled when the reply is ready, and httpcore 1.0.9
        # can lose a pool slot for good when a request is cancelled while its connection
        # is being set up (encode/httpcore#1093): on their own pool, that can cost a
        # missing "typing...", never a reply (at 1,000 leads it starved sendText).
        self.presence_http = httpx.AsyncClient(
            base_url=config.evolution.base_url.rstrip("/"),
            headers=headers,
            limits=httpx.Limits(max_connections=p.pools.http_max_connections),
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.presence_http.aclose()

    async def get_media(self, key: dict[str, Any], instance: str | None, timeout: float) -> str:
        """A media message's file, as base64, from the Evolution API (it decrypts it)."""
        try:
            resp = await self.http.post(
                f"/chat/getBase64FromMediaMessage/{instance or self.instance}",
                json={"message": {"key": key}, "convertToMp4": False},
                timeout=timeout,
            )
        except httpx.TimeoutException:
            raise TimeoutError(f"getBase64FromMediaMessage took more than {timeout:g}s") from None
        if resp.status_code >= 400:
            hint = ""
            if "not found" in resp.text.lower():  # Evolution keeps no copy of the message
                hint = (
                    " (the webhook carried no base64: turn on the instance webhook's base64 option, or "
                    "DATABASE_SAVE_DATA_NEW_MESSAGE=true on the Evolution server)"
                )
            raise MediaUnavailable(f"getBase64FromMediaMessage: HTTP {resp.status_code}: {resp.text[:200]}{hint}")
        try:
            b64 = resp.json().get("base64")
        except (ValueError, AttributeError):
            b64 = None
        if not isinstance(b64, str) or not b64:
            raise MediaUnavailable("getBase64FromMediaMessage answered without a base64 field")
        return b64

    async def find_sent(self, jids: list[str], since: datetime, pages: int) -> list[dict[str, Any]]:
        """What we sent to these chats since `since`, newest first, from Evolution's
        message history (empty when the instance keeps none); at most `pages` pages each
        (a bounded look-back)."""
        records: list[dict[str, Any]] = []
        for jid in jids:
            for page in range(1, pages + 1):
                resp = await self.http.post(
                    f"/chat/findMessages/{self.instance}",
                    json={"where": {"key": {"remoteJid": jid, "fromMe": True}}, "page": page},
                )
                resp.raise_for_status()
                found = resp.json().get("messages") or {}
                batch = [r for r in found.get("records") or [] if isinstance(r, dict)]
                records += [r for r in batch if float(_scalar(r.get("messageTimestamp")) or 0) >= since.timestamp() - 1]
                oldest = min((float(_scalar(r.get("messageTimestamp")) or 0) for r in batch), default=0.0)
                if page >= int(found.get("pages") or 1) or oldest < since.timestamp() - 1:
                    break
        return records

    async def was_sent(self, jids: list[str], text: str, since: datetime, pages: int = 3) -> str | None:
        """The id of a message with this text we sent to one of these chats since `since`,
        if Evolution's history has one: how a reply whose send timed out, or that a dead
        daemon left 'sending', is told apart from one that never left."""
        for record in await self.find_sent(jids, since, pages):
            message = record.get("message") or {}
            body = message.get("conversation") or (message.get("extendedTextMessage") or {}).get("text")
            key = record.get("key") or {}
            if body == text and key.get("fromMe"):
                return str(key.get("id"))
        return None

    async def keeps_history(self, jid: str, provider_id: str) -> bool:
        """Whether the instance saves messages: is a message we know we sent in its history?"""
        resp = await self.http.post(
            f"/chat/findMessages/{self.instance}", json={"where": {"key": {"remoteJid": jid, "id": provider_id}}}
        )
        resp.raise_for_status()
        return bool((resp.json().get("messages") or {}).get("records"))

    async def send_presence(self, number: str, delay_ms: int, timeout: float) -> None:
        """Shows "typing..." for `delay_ms` (Evolution holds the request that long, so the
        read timeout is the delay plus `timeout`); never more than one Evolution slice."""
        delay_ms = min(delay_ms, PRESENCE_MAX_MS)
        resp = await self.presence_http.post(
            f"/chat/sendPresence/{self.instance}",
            json={"number": number, "presence": "composing", "delay": delay_ms},
            timeout=httpx.Timeout(delay_ms / 1000 + timeout, connect=timeout),
        )
        resp.raise_for_status()

    async def send_text(
        self, number: str, text: str, before_attempt: Callable[[], Awaitable[None]] | None = None
    ) -> str | None:
        """Sends and returns the provider's message id; retries what did not arrive.
        `before_attempt` runs before each try, so every attempt is on record first."""
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            if before_attempt is not None:
                await before_attempt()
            try:
                return await self._send_once(number, text)
            except SendFailed as exc:
                if not exc.retryable or attempt == self.attempts:
                    raise
                log.warning("sendText attempt %d failed (%s); retrying in %.2fs", attempt, exc, delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _send_once(self, number: str, text: str) -> str | None:
        try:
            resp = await self.http.post(f"/message/sendText/{self.instance}", json={"number": number, "text": text})
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise SendFailed(f"cannot connect: {exc.__class__.__name__}: {exc}", "transient") from None
        except httpx.HTTPError as exc:  # written, then no answer: it may have been delivered
            raise SendFailed(f"{exc.__class__.__name__}: {exc}", "uncertain") from None
        if resp.status_code >= 400:
            kind = classify(resp.status_code, resp.text)
            raise SendFailed(f"HTTP {resp.status_code}: {resp.text[:200]}", kind)
        try:
            key = resp.json().get("key") or {}
            return str(key["id"]) if "id" in key else None
        except (ValueError, AttributeError):
            return None


def text_event(
    phone: str,
    text: str,
    *,
    message_id: str,
    instance: str,
    push_name: str | None = None,
    timestamp: float | None = None,
) -> dict[str, Any]:
    """A `messages.upsert` event as Evolution API v2 posts it (used by chat and tests)."""
    ts = int(timestamp if timestamp is not None else datetime.now(UTC).timestamp())
    return {
        "event": UPSERT,
        "instance": instance,
        "data": {
            "key": {
                "remoteJid": phone if "@" in phone else f"{phone}@s.whatsapp.net",
                "fromMe": False,
                "id": message_id,
            },
            "pushName": push_name,
            "status": "DELIVERY_ACK",
            "message": {"conversation": text},
            "messageType": "conversation",
            "messageTimestamp": ts,
            "instanceId": "00000000-0000-0000-0000-000000000000",
            "source": "android",
        },
        "destination": "",
        "date_time": datetime.now(UTC).isoformat(),
        "sender": f"{phone}@s.whatsapp.net",
        "server_url": "",
        "apikey": "",
    }


def presence_event(phone: str, state: str, *, instance: str) -> dict[str, Any]:
    """A `presence.update` as Evolution API v2 posts Baileys' event (whatsapp.baileys.service.ts:
    `sendDataWebhook(Events.PRESENCE_UPDATE, payload)`): the chat's jid and its presence map."""
    jid = phone if "@" in phone else f"{phone}@s.whatsapp.net"
    return {
        "event": "presence.update",
        "instance": instance,
        "data": {"id": jid, "presences": {jid: {"lastKnownPresence": state}}},
        "destination": "",
        "date_time": datetime.now(UTC).isoformat(),
        "sender": "",
        "server_url": "",
        "apikey": "",
    }


def media_event(
    phone: str,
    kind: str,
    *,
    message_id: str,
    instance: str,
    b64: str | None,
    mimetype: str,
    caption: str = "",
    seconds: int | None = None,
    timestamp: float | None = None,
) -> dict[str, Any]:
    """An image or voice-note `messages.upsert` as Evolution API v2 posts it; with `b64`,
    as it does when the instance has "webhook base64" on."""
    event = text_event(phone, "", message_id=message_id, instance=instance, timestamp=timestamp)
    field = {"image": "imageMessage", "audio": "audioMessage"}[kind]
    part: dict[str, Any] = {
        "url": "https://mmg.whatsapp.net/o1/v/t62.7118-24/encrypted.enc",
        "mimetype": mimetype,
        "fileLength": str(len(b64) * 3 // 4) if b64 else "0",
        "mediaKey": "aGVsbG8=",
    }
    if kind == "image":
        part["caption"] = caption
    else:
        part.update(seconds=seconds or 0, ptt=True)
    message: dict[str, Any] = {field: part}
    if b64 is not None:
        message["base64"] = b64
    event["data"].update(message=message, messageType=field)
    return event


_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")


def split_message(text: str, limit: int) -> list[str]:
    """Splits a reply longer than `limit` on paragraph, then sentence, then word
    boundaries, so no WhatsApp message is cut mid-sentence when it can be helped."""
    if len(text) <= limit:
        return [text]
    parts: list[str] = []
    for paragraph in text.split("\n\n"):
        for i, chunk in enumerate(_pieces(paragraph.strip(), limit)):
            if i == 0 and parts and len(parts[-1]) + 2 + len(chunk) <= limit:
                parts[-1] += "\n\n" + chunk  # short paragraphs travel together
            else:
                parts.append(chunk)
    return parts


def _pieces(paragraph: str, limit: int) -> list[str]:
    """A paragraph as chunks of at most `limit`: whole, else by sentences, else by words."""
    if len(paragraph) <= limit:
        return [paragraph] if paragraph else []
    chunks: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(paragraph):
        if len(sentence) > limit and current:  # a long sentence starts its own chunk
            chunks.append(current)
            current = ""
        for word in [sentence] if len(sentence) <= limit else sentence.split():
            while len(word) > limit:  # a single "word" longer than the limit: hard cut
                chunks.append(word[:limit])
                word = word[limit:]
            candidate = f"{current} {word}" if current else word
            if len(candidate) <= limit:
                current = candidate
            else:
                chunks.append(current)
                current = word
    if current:
        chunks.append(current)
    return chunks
