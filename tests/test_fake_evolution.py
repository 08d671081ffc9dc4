"""The fake Evolution API answers as the real one (2.3.6) does: the bodies and codes in
tests/fixtures/evolution (see SOURCES.md there), so what passes against the fake is what
the daemon will meet in production."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.testing import fake_evolution
from daemon.testing.fake_evolution import FakeEvolution, create_jid, run_fake_evolution, slices

FIXTURES = Path(__file__).with_name("fixtures") / "evolution"
INSTANCE = "loja-principal"
PHONE = "5511987650002"
LID = "187654321098765@lid"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / f"{name}.json").read_text())


async def send(
    http: httpx.AsyncClient, number: Any = PHONE, text: Any = "oi", *, instance: str = INSTANCE, **kw: Any
) -> httpx.Response:
    return await http.post(f"/message/sendText/{instance}", json={"number": number, "text": text}, **kw)


async def presence(http: httpx.AsyncClient, delay: int, number: str = PHONE) -> httpx.Response:
    return await http.post(
        f"/chat/sendPresence/{INSTANCE}", json={"number": number, "presence": "composing", "delay": delay}
    )


async def find(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    resp = await http.post(f"/chat/findMessages/{INSTANCE}", json=body)
    assert resp.status_code == 200
    found: dict[str, Any] = resp.json()
    return found


def validation(*messages: str) -> dict[str, Any]:
    """A schema refusal: the message list is BadRequestException's one argument."""
    return {"status": 400, "error": "Bad Request", "response": {"message": [list(messages)]}}


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# --- sendText --------------------------------------------------------------------------


async def test_send_text_answers_201_with_the_prepared_message() -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        resp = await send(http, PHONE, "Olá Mariana!", headers={"apikey": "k"})
    assert resp.status_code == 201
    body, real = resp.json(), fixture("send_text_201")
    assert list(body) == list(real)  # same keys, same order
    assert list(body["contextInfo"]) == list(real["contextInfo"])
    assert body["key"]["remoteJid"] == f"{PHONE}@s.whatsapp.net" and body["key"]["fromMe"] is True
    assert re.fullmatch(r"3EB0[0-9A-F]{18}", body["key"]["id"])
    assert (body["pushName"], body["status"], body["messageType"], body["source"]) == (
        "Você",
        "PENDING",
        "conversation",
        "web",
    )
    assert body["message"] == {"conversation": "Olá Mariana!"} and abs(body["messageTimestamp"] - time.time()) < 5
    [sent] = fake.sent
    assert sent["id"] == body["key"]["id"] and sent["jid"] == body["key"]["remoteJid"]
    assert {k: sent[k] for k in ("instance", "apikey", "number", "text")} == {
        "instance": INSTANCE,
        "apikey": "k",
        "number": PHONE,
        "text": "Olá Mariana!",
    }
    assert fake.deliveries(PHONE) == ["Olá Mariana!"] and fake.arrivals[PHONE]


async def test_ids_are_unique_and_a_lid_number_is_kept_as_the_jid() -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        a, b = await send(http, LID), await send(http, LID)
    assert a.json()["key"]["remoteJid"] == LID and a.json()["key"]["id"] != b.json()["key"]["id"]
    assert fake.deliveries(LID) == ["oi", "oi"] and fake.deliveries(PHONE) == []


def test_numbers_become_jids_as_create_jid_does() -> None:
    assert create_jid("5511987650002") == "5511987650002@s.whatsapp.net"
    assert create_jid("+55 (11) 98765-0002") == "5511987650002@s.whatsapp.net"
    assert create_jid("5511987650002@s.whatsapp.net") == "5511987650002@s.whatsapp.net"
    assert create_jid(LID) == LID
    # BR mobiles: the 9th digit goes when DDD >= 31 and the digit after it is >= 7.
    assert create_jid("5531987650002") == "553187650002@s.whatsapp.net"
    assert create_jid("5562993210505") == "556293210505@s.whatsapp.net"
    assert create_jid("5562923210505") == "5562923210505@s.whatsapp.net"
    assert create_jid("5215512345678") == "525512345678@s.whatsapp.net"  # MX
    assert create_jid("120363025246125486") == "120363025246125486@g.us"


