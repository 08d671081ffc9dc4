"""A fake Evolution API (v2.3.6): a real HTTP server speaking its REST wire format.

WhatsApp cannot run here, so benches and tests point the daemon at this instead; it records
each reply's arrival time by the same clock the load generator uses.

What it answers, and why, comes from the real server. The facts (with file:line citations
into the EvolutionAPI/evolution-api repository at 2.3.6, Baileys 7.0.0-rc.6 and
jsonschema 1.5.0) are in tests/fixtures/evolution/SOURCES.md, and the bodies are copied
from the JSON fixtures beside it. In short:

- Guards, in the real order (src/api/routes/index.router.ts:41): an instance other than
  `instance` gets 404 `instance_not_found_404.json` (src/api/guards/instance.guard.ts:36),
  then an `apikey` header other than `api_key` gets 401 `unauthorized_401.json`
  (src/api/guards/auth.guard.ts:12-16, 50). Both checks are off by default.
- Errors have the Express handler's shape `{status, error, response: {message}}`
  (src/main.ts:110-116); `BadRequestException(...args)` makes `message` the list of its
  arguments (src/exceptions/400.exception.ts:3-10), so a schema failure, whose argument is
  itself a list, is nested one level deeper: `[["..."]]`
  (src/api/abstract/abstract.router.ts:49-59; the texts are jsonschema 1.5.0's).
- sendText (SOURCES.md Q6, Q10): schema src/validate/message.schema.ts:68-93; empty text
  400 "Text is required" (whatsapp.baileys.service.ts:2467-2469); the jid from
  src/utils/createJid.ts; a number not on WhatsApp 400 `send_text_400_exists_false.json`
  (WB:2137-2139, 3477-3483; `@lid` jids are assumed to exist, WB:3394-3403); a Baileys
  failure 400 `["Error: Connection Closed" | "Error: Timed Out" | "Error: rate-overlimit"]`
  (WB:2393-2396); success 201 with the `prepareMessage` object (`send_text_201.json`,
  WB:2238-2265, 2392), ids "3EB0" + 18 upper-case hex.
- sendPresence (Q7): schema src/validate/chat.schema.ts:163-175; the request is held for
  the whole `delay` (WB:2400-2449), in 20 s slices that each re-send the presence; 201
  `{"presence": ...}` (chat.router.ts:134-143).
- findMessages (Q8): the stored rows (only with DATABASE_SAVE_DATA_NEW_MESSAGE, ENV:491),
  filtered as WB:4850-4957 does (exact `key.remoteJid`, `fromMe: false` ignored), newest
  first, paged by `offset` (default 50); 200.
- getBase64FromMediaMessage (Q9): a key-only request loads the message from the database
  (WB:3677, 497-504), so without message storage it is 400 "Message not found"; 201 with
  WB:3799-3807's shape.

What is not the real server: `failing_until`/`failing_status`/`stall` (a broken proxy or
upstream in front of it, for the fault suite), `answers` (queued status codes),
`deliver_then_stall` (a slow answer after a delivery) and the presence records' `ended`/
`disconnected` (the real server does not notice a client that left: it keeps typing until
the delay ends and sends "paused" then; `typing_until` says when that would be).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import http
import json
import math
import mimetypes
import secrets
import string
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemon.identity import jid
from daemon.testing.servers import background_server, quiet_server

# --- the real server's pieces -------------------------------------------------------------

PRESENCES = ("unavailable", "available", "composing", "recording", "paused")
PRESENCE_SLICE = 20.0  # seconds: the typing loop's slice (WB:2412-2424)
# (name, type, description) of the properties the route schemas check, in their order:
# message.schema.ts:68-93 (`number` is numberDefinition, "Invalid format") and
# chat.schema.ts:163-175.
TEXT_PROPERTIES = (
    ("number", "string", "Invalid format"),
    ("text", "string", None),
    ("linkPreview", "boolean", None),
    ("delay", "integer", "Enter a value in milliseconds"),
)
PRESENCE_PROPERTIES = (("number", "string", "Invalid format"), ("delay", "number", None), ("presence", "string", None))
STORED_FIELDS = ("key", "pushName", "messageType", "message", "messageTimestamp", "instanceId", "source")
TRANSIENT_ERRORS = ("Connection Closed", "Timed Out", "rate-overlimit")  # Boom texts, Q6
# mime-types' `extension()` (the first extension mime-db lists), for the usual media.
_EXTENSIONS = {
    "image/jpeg": "jpeg",
    "image/png": "png",
    "image/webp": "webp",
    "audio/ogg": "oga",
    "audio/mpeg": "mpga",
    "audio/mp4": "m4a",
    "video/mp4": "mp4",
    "application/pdf": "pdf",
}


create_jid = jid  # Evolution's own rule, shared with the daemon (daemon.identity)


def reason(status: int) -> str:
    """The reason phrase Express' handler has no better `error` than (Nest-style names)."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_body(status: int, message: Any) -> dict[str, Any]:
    """The Express error handler's body (src/main.ts:110-116)."""
    return {"status": status, "error": reason(status), "response": {"message": message}}


