"""Evolution API 2.3 as it really is, on the embedded stack: webhook bodies shaped exactly
as its source builds them (tests/fixtures/evolution, SOURCES.md says from where), and the
fake Evolution API answering with the real bodies, codes and delays."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from daemon import migrations
from daemon.embedded import Endpoints
from daemon.evolution import Edit, Ignored, Inbound, Typing, classify, parse_event
from daemon.identity import jid
from daemon.models import Takeover
from tests.helpers import fetch, make_config, metric, run_daemon, run_fake_evolution, wait_for

FIXTURES = Path(__file__).with_name("fixtures") / "evolution"
PHONE = "5511987650002"
LID = "187654321098765@lid"
_ids = iter(range(10**6))


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def upsert(text: str, *, remote: str, alt: str | None = None, mode: str = "lid") -> dict[str, Any]:
    """A text `messages.upsert` built on the real LID fixture, with a fresh id."""
    body = fixture("messages_upsert_lid_with_alt")
    key = body["data"]["key"]
    key.update(remoteJid=remote, addressingMode=mode, id=f"3EB0{next(_ids):018X}")
    if alt is None:
        key.pop("remoteJidAlt", None)
    else:
        key["remoteJidAlt"] = alt
    body["data"]["message"] = {"conversation": text}
    body["data"]["messageTimestamp"] = int(time.time())
    return body


async def post(url: str, body: dict[str, Any], path: str = "/webhook/evolution", **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url) as http:
        return await http.post(path, json=body, headers=headers)


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(base_url=url) as http:
        return (await http.get("/metrics")).text


# --- parsing the real shapes ------------------------------------------------------------


def test_every_real_webhook_shape_is_read_as_the_source_means_it() -> None:
    def parsed(name: str) -> Any:
        return parse_event(json.dumps(fixture(name)).encode())

    pn = parsed("messages_upsert_pn")
    assert isinstance(pn, Inbound) and pn.phone.isdigit() and pn.lid is None
    with_alt = parsed("messages_upsert_lid_with_alt")
    assert isinstance(with_alt, Inbound) and (with_alt.phone, with_alt.lid) == (PHONE, LID)
    no_alt = parsed("messages_upsert_lid_no_alt")
    assert isinstance(no_alt, Inbound) and no_alt.phone == no_alt.lid and no_alt.phone.endswith("@lid")
    pn_lid_alt = parsed("messages_upsert_pn_lid_alt")  # phone-addressed, the LID in remoteJidAlt
    assert isinstance(pn_lid_alt, Inbound) and pn_lid_alt.phone.isdigit() and pn_lid_alt.lid.endswith("@lid")
    image = parsed("messages_upsert_image_long_filelength")  # fileLength as a protobuf Long
    assert isinstance(image, Inbound) and image.kind == "image" and isinstance(image.media["fileLength"], int)
    assert image.media["fileLength"] > 0 and image.media["base64"]
    assert isinstance(parsed("messages_upsert_audio"), Inbound)
    assert isinstance(parsed("messages_upsert_extended_text"), Inbound)
    # A person on the business's phone wrote to the lead: the bot steps back (issue #17).
    from_me = parsed("messages_upsert_from_me")
    assert isinstance(from_me, Takeover) and from_me.phone == "5511987650002"
    assert from_me.body.startswith("Oi Mariana") and from_me.provider_id == "8D41F0A2B3C4D5E6F708192A3B4C5D6E"
    assert parsed("messages_upsert_group") == Ignored("group")
    assert parsed("messages_upsert_reaction") == Ignored("no_content")
    assert parsed("send_message") == Ignored("own_send")  # our own API send
    edit = parsed("messages_edited")
    assert isinstance(edit, Edit) and edit.text.startswith("Vocês aceitam")
    assert edit.provider_id == fixture("messages_edited")["data"]["key"]["id"]
    typing = parsed("presence_update_composing")
    assert isinstance(typing, Typing)
    assert parsed("presence_update_paused") == Typing(typing.phone, typing.lid, "paused")  # Baileys says "available"


def test_long_numbers_are_read_whole() -> None:
    body = fixture("messages_upsert_image_long_filelength")
    part = body["data"]["message"]["imageMessage"]
    part["fileLength"] = {"low": -1294967296, "high": 1, "unsigned": True}  # 2^32 + 3,000,000,000
    event = parse_event(json.dumps(body).encode())
    assert isinstance(event, Inbound) and event.media["fileLength"] == 2**32 + 3_000_000_000


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("send_text_400_exists_false", "unreachable"),
        ("send_text_400_connection_closed", "transient"),
        ("send_text_400_timed_out", "transient"),
        ("send_text_400_rate_overlimit", "transient"),
        ("send_text_500_connection_closed", "transient"),
        ("unauthorized_401", "refused"),
        ("instance_not_found_404", "refused"),
    ],
)
def test_send_answers_are_classified_from_the_real_bodies(name: str, kind: str) -> None:
    body = fixture(name)
    assert classify(body["status"], json.dumps(body)) == kind


def test_numbers_become_jids_as_evolution_makes_them() -> None:
    assert jid(LID) == LID
    assert jid("5511987650002") == "5511987650002@s.whatsapp.net"  # area code 11 keeps its 9
    assert jid("5562993210505") == "556293210505@s.whatsapp.net"  # area code 62, then 9: dropped


# --- on the embedded stack -------------------------------------------------------------


async def test_a_lid_lead_is_answered_at_its_phone_or_else_at_its_lid(clean: Endpoints) -> None:
    async with run_fake_evolution() as evo:
        cfg = make_config(clean, SDR_EVOLUTION_BASE_URL=evo.url)
        async with run_daemon(cfg) as d:
            assert (
                await post(d.url, upsert("Oi, quero saber de energia solar", remote=LID, alt=f"{PHONE}@s.whatsapp.net"))
            ).status_code == 200
            other = "287654321098765@lid"
            assert (await post(d.url, upsert("Oi, quanto custa?", remote=other))).status_code == 200
            await wait_for(lambda: asyncio.sleep(0, len(evo.sent) >= 2))
    numbers = sorted(s["number"] for s in evo.sent)
    assert numbers == sorted([PHONE, other])  # never the LID's digits as a phone
    assert {s["jid"] for s in evo.sent} == {f"{PHONE}@s.whatsapp.net", other}
    leads = await fetch(clean.database_url, "SELECT phone_number, lid FROM leads ORDER BY phone_number")
    assert [(r["phone_number"], r["lid"]) for r in leads] == sorted(
        [(PHONE, LID), (other, None)]
    )  # a LID-only lead is its LID


async def test_a_lead_who_moves_from_lid_to_phone_keeps_one_history(clean: Endpoints) -> None:
    async with run_fake_evolution() as evo:
        cfg = make_config(clean, SDR_EVOLUTION_BASE_URL=evo.url)
        async with run_daemon(cfg) as d:
            # 1. Known by its LID only: answered at the LID.
            await post(d.url, upsert("Oi, boa tarde", remote=LID))
            await wait_for(lambda: asyncio.sleep(0, len(evo.sent) >= 1))
            # 2. A message that carries both: the pair is learned, the lead becomes the phone's.
            await post(d.url, upsert("Meu nome é Mariana", remote=LID, alt=f"{PHONE}@s.whatsapp.net"))
            await wait_for(lambda: asyncio.sleep(0, len(evo.sent) >= 2))
            # 3. Phone-addressed, and LID-only again: both the same lead.
            await post(d.url, upsert("Minha conta vem uns 450 reais", remote=f"{PHONE}@s.whatsapp.net", mode="pn"))
            await wait_for(lambda: asyncio.sleep(0, len(evo.sent) >= 3))
            await post(d.url, upsert("É casa", remote=LID))
            await wait_for(lambda: asyncio.sleep(0, len(evo.sent) >= 4))
    assert [s["number"] for s in evo.sent] == [LID, PHONE, PHONE, PHONE]
    [lead] = await fetch(clean.database_url, "SELECT id, phone_number, lid, name, bill_value FROM leads")
    assert (lead["phone_number"], lead["lid"]) == (PHONE, LID)
    assert lead["name"] == "Mariana" and lead["bill_value"] == 450  # one history: the flow went on
    per_lead = await fetch(clean.database_url, "SELECT DISTINCT lead_id FROM messages")
    assert [r["lead_id"] for r in per_lead] == [lead["id"]]


async def test_typing_is_never_asked_past_20s_nor_in_flight_after_the_reply(clean: Endpoints) -> None:
    async with run_fake_evolution() as evo:
        # An agent slow enough to show "typing..." (after 0.1 s) and a budget above 20 s.
        cfg = make_config(
            clean,
            SDR_EVOLUTION_BASE_URL=evo.url,
            SDR_AGENT_BACKEND="simulated",
            SDR_AGENT_SIMULATED_LATENCY="fixed:1.0",
            SDR_FEATURES_TYPING_AFTER="0.1",
            SDR_TIMEOUTS_AGENT="45",
        )
        async with run_daemon(cfg) as d:
            await post(d.url, upsert("Oi, quanto custa?", remote=f"{PHONE}@s.whatsapp.net", mode="pn"))
            await wait_for(lambda: asyncio.sleep(0, len(evo.sent) >= 1))
            reply_at = evo.sent[0]["at"]
            await asyncio.sleep(0.2)
        assert evo.presences, "the slow turn showed typing"
        assert all(p["delay"] <= 20_000 for p in evo.presences)
        # Every request had ended (answered, or dropped by the daemon) when the reply came.
        assert all(p["ended"] is not None and p["ended"] <= reply_at for p in evo.presences), evo.presences
        assert evo.presence_open(PHONE) == []


async def test_eight_seconds_of_connection_closed_lose_no_reply(clean: Endpoints) -> None:
    phones = [f"55119876500{i:02d}" for i in range(5)]
    async with run_fake_evolution() as evo:
        evo.transient_until = time.time() + 8.0  # WhatsApp reconnecting: 400 "Connection Closed"
        cfg = make_config(
            clean,
            SDR_EVOLUTION_BASE_URL=evo.url,
            SDR_LIMITS_REDELIVER_INTERVAL="0.5",
            SDR_LIMITS_REDELIVER_BACKOFF="0.5",
        )
        async with run_daemon(cfg) as d:
            for phone in phones:
                await post(d.url, upsert("Oi, quero um orçamento", remote=f"{phone}@s.whatsapp.net", mode="pn"))

            async def delivered() -> bool:
                return all(evo.deliveries(p) for p in phones)

            await wait_for(delivered, timeout=40)
            metrics = await scrape(d.url)
    assert evo.transient_answers > 0
    assert all(len(evo.deliveries(p)) == 1 for p in phones)  # each reply once
    rows = await fetch(clean.database_url, "SELECT status FROM outbox")
    assert {r["status"] for r in rows} == {"sent"}
    assert metric(metrics, "sdr_send_errors_total", kind="transient") > 0


@pytest.mark.parametrize(
    ("history", "policy", "deliveries"),
    [
        (True, "resend", 1),  # the history shows it arrived: not sent again
        (False, "skip", 1),  # no history: the policy keeps it from going twice
        (False, "resend", 2),  # no history: the policy chose a possible duplicate over a silence
    ],
)
async def test_a_send_delivered_but_timed_out_is_settled_before_any_resend(
    clean: Endpoints, history: bool, policy: str, deliveries: int
) -> None:
    async with run_fake_evolution() as evo:
        evo.stores_messages = history
        evo.deliver_then_stall, evo.late_until = 2.0, time.time() + 60  # delivered, answered late
        cfg = make_config(
            clean,
            SDR_EVOLUTION_BASE_URL=evo.url,
            SDR_TIMEOUTS_EVOLUTION_SEND="0.5",
            SDR_LIMITS_REDELIVER_INTERVAL="0.2",
            SDR_LIMITS_REDELIVER_BACKOFF="0",
            SDR_EVOLUTION_ON_UNCERTAIN_SEND=policy,
        )
        async with run_daemon(cfg) as d:
            await post(d.url, upsert("Oi, quanto custa?", remote=f"{PHONE}@s.whatsapp.net", mode="pn"))
            await wait_for(lambda: asyncio.sleep(0, evo.deliveries(PHONE)))
            evo.late_until = 0  # only that first send is answered late

            async def settled() -> list[Any]:
                rows = await fetch(clean.database_url, "SELECT status FROM outbox")
                return [r for r in rows if r["status"] in ("sent", "failed")]

            [row] = await wait_for(settled, timeout=20)
            metrics = await scrape(d.url)
    assert len(evo.deliveries(PHONE)) == deliveries
    assert row["status"] == ("failed" if policy == "skip" and not history else "sent")
    expected = "arrived" if history else policy
    assert metric(metrics, "sdr_uncertain_sends_total", outcome=expected) == 1


async def test_a_number_not_on_whatsapp_is_final_and_marks_the_lead(clean: Endpoints) -> None:
    async with run_fake_evolution() as evo:
        evo.unknown_numbers.add(PHONE)
        cfg = make_config(clean, SDR_EVOLUTION_BASE_URL=evo.url, SDR_LIMITS_REDELIVER_INTERVAL="0.1")
        async with run_daemon(cfg) as d:
            await post(d.url, upsert("Oi", remote=f"{PHONE}@s.whatsapp.net", mode="pn"))
            await wait_for(lambda: fetch(clean.database_url, "SELECT 1 FROM leads WHERE unreachable_at IS NOT NULL"))
            await asyncio.sleep(0.3)  # a re-delivery pass or two: nothing is tried again
            metrics = await scrape(d.url)
    [row] = await fetch(clean.database_url, "SELECT status, attempts FROM outbox")
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert metric(metrics, "sdr_send_errors_total", kind="unreachable") == 1


async def test_global_webhooks_are_accepted_by_the_body_apikey_or_a_path_token(clean: Endpoints) -> None:
    cfg = make_config(clean, SDRCTL_WEBHOOK_TOKEN="s3cret-token", EVOLUTION_INSTANCE_TOKEN="C5A1E8D2-INSTANCE")
    async with run_daemon(cfg) as d:
        body = upsert("Oi", remote=f"{PHONE}@s.whatsapp.net", mode="pn")
        body["apikey"] = "C5A1E8D2-INSTANCE"
        assert (await post(d.url, body)).status_code == 200  # no header: the global webhook
        wrong = upsert("Oi", remote=f"{PHONE}@s.whatsapp.net", mode="pn")
        wrong["apikey"] = "someone-else"
        refused = await post(d.url, wrong)
        assert refused.status_code == 401 and "credentials" in refused.json()["error"]
        assert (await post(d.url, upsert("a", remote=f"{PHONE}@s.whatsapp.net"))).status_code == 401
        # The token as a path segment, with or without the per-event suffix.
        by_path = upsert("b", remote=f"{PHONE}@s.whatsapp.net", mode="pn")
        assert (await post(d.url, by_path, "/webhook/evolution/s3cret-token")).status_code == 200
        by_event = upsert("c", remote=f"{PHONE}@s.whatsapp.net", mode="pn")
        assert (await post(d.url, by_event, "/webhook/evolution/s3cret-token/messages-upsert")).status_code == 200
        assert (await post(d.url, by_event, "/webhook/evolution/wrong-token/messages-upsert")).status_code == 401
        assert (await post(d.url, by_event, "/webhook/evolution/messages-upsert")).status_code == 401
        header = upsert("d", remote=f"{PHONE}@s.whatsapp.net", mode="pn")
        assert (await post(d.url, header, authorization="Bearer s3cret-token")).status_code == 200
    stored = await fetch(clean.database_url, "SELECT body FROM messages WHERE direction = 'in' ORDER BY id")
    assert [r["body"] for r in stored][:1] == ["Oi"] and len(stored) == 4


def edit_of(original: dict[str, Any], text: str) -> dict[str, Any]:
    body = fixture("messages_edited")
    body["data"]["key"]["id"] = original["data"]["key"]["id"]
    body["data"]["editedMessage"] = {"conversation": text}
    body["data"]["timestampMs"] = str(int(time.time() * 1000))
    return body


async def test_an_edit_in_the_window_changes_the_burst_and_a_later_one_is_a_correction(clean: Endpoints) -> None:
    async with run_fake_evolution() as evo:
        cfg = make_config(
            clean,
            SDR_EVOLUTION_BASE_URL=evo.url,
            SDR_BUFFER_QUIET_WINDOW="0.5",
            SDR_BUFFER_MIN_WINDOW="0.5",
            SDR_BUFFER_EXTENDED_WINDOW="0.5",
        )
        async with run_daemon(cfg) as d:
            await post(d.url, upsert("Oi", remote=f"{PHONE}@s.whatsapp.net", mode="pn"))
            await wait_for(lambda: asyncio.sleep(0, len(evo.sent) >= 1))  # asks the lead's name
            typo = upsert("Maraina", remote=f"{PHONE}@s.whatsapp.net", mode="pn")
            await post(d.url, typo)
            answer = await post(d.url, edit_of(typo, "Mariana"))  # within the window
            assert answer.json() == {"status": "edit", "edit": "replaced"}
            await wait_for(lambda: asyncio.sleep(0, len(evo.sent) >= 2))
            [lead] = await fetch(clean.database_url, "SELECT name FROM leads")
            assert lead["name"] == "Mariana"
            turns_before = len(await fetch(clean.database_url, "SELECT id FROM turns"))
            # Edited after its turn: stored as a message of its own, answered by a new turn.
            correction = edit_of(typo, "Mariana Souza")
            late = await post(d.url, correction)
            assert late.json() == {"status": "edit", "edit": "correction"}
            await wait_for(
                lambda: fetch(clean.database_url, "SELECT 1 FROM messages WHERE kind = 'edit' AND turn_id IS NOT NULL")
            )
            again = await post(d.url, correction)  # Evolution's retry of the same webhook
            assert again.json()["edit"] == "duplicate"
            unknown = await post(d.url, fixture("messages_edited"))  # a message we never saw
            assert unknown.json()["edit"] == "unknown"
    assert len(await fetch(clean.database_url, "SELECT id FROM turns")) == turns_before + 1


async def test_the_migration_moves_leads_stored_under_a_lids_digits(endpoints: Endpoints) -> None:
    """Before 0007, `_phone()` took a LID's 15 digits for a phone: such leads (known from
    a media key's jid, or from Evolution's exists:false) become their @lid identity."""
    name = f"lid_{int(time.time() * 1000) % 10**9}"
    admin = await asyncpg.connect(endpoints.database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    url = endpoints.database_url.replace("/sdr?", f"/{name}?")
    conn = await asyncpg.connect(url)
    try:
        await migrations.migrate(conn, to=6)
        await conn.execute("""
            INSERT INTO leads (phone_number) VALUES ('187654321098765'), ('287654321098765'), ('5511987650002');
            INSERT INTO conversations (lead_id, phone_number) SELECT id, phone_number FROM leads;
            INSERT INTO messages (conversation_id, lead_id, provider_id, direction, kind, body, media, provider_ts)
            SELECT c.id, c.lead_id, 'M' || c.id, 'in', 'image', '',
                   jsonb_build_object('key', jsonb_build_object('remoteJid', '287654321098765@lid')), now()
              FROM conversations c WHERE c.phone_number = '287654321098765';
            INSERT INTO outbox (lead_id, phone_number, body, status, last_error)
            SELECT id, phone_number, 'Olá!', 'failed',
                   'HTTP 400: {"status":400,"error":"Bad Request","response":{"message":[{"jid":"x","exists":false,"number":"y"}]}}'
              FROM leads WHERE phone_number IN ('187654321098765', '5511987650002');
        """)
        await migrations.migrate(conn)
        leads = await conn.fetch("SELECT phone_number, lid FROM leads ORDER BY phone_number")
        outbox = await conn.fetch("SELECT phone_number, status FROM outbox ORDER BY phone_number")
    finally:
        await conn.close()
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()
    assert [(r["phone_number"], r["lid"]) for r in leads] == [
        ("187654321098765@lid", "187654321098765@lid"),  # by Evolution's exists:false
        ("287654321098765@lid", "287654321098765@lid"),  # by its media key
        ("5511987650002", None),  # a real phone (13 digits) stays
    ]
    assert [(r["phone_number"], r["status"]) for r in outbox] == [
        ("187654321098765@lid", "undelivered"),  # sent again, to the LID this time
        ("5511987650002", "failed"),
    ]