@pytest.mark.parametrize(
    ("body", "messages"),
    [
        ({"number": PHONE}, ['instance requires property "text"']),
        ({}, ['instance requires property "number"', 'instance requires property "text"']),
        ({"number": 5511987650002, "text": "oi"}, ["Invalid format"]),
        ({"number": PHONE, "text": None}, ["text is not of a type(s) string"]),
        ({"number": PHONE, "text": "oi", "delay": 1.5}, ["Enter a value in milliseconds"]),
    ],
)
async def test_send_text_refuses_what_its_schema_refuses(body: dict[str, Any], messages: list[str]) -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        resp = await http.post(f"/message/sendText/{INSTANCE}", json=body)
    assert (resp.status_code, resp.json()) == (400, validation(*messages))
    assert fake.sent == []


async def test_empty_text_is_refused() -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        resp = await send(http, PHONE, "  ")
    assert (resp.status_code, resp.json()) == (
        400,
        {"status": 400, "error": "Bad Request", "response": {"message": ["Text is required"]}},
    )


# --- guards ----------------------------------------------------------------------------


async def test_a_wrong_apikey_is_401_and_an_unknown_instance_404_first() -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        fake.api_key, fake.instance = "secret", INSTANCE
        no_key = await send(http)
        bad_key = await send(http, headers={"apikey": "other"})
        elsewhere = await send(http, instance="loja-inexistente", headers={"apikey": "other"})
        presenced = await presence(http, 0)
        good = await send(http, headers={"apikey": "secret"})
    assert (no_key.status_code, no_key.json()) == (401, fixture("unauthorized_401"))
    assert (bad_key.status_code, bad_key.json()) == (401, fixture("unauthorized_401"))
    assert (elsewhere.status_code, elsewhere.json()) == (404, fixture("instance_not_found_404"))
    assert presenced.status_code == 401
    assert good.status_code == 201 and fake.deliveries(PHONE) == ["oi"]


# --- failures the real server answers ----------------------------------------------------


async def test_a_number_not_on_whatsapp_is_400_exists_false() -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        fake.unknown_numbers.add("5511912340000")
        resp = await send(http, "5511912340000")
    assert (resp.status_code, resp.json()) == (400, fixture("send_text_400_exists_false"))
    assert fake.sent == [] and not fake.arrivals["5511912340000"]


@pytest.mark.parametrize(
    ("error", "name"),
    [
        ("Connection Closed", "send_text_400_connection_closed"),
        ("Timed Out", "send_text_400_timed_out"),
        ("rate-overlimit", "send_text_400_rate_overlimit"),
    ],
)
async def test_transient_failures_are_400_and_deliver_nothing(error: str, name: str) -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        fake.transient_until, fake.transient_error = time.time() + 0.5, error
        first, second = await send(http), await send(http)
        await asyncio.sleep(0.6)
        later = await send(http)
    assert [r.status_code for r in (first, second, later)] == [400, 400, 201]
    assert first.json() == second.json() == fixture(name)
    assert fake.transient_answers == 2 and fake.deliveries(PHONE) == ["oi"]


async def test_queued_answers_have_real_bodies() -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        fake.answers.extend([400, 500, 503, (418, {"custom": True})])
        got = [await send(http) for _ in range(5)]
    assert [r.status_code for r in got] == [400, 500, 503, 418, 201]
    assert got[0].json() == fixture("send_text_400_connection_closed")
    assert got[1].json() == fixture("send_text_500_connection_closed")
    assert got[2].json() == {
        "status": 503,
        "error": "Service Unavailable",
        "response": {"message": ["Service Unavailable"]},
    }
    assert got[3].json() == {"custom": True}
    assert fake.answers == [] and fake.deliveries(PHONE) == ["oi"]


async def test_fault_injection_keeps_its_semantics() -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        fake.failing_status, fake.failing_until = 503, time.time() + 5
        failed = await send(http)
        fake.failing_status, fake.stall = 0, 0.2
        started = time.monotonic()
        stalled = await send(http)
        took = time.monotonic() - started
        fake.failing_until = 0.0
        ok = await send(http)
    assert failed.status_code == 503 and failed.json()["response"] == {"message": ["Service Unavailable"]}
    assert stalled.status_code == 504 and stalled.json()["error"] == "Gateway Timeout" and took >= 0.2
    assert ok.status_code == 201 and fake.deliveries(PHONE) == ["oi"]