def error(status: int, message: Any) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


def bad_request(*args: Any) -> JSONResponse:
    """`throw new BadRequestException(...args)`: 400 with the arguments as the message."""
    return error(400, list(args))


def invalid(messages: list[str]) -> JSONResponse:
    """A body the route's JSON schema refuses (abstract.router.ts:49-59): the messages are
    one argument, hence the nested list."""
    return bad_request(messages)


def schema_errors(
    body: dict[str, Any],
    properties: tuple[tuple[str, str, str | None], ...],
    required: tuple[str, ...],
    enums: dict[str, tuple[str, ...]] | None = None,
) -> list[str]:
    """What jsonschema 1.5.0 says of `body`, as abstract.router.ts:49-59 words it: a failing
    property's `description` if it has one, else its stack (`<name> is not ...`); then the
    missing required ones (the root schema has an $id, so no description: the stack with
    its `instance ` prefix). A null is present, and not of any of these types."""
    out: list[str] = []
    for name, kind, description in properties:
        if name not in body:
            continue
        value = body[name]
        if not js_type(value, kind):
            out.append(description or f"{name} is not of a type(s) {kind}")
        if enums and name in enums and value not in enums[name]:
            out.append(description or f"{name} is not one of enum values: {','.join(enums[name])}")
    return out + [f'instance requires property "{n}"' for n in required if n not in body]


def js_type(value: Any, kind: str) -> bool:
    """jsonschema's type test, for the types the schemas here use."""
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "integer":
        return js_type(value, "number") and float(value).is_integer()
    return True


def message_id() -> str:
    """Baileys' generateMessageIDV2 shape: "3EB0" + 18 upper-case hex (22 chars, Q10)."""
    return "3EB0" + secrets.token_hex(9).upper()


def cuid() -> str:
    """A Prisma cuid-like row id ("c" + 24 base-36 chars), as findMessages' `id`."""
    alphabet = string.digits + string.ascii_lowercase
    return "c" + "".join(secrets.choice(alphabet) for _ in range(24))


def slices(delay_ms: float) -> list[float]:
    """The typing loop's waits, in seconds (WB:2411-2440): 20 s slices while more than 20 s
    is left, then the rest; a delay of 20 s or less is one slice."""
    left, out = float(delay_ms), []
    if left > PRESENCE_SLICE * 1000:
        while left > PRESENCE_SLICE * 1000:
            out.append(PRESENCE_SLICE)
            left -= PRESENCE_SLICE * 1000
        if left > 0:
            out.append(left / 1000)
    else:
        out.append(max(left, 0.0) / 1000)
    return out