# --- a send whose outcome the caller cannot know -----------------------------------------


@pytest.mark.parametrize("stores", [True, False])
async def test_deliver_then_stall_delivers_before_the_caller_times_out(stores: bool) -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        fake.stores_messages = stores
        fake.late_until, fake.deliver_then_stall = time.time() + 5, 2.0
        with pytest.raises(httpx.ReadTimeout):
            await send(http, PHONE, "sua proposta", timeout=0.3)
        assert fake.deliveries(PHONE) == ["sua proposta"]  # it went out all the same
        found = await find(http, {"where": {"key": {"remoteJid": f"{PHONE}@s.whatsapp.net", "fromMe": True}}})
        fake.late_until = 0.0
        assert (await send(http, PHONE, "depois", timeout=0.3)).status_code == 201
    if stores:
        [record] = found["messages"]["records"]
        assert record["message"] == {"conversation": "sua proposta"} and record["key"]["id"] == fake.sent[0]["id"]
    else:
        assert found == fixture("find_messages_empty")


# --- sendPresence ------------------------------------------------------------------------


async def test_presence_is_held_for_its_delay() -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        started = time.monotonic()
        task = asyncio.create_task(presence(http, 300))
        await until(lambda: fake.presence_open(PHONE))
        resp = await task
        took = time.monotonic() - started
    assert (resp.status_code, resp.json()) == (201, fixture("send_presence_201"))
    assert took >= 0.3
    [record] = fake.presences
    assert (record["number"], record["presence"], record["delay"], record["disconnected"]) == (
        PHONE,
        "composing",
        300,
        False,
    )
    assert record["ended"] - record["at"] >= 0.3 and len(record["composing_at"]) == 1
    assert fake.presence_open(PHONE) == []


async def test_a_client_that_gives_up_on_a_presence_is_recorded_as_disconnected() -> None:
    async with run_fake_evolution() as fake:
        async with httpx.AsyncClient(base_url=fake.url) as http:
            task = asyncio.create_task(presence(http, 30000))
            await until(lambda: fake.presence_open(PHONE))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await until(lambda: not fake.presence_open(PHONE))
    [record] = fake.presences
    assert record["disconnected"] is True and record["ended"] - record["at"] < 5
    assert record["typing_until"] - record["at"] == pytest.approx(30.0)  # the real server types on


async def test_long_presences_re_send_composing_every_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert slices(45000) == [20.0, 20.0, 5.0] and slices(40000) == [20.0, 20.0] and slices(20000) == [20.0]
    monkeypatch.setattr(fake_evolution, "PRESENCE_SLICE", 0.05)  # 50 ms slices, to run it now
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        resp = await presence(http, 120)
    assert resp.status_code == 201
    [record] = fake.presences
    assert len(record["composing_at"]) == 3  # 50 + 50 + 20 ms


@pytest.mark.parametrize(
    ("body", "messages"),
    [
        ({"number": PHONE, "presence": "composing"}, ['instance requires property "delay"']),
        (
            {"number": PHONE, "presence": "typing", "delay": 1},
            ["presence is not one of enum values: unavailable,available,composing,recording,paused"],
        ),
        ({"number": PHONE, "presence": "composing", "delay": "1"}, ["delay is not of a type(s) number"]),
        (
            {},
            [
                'instance requires property "number"',
                'instance requires property "presence"',
                'instance requires property "delay"',
            ],
        ),
    ],
)
async def test_presence_refuses_what_its_schema_refuses(body: dict[str, Any], messages: list[str]) -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        resp = await http.post(f"/chat/sendPresence/{INSTANCE}", json=body)
    assert (resp.status_code, resp.json()) == (400, validation(*messages))
    assert fake.presences == []


# --- findMessages ----------------------------------------------------------------------