def _when(value: Any) -> float | None:
    """`new Date(value)` in seconds, for findMessages' messageTimestamp range."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) / 1000
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value).timestamp()
    return None


async def _read_json(request: Request) -> tuple[Any, JSONResponse | None]:
    """The body, or the answer to a body that is not JSON. (Express' body-parser error has a
    status but no `error`, so the handler says "Internal Server Error" with a 400; the exact
    SyntaxError text is not reproduced.)"""
    raw = await request.body()
    if not raw:
        return {}, None
    try:
        return json.loads(raw), None
    except ValueError as exc:
        body = {"status": 400, "error": "Internal Server Error", "response": {"message": str(exc)}}
        return None, JSONResponse(body, status_code=400)


def _dict(value: Any) -> dict[str, Any]:
    """An object from the body, or {} for anything else (a JSON array or scalar)."""
    return value if isinstance(value, dict) else {}


def _positive(value: Any, default: int) -> int:
    """A positive integer from the body, else the default (findMessages' page/offset)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


async def _client_left(request: Request) -> None:
    """Returns when the client disconnects (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class FakeEvolution:
    """Records every sendText; answers as the real server would, or with the statuses queued
    in `answers` first. Everything beyond that is off by default."""

    keep_bodies: bool = True  # benches keep only arrival times (no sent/presences/stored rows)
    sent: list[dict[str, Any]] = field(default_factory=list)
    presences: list[dict[str, Any]] = field(default_factory=list)
    # Status codes (or (code, body) pairs) the next sendTexts answer, nothing delivered; a
    # bare 400 gets the real transient body (`transient_error`), others their real shape.
    answers: list[int | tuple[int, Any]] = field(default_factory=list)
    arrivals: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # Every delivered message's key id -> its arrival (time.time()), kept whatever
    # keep_bodies says: the bench matches the outbox's provider_id to when the lead saw it.
    delivered_at: dict[str, float] = field(default_factory=dict)
    url: str = ""
    # Media the fake can hand out by message id, as base64 (getBase64FromMediaMessage).
    media: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (base64, mimetype)
    media_requests: list[dict[str, Any]] = field(default_factory=list)
    # Fault injection (the fault suite): until `failing_until` (a time.time()), every
    # sendText answers `failing_status`, or with 0 stalls `stall` seconds and answers 504
    # without delivering (a timeout on the caller's side).
    failing_until: float = 0.0
    failing_status: int = 503
    stall: float = 0.0
    # The real server's guards: None accepts any instance name / any apikey header.
    api_key: str | None = None
    instance: str | None = None
    # Numbers (or jids) WhatsApp does not know: sendText answers 400 `exists: false`,
    # sendPresence 400 ["[object Object]"]; never a `@lid` (assumed to exist, WB:3394-3403).
    unknown_numbers: set[str] = field(default_factory=set)
    # Until `transient_until` (a time.time()) every sendText fails inside Baileys: 400
    # ["Error: <transient_error>"], nothing delivered; counted in `transient_answers`.
    transient_until: float = 0.0
    transient_error: str = "Connection Closed"  # or "Timed Out", "rate-overlimit"
    transient_answers: int = 0
    # Until `late_until` every sendText delivers, then waits `deliver_then_stall` seconds
    # before its 201: a caller with a shorter timeout cannot know the message went out.
    deliver_then_stall: float = 0.0
    late_until: float = 0.0
    # DATABASE_SAVE_DATA_NEW_MESSAGE (the code default is false; .env.example sets true):
    # without it findMessages finds nothing and key-only media requests fail.
    stores_messages: bool = True
    stored: list[dict[str, Any]] = field(default_factory=list)  # the Message rows
    instance_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    _signals: dict[str, asyncio.Event] = field(default_factory=dict)
    _count: int = 0

    async def wait_replies(self, phone: str, count: int, after: float, timeout: float) -> list[float] | None:
        """Waits for `count` replies to `phone` that arrive after `after` (a time.time());
        consumes them and drops earlier ones. None at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.arrivals[phone] = [t for t in self.arrivals[phone] if t >= after]
            if len(self.arrivals[phone]) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            signal = self._signals.setdefault(phone, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await signal.wait()
            signal.clear()
        got, self.arrivals[phone] = self.arrivals[phone][:count], self.arrivals[phone][count:]
        return got

    def forget(self, phone: str) -> list[float]:
        """Drops (and returns) replies nobody waited for: late or extra ones."""
        self._signals.pop(phone, None)
        return self.arrivals.pop(phone, [])

    def deliveries(self, number: str) -> list[str]:
        """The texts delivered to `number` (or its jid), in order: "delivered once" checks."""
        jid = create_jid(number)
        return [s["text"] for s in self.sent if s["number"] == number or s["jid"] == jid]

    def presence_open(self, number: str) -> list[dict[str, Any]]:
        """The sendPresence requests to `number` still held (not finished nor abandoned)."""
        jid = create_jid(number)
        return [p for p in self.presences if p["ended"] is None and (p["number"] == number or p["jid"] == jid)]

    # --- the routes' shared steps ---------------------------------------------------------

    def _guard(self, request: Request) -> JSONResponse | None:
        """Instance exists, then the apikey (index.router.ts:41)."""
        name = request.path_params["instance"]
        if self.instance is not None and name != self.instance:
            return error(404, [f'The "{name}" instance does not exist'])
        if self.api_key is not None and request.headers.get("apikey") != self.api_key:
            return error(401, "Unauthorized")
        return None

    def _unknown(self, number: str) -> bool:
        jid = create_jid(number)
        return "@lid" not in jid and (number in self.unknown_numbers or jid in self.unknown_numbers)

    def _queued(self, request: Request) -> JSONResponse:
        """The next `answers` entry as a response."""
        entry = self.answers.pop(0)
        if isinstance(entry, tuple):
            status, body = entry
            return JSONResponse(body, status_code=status)
        if entry == 400:
            return bad_request(f"Error: {self.transient_error}")
        if entry == 401:
            return error(401, "Unauthorized")
        if entry == 404:
            return error(404, [f'The "{request.path_params["instance"]}" instance does not exist'])
        if entry == 500:  # the only real 500 of sendText: onWhatsApp failed (Q6)
            return error(500, self.transient_error)
        return error(entry, [reason(entry)])

    def _deliver(self, request: Request, number: str, text: str) -> dict[str, Any]:
        """Sends the message: records it and wakes waiters; returns the 201 body."""
        now = time.time()
        self._count += 1
        jid = create_jid(number)
        sent_id = message_id()
        body: dict[str, Any] = {
            "key": {"remoteJid": jid, "fromMe": True, "id": sent_id},
            "pushName": "Você",
            "status": "PENDING",
            "message": {"conversation": text},
        }
        if not jid.endswith("@g.us"):
            body["contextInfo"] = {
                "mentionedJid": [],
                "groupMentions": [],
                "ephemeralSettingTimestamp": {"low": int(now) - 172800, "high": 0, "unsigned": False},
                "disappearingMode": {"initiator": 0},
            }
        body.update(messageType="conversation", messageTimestamp=int(now), instanceId=self.instance_id, source="web")
        self.arrivals[number].append(now)
        self.delivered_at[sent_id] = now
        if number in self._signals:
            self._signals[number].set()
        if self.keep_bodies:
            self.sent.append(
                {
                    "instance": request.path_params["instance"],
                    "apikey": request.headers.get("apikey"),
                    "number": number,
                    "text": text,
                    "at": now,
                    "id": sent_id,
                    "jid": jid,
                }
            )
            if self.stores_messages:
                # The row findMessages selects (WB:4931-4942); `status` is not among them.
                row = {"id": cuid(), **{k: body[k] for k in STORED_FIELDS}}
                self.stored.append({**row, "contextInfo": body.get("contextInfo"), "MessageUpdate": []})
        return body

    # --- the routes -----------------------------------------------------------------------

    async def send_text(self, request: Request) -> Response:
        now = time.time()
        body, bad = await _read_json(request)
        if now < self.failing_until:
            if self.failing_status == 0:
                await asyncio.sleep(self.stall)
                return error(504, ["Gateway Timeout"])
            return error(self.failing_status, [reason(self.failing_status)])
        if answer := bad or self._guard(request):
            return answer
        body = _dict(body)
        problems = schema_errors(body, TEXT_PROPERTIES, ("number", "text"))
        if problems:
            return invalid(problems)
        if self.answers:
            return self._queued(request)
        number, text = body["number"], body["text"]
        if not text.strip():
            return bad_request("Text is required")
        if self._unknown(number):
            return bad_request({"jid": create_jid(number), "exists": False, "number": number})
        if body.get("delay"):  # sendText's own typing, before sending (WB:2146-2179)
            await asyncio.sleep(sum(slices(body["delay"])))
        if time.time() < self.transient_until:
            self.transient_answers += 1
            return bad_request(f"Error: {self.transient_error}")
        sent = self._deliver(request, number, text)
        if now < self.late_until and self.deliver_then_stall > 0:
            left = asyncio.create_task(_client_left(request))
            try:
                await asyncio.wait({left}, timeout=self.deliver_then_stall)
            finally:
                left.cancel()
        return JSONResponse(sent, status_code=201)

    async def send_presence(self, request: Request) -> Response:
        try:
            body, bad = await _read_json(request)
        except ClientDisconnect:  # the sender gave up on it: nothing to answer
            return Response(status_code=499)
        if answer := bad or self._guard(request):
            return answer
        body = _dict(body)
        problems = schema_errors(body, PRESENCE_PROPERTIES, ("number", "presence", "delay"), {"presence": PRESENCES})
        if problems:
            return invalid(problems)
        number, presence, delay_ms = body["number"], body["presence"], body["delay"]
        if self._unknown(number):  # the BadRequest object re-wrapped by the catch (WB:2445-2447)
            return bad_request("[object Object]")
        start = time.time()
        record: dict[str, Any] = {
            "number": number,
            "jid": create_jid(number),
            "presence": presence,
            "delay": delay_ms,
            "at": start,
            "ended": None,
            "disconnected": False,
            "composing_at": [],
            "typing_until": start + max(float(delay_ms), 0.0) / 1000,
        }
        if self.keep_bodies:
            self.presences.append(record)
        left = asyncio.create_task(_client_left(request))
        try:
            for wait in slices(delay_ms):
                record["composing_at"].append(time.time())
                done, _ = await asyncio.wait({left}, timeout=wait)
                if done:
                    record["disconnected"] = True
                    return Response(status_code=499)
        finally:
            left.cancel()
            record["ended"] = time.time()
        return JSONResponse({"presence": presence}, status_code=201)

    async def get_base64(self, request: Request) -> Response:
        body, bad = await _read_json(request)
        if answer := bad or self._guard(request):
            return answer
        body = _dict(body)
        self.media_requests.append({"instance": request.path_params["instance"], **body})
        message = _dict(body.get("message"))
        key = _dict(message.get("key"))
        whole = bool(message.get("message"))  # the caller sent the message: no lookup
        found = self.media.get(str(key.get("id"))) if (whole or self.stores_messages) else None
        if found is None:
            return bad_request("Message not found")
        b64, mimetype = found
        try:
            size = len(base64.b64decode(b64, validate=False))
        except (binascii.Error, ValueError):
            size = 0
        ext = _EXTENSIONS.get(mimetype.split(";")[0].strip()) or (mimetypes.guess_extension(mimetype) or ".false")[1:]
        return JSONResponse(
            {
                "mediaType": mimetype.split("/")[0] + "Message",
                "fileName": f"{key.get('id')}.{ext}",
                "size": {"fileLength": {"low": size, "high": 0, "unsigned": True}},
                "mimetype": mimetype,
                "base64": b64,
                "buffer": None,
            },
            status_code=201,
        )

    async def find_messages(self, request: Request) -> Response:
        body, bad = await _read_json(request)
        if answer := bad or self._guard(request):
            return answer
        body = _dict(body)
        where = _dict(body.get("where"))
        key = _dict(where.get("key"))
        if set(key) <= {"fromMe", "remoteJid", "id"}:  # messageValidateSchema's `if`/`then`
            problems = [
                "The property cannot be empty"
                for n in ("remoteJid", "id")
                if n in key and not (isinstance(key[n], str) and key[n])
            ]
            if problems:
                return invalid(problems)
        rows = self.stored if self.stores_messages else []

        def keep(row: dict[str, Any]) -> bool:
            k = row["key"]
            if any(key.get(n) and k.get(n) != key[n] for n in ("id", "fromMe", "remoteJid", "participant")):
                return False
            if any(where.get(n) is not None and row.get(n) != where[n] for n in ("id", "source", "messageType")):
                return False
            stamp = where.get("messageTimestamp")
            if isinstance(stamp, dict) and stamp.get("gte") and stamp.get("lte"):
                gte, lte = _when(stamp["gte"]), _when(stamp["lte"])
                if gte is not None and lte is not None:
                    return bool(math.floor(gte) <= row["messageTimestamp"] <= math.floor(lte))
            return True

        found = [r for r in reversed(rows) if keep(r)]
        found.sort(key=lambda r: r["messageTimestamp"], reverse=True)  # stable: newest first
        offset, page = _positive(body.get("offset"), 50), _positive(body.get("page"), 1)
        skip = offset * (0 if page == 1 else page - 1)
        return JSONResponse(
            {
                "messages": {
                    "total": len(found),
                    "pages": math.ceil(len(found) / offset),
                    "currentPage": page,
                    "records": found[skip : skip + offset],
                }
            }
        )

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/chat/findMessages/{instance}", self.find_messages, methods=["POST"]),
                Route("/chat/getBase64FromMediaMessage/{instance}", self.get_base64, methods=["POST"]),
                Route("/message/sendText/{instance}", self.send_text, methods=["POST"]),
                Route("/chat/sendPresence/{instance}", self.send_presence, methods=["POST"]),
            ]
        )


@contextlib.asynccontextmanager
async def run_fake_evolution(keep_bodies: bool = True, port: int = 0) -> AsyncIterator[FakeEvolution]:
    fake = FakeEvolution(keep_bodies=keep_bodies)
    async with background_server(quiet_server(fake.app(), port=port)) as url:
        fake.url = url
        yield fake