async def test_find_messages_filters_as_the_real_query_does() -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        for text in ("um", "dois", "três"):
            await send(http, PHONE, text)
        await send(http, LID, "lid")
        phone_jid = f"{PHONE}@s.whatsapp.net"
        by_jid = await find(http, {"where": {"key": {"remoteJid": phone_jid}}})
        not_mine = await find(http, {"where": {"key": {"remoteJid": phone_jid, "fromMe": False}}})
        by_id = await find(http, {"where": {"key": {"id": fake.sent[1]["id"]}}})
        page2 = await find(http, {"where": {"key": {"remoteJid": phone_jid}}, "offset": 2, "page": 2})
        lid_by_phone = await find(http, {"where": {"key": {"remoteJid": "187654321098765@s.whatsapp.net"}}})
        everything = await find(http, {})
        empty = await http.post(f"/chat/findMessages/{INSTANCE}", json={"where": {"key": {"remoteJid": ""}}})
    messages = by_jid["messages"]
    assert (messages["total"], messages["pages"], messages["currentPage"]) == (3, 1, 1)
    assert {r["message"]["conversation"] for r in messages["records"]} == {"um", "dois", "três"}
    stamps = [r["messageTimestamp"] for r in messages["records"]]
    assert stamps == sorted(stamps, reverse=True)  # newest first
    real = fixture("find_messages_found")["messages"]["records"][0]
    record = messages["records"][0]
    assert list(record) == list(real)
    assert record["pushName"] == "Você" and record["source"] == "web" and record["MessageUpdate"] == []
    assert record["key"]["fromMe"] is True and record["instanceId"] == fake.instance_id
    assert not_mine["messages"]["total"] == 3  # fromMe: false is no filter
    assert [r["message"]["conversation"] for r in by_id["messages"]["records"]] == ["dois"]
    assert (page2["messages"]["total"], page2["messages"]["pages"], page2["messages"]["currentPage"]) == (3, 2, 2)
    assert len(page2["messages"]["records"]) == 1
    assert lid_by_phone == {"messages": {"total": 0, "pages": 0, "currentPage": 1, "records": []}}
    assert everything["messages"]["total"] == 4
    assert (empty.status_code, empty.json()) == (400, validation("The property cannot be empty"))


async def test_without_message_storage_nothing_is_found() -> None:
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        fake.stores_messages = False
        await send(http)
        found = await find(http, {"where": {"key": {"remoteJid": f"{PHONE}@s.whatsapp.net", "fromMe": True}}})
    assert found == fixture("find_messages_empty") and fake.deliveries(PHONE) == ["oi"]


# --- getBase64FromMediaMessage ---------------------------------------------------------


async def test_media_by_key_needs_message_storage() -> None:
    real = fixture("get_base64_from_media_201")
    async with run_fake_evolution() as fake, httpx.AsyncClient(base_url=fake.url) as http:
        fake.media["3A9B8C7D6E5F4A3B2C1D"] = (real["base64"], "image/jpeg")
        url = f"/chat/getBase64FromMediaMessage/{INSTANCE}"
        key = {"key": {"id": "3A9B8C7D6E5F4A3B2C1D"}}
        key_only = {"message": key, "convertToMp4": False}
        stored = await http.post(url, json=key_only)
        missing = await http.post(url, json={"message": {"key": {"id": "NOPE"}}})
        fake.stores_messages = False
        not_stored = await http.post(url, json=key_only)
        whole = await http.post(url, json={"message": {**key, "message": {"imageMessage": {}}}})
    assert stored.status_code == 201 and whole.status_code == 201
    body = stored.json()
    assert set(body) <= set(real) and body["size"] == {"fileLength": real["size"]["fileLength"]}
    assert (body["mediaType"], body["fileName"], body["mimetype"], body["base64"], body["buffer"]) == (
        "imageMessage",
        "3A9B8C7D6E5F4A3B2C1D.jpeg",
        "image/jpeg",
        real["base64"],
        None,
    )
    not_found = {"status": 400, "error": "Bad Request", "response": {"message": ["Message not found"]}}
    assert (missing.status_code, missing.json()) == (400, not_found)
    assert (not_stored.status_code, not_stored.json()) == (400, not_found)
    assert len(fake.media_requests) == 4


# --- benches ---------------------------------------------------------------------------


async def test_without_bodies_only_arrivals_are_kept() -> None:
    async with run_fake_evolution(keep_bodies=False) as fake, httpx.AsyncClient(base_url=fake.url) as http:
        assert (await send(http)).status_code == 201
        assert await fake.wait_replies(PHONE, 1, time.time() - 5, timeout=1) is not None
    assert fake.sent == [] and fake.stored == [] and isinstance(fake, FakeEvolution)
