"""`sdrctl leads` run as a user would, against the real PostgreSQL and Redis: list and show
(statuses, the business time zone, JSON), pause/resume and ignore/unignore (rows, events,
follow-ups, the cached lead), the refusals and their exit codes, and `forget` after a real
conversation leaving nothing of the lead in any table or Redis key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import redis.asyncio as aioredis

from daemon.buffer import DUE, FIRST, PRESENT, TYPING
from daemon.durations import ALLOWED
from daemon.embedded import Endpoints
from daemon.evolution import media_event, presence_event
from daemon.leads import IGNORE_REASON, PAUSE_REASON
from daemon.testing.servers import free_port
from tests.bills import bill_image
from tests.helpers import REPO, child_env, event, fetch, make_config, run_daemon, sdrctl, wait_for

SP = ZoneInfo("America/Sao_Paulo")  # UTC-3 all year since 2019
T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # 09:00 in São Paulo
FAR = datetime(2100, 1, 1, tzinfo=UTC)  # a pause still running whatever today is
PAST = datetime(2000, 1, 1, tzinfo=UTC)  # one long over; also every row's updated_at
MARKUP = "[bold]Bia[/bold]"  # a name rich must print as text, not read as markup
ENV = {"COLUMNS": "200"}  # rich wraps nothing: the tests read whole cells
ANA, BIA, CAIO, DORA, EVA, FABIO = (f"55119000000{i:02d}" for i in range(1, 7))
LID = "187654321098765@lid"


async def run(endpoints: Endpoints, *args: str, **env: str) -> tuple[int, str, str]:
    return await sdrctl(
        "leads",
        *args,
        env={"SDR_DATABASE_URL": endpoints.database_url, "SDR_REDIS_URL": endpoints.redis_url, **ENV, **env},
    )


async def run_with_stdin(endpoints: Endpoints, stdin: int, *args: str) -> tuple[int, str, str]:
    """As `sdrctl()`, with the child's standard input given (a pipe's end, /dev/null, a pty)."""
    env = {"SDR_DATABASE_URL": endpoints.database_url, "SDR_REDIS_URL": endpoints.redis_url, **ENV}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sdrctl",
        "leads",
        *args,
        cwd=REPO,
        env=child_env(**env),
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=240)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def sql(endpoints: Endpoints, query: str, *args: Any) -> list[asyncpg.Record]:
    return await fetch(endpoints.database_url, query, *args)


async def add_lead(endpoints: Endpoints, phone: str, **cols: Any) -> int:
    names = ["phone_number", *cols]
    marks = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    [row] = await sql(
        endpoints, f"INSERT INTO leads ({', '.join(names)}) VALUES ({marks}) RETURNING id", phone, *cols.values()
    )
    return int(row["id"])


async def add_message(
    endpoints: Endpoints, lead_id: int, body: str, at: datetime, direction: str = "in", **cols: Any
) -> int:
    [conv] = await sql(
        endpoints,
        """INSERT INTO conversations (lead_id, phone_number) SELECT id, phone_number FROM leads WHERE id = $1
           ON CONFLICT (lead_id) WHERE status = 'open' DO UPDATE SET status = 'open' RETURNING id""",
        lead_id,
    )
    names = ["conversation_id", "lead_id", "direction", "body", "provider_ts", "received_at", *cols]
    marks = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    [row] = await sql(
        endpoints,
        f"INSERT INTO messages ({', '.join(names)}) VALUES ({marks}) RETURNING id",
        conv["id"],
        lead_id,
        direction,
        body,
        at,
        at,
        *cols.values(),
    )
    return int(row["id"])


async def add_turn(endpoints: Endpoints, lead_id: int, outcome: str, at: datetime) -> int:
    [row] = await sql(
        endpoints,
        """INSERT INTO turns (lead_id, conversation_id, messages_joined, first_message_at, last_message_at,
                              started_at, finished_at, buffer_wait_ms, agent_backend, outcome)
           SELECT $1, id, 1, $3, $3, $3, $3, 0, 'playbook', $2 FROM conversations WHERE lead_id = $1
           RETURNING id""",
        lead_id,
        outcome,
        at,
    )
    return int(row["id"])


async def add_follow_up(endpoints: Endpoints, lead_id: int, status: str, due: datetime, kind: str = "reengage") -> None:
    await sql(
        endpoints,
        "INSERT INTO follow_ups (lead_id, kind, status, due_at, updated_at) VALUES ($1, $2, $3, $4, $5)",
        lead_id,
        kind,
        status,
        due,
        PAST,
    )


def local(when: datetime) -> str:
    return f"{when.astimezone(SP):%Y-%m-%d %H:%M %Z}"


def rows_of(out: str) -> list[list[str]]:
    """A rich table's body rows, cell by cell."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]


# --- list ----------------------------------------------------------------------------------


async def some_leads(endpoints: Endpoints) -> None:
    """Ana active, Bia paused, Caio opted out and unreachable, Dora ignored by the CLI, Eva
    by sdr.toml (SDR_HANDOVER_IGNORE in the tests that run it), Fabio's pause long over."""
    ana = await add_lead(endpoints, ANA, name="Ana", stage="ask_bill")
    bia = await add_lead(endpoints, BIA, push_name=MARKUP, paused_until=FAR, paused_by="cli", paused_at=T0)
    caio = await add_lead(endpoints, CAIO, opted_out_at=T0, unreachable_at=T0)
    await add_lead(endpoints, DORA, ignored=True)
    eva = await add_lead(endpoints, EVA)
    fabio = await add_lead(endpoints, FABIO, paused_until=PAST, paused_by="handoff", paused_at=PAST)
    for lead, hours in ((ana, 5), (bia, 4), (caio, 3), (eva, 2), (fabio, 1)):
        await add_message(endpoints, lead, "older", T0 - timedelta(days=1))
        await add_message(endpoints, lead, "newest", T0 + timedelta(hours=hours))


async def listed(endpoints: Endpoints, *args: str, **env: str) -> list[dict[str, Any]]:
    code, out, err = await run(endpoints, "list", "--json", *args, **env)
    assert code == 0, err
    doc: list[dict[str, Any]] = json.loads(out)
    return doc


async def test_list_shows_each_leads_status_most_recent_message_first(clean: Endpoints) -> None:
    await some_leads(clean)
    code, out, err = await run(clean, "list", SDR_HANDOVER_IGNORE=EVA)
    assert code == 0, err
    assert "6 lead(s), most recent message first" in out and "last message (America/Sao_Paulo)" in out
    assert rows_of(out) == [
        [ANA, "Ana", "ask_bill", local(T0 + timedelta(hours=5)), "active"],
        [BIA, MARKUP, "new", local(T0 + timedelta(hours=4)), f"paused until {local(FAR)}"],
        [CAIO, "", "new", local(T0 + timedelta(hours=3)), "opted out, unreachable"],
        [EVA, "", "new", local(T0 + timedelta(hours=2)), "ignored"],
        [FABIO, "", "new", local(T0 + timedelta(hours=1)), "active"],  # its pause is over
        [DORA, "", "new", "", "ignored"],  # never wrote: last
    ]
    assert local(FAR) == "2099-12-31 21:00 -03"

    doc = await listed(clean, SDR_HANDOVER_IGNORE=EVA)
    assert [(d["phone"], d["status"]) for d in doc] == [
        (ANA, ["active"]),
        (BIA, ["paused"]),
        (CAIO, ["opted-out", "unreachable"]),
        (EVA, ["ignored"]),
        (FABIO, ["active"]),
        (DORA, ["ignored"]),
    ]
    assert doc[1]["paused_until"] == "2099-12-31T21:00:00-03:00" and doc[4]["paused_until"] is None
    assert doc[0]["last_message_at"] == "2026-03-02T14:00:00-03:00"
    # Without sdr.toml's list, Eva is an ordinary lead; the time zone is [followups] timezone.
    utc = await listed(clean, SDR_FOLLOWUPS_TIMEZONE="UTC")
    assert next(d for d in utc if d["phone"] == EVA)["status"] == ["active"]
    assert utc[0]["last_message_at"] == "2026-03-02T17:00:00+00:00"


async def test_list_filters_by_status_and_limits(clean: Endpoints) -> None:
    await some_leads(clean)
    expected = {
        "paused": [BIA],
        "opted-out": [CAIO],
        "unreachable": [CAIO],
        "ignored": [EVA, DORA],
        "active": [ANA, FABIO],
    }
    for status, phones in expected.items():
        doc = await listed(clean, "--status", status, SDR_HANDOVER_IGNORE=EVA)
        assert [d["phone"] for d in doc] == phones, status
    code, out, err = await run(clean, "list", "--status", "paused")
    assert code == 0 and "1 paused lead(s)" in out, err
    code, out, err = await run(clean, "list", "--limit", "2")
    assert code == 0 and [r[0] for r in rows_of(out)] == [ANA, BIA] and "showing the first 2" in err, err
    await sql(clean, "UPDATE leads SET paused_until = NULL")
    code, out, err = await run(clean, "list", "--status", "paused")
    assert code == 0 and "no paused leads" in out, err


# --- show ----------------------------------------------------------------------------------


async def test_show_gives_the_fields_state_last_messages_follow_ups_and_events(clean: Endpoints) -> None:
    lead = await add_lead(
        clean,
        ANA,
        name="Ana",
        push_name="Ana Paula",
        stage="confirm_bill",
        bill_value=487.35,
        lid=LID,
        paused_until=FAR,
        paused_by="handoff",
        paused_at=T0,
        opted_out_at=T0 + timedelta(minutes=5),
    )
    for i in range(5):  # the first two are older than the last 10: not shown
        await add_message(clean, lead, f"old {i}", T0 - timedelta(days=1) + timedelta(minutes=i))
    at = [T0 + timedelta(minutes=i) for i in range(7)]
    await add_message(clean, lead, "Oi", at[0])
    answered = await add_turn(clean, lead, "ok", at[1])
    await sql(clean, "UPDATE messages SET turn_id = $1 WHERE body = 'Oi'", answered)
    await add_message(clean, lead, "Olá! Como posso te chamar?", at[1], "out")
    await add_message(clean, lead, "", at[2], kind="image")
    await add_message(clean, lead, "[red]Ana[/red] aqui", at[2])
    await add_message(clean, lead, "Oi Ana, aqui é o Carlos", at[3], "out", kind="operator")
    await add_message(clean, lead, "quero falar com alguém", at[4])
    silent = await add_turn(clean, lead, "paused", at[5])
    await sql(clean, "UPDATE messages SET turn_id = $1 WHERE body = 'quero falar com alguém'", silent)
    await add_message(clean, lead, "alô?", at[6])
    await add_follow_up(clean, lead, "pending", T0 + timedelta(days=1))
    await add_follow_up(clean, lead, "sent", T0 - timedelta(days=1))
    for kind, actor, minutes in (("handoff", "bot", 4), ("opt_out", "lead", 5)):
        await sql(
            clean,
            "INSERT INTO lead_events (lead_id, kind, actor, at) VALUES ($1, $2, $3, $4)",
            lead,
            kind,
            actor,
            T0 + timedelta(minutes=minutes),
        )

    code, out, err = await run(clean, "show", "+55 (11) 90000-0001")
    assert code == 0, err
    fields = {r[0]: r[1] for r in rows_of(out) if len(r) == 2}
    assert fields["phone"] == ANA and fields["LID"] == LID and fields["name"] == "Ana"
    assert fields["WhatsApp name"] == "Ana Paula" and fields["stage"] == "confirm_bill"
    assert fields["bill (R$)"] == "487.35"
    assert fields["status"] == "opted-out, paused"
    assert fields["paused"] == f"until {local(FAR)}, by handoff, since {local(T0)}"
    assert fields["opted out"] == f"since {local(T0 + timedelta(minutes=5))}" and fields["ignored"] == "no"
    messages = [r for r in rows_of(out) if len(r) == 4]
    assert [r[2] for r in messages[:3]] == ["old 2", "old 3", "old 4"] and len(messages) == 10
    assert messages[3:] == [
        [local(at[0]), "lead", "Oi", "yes"],
        [local(at[1]), "bot", "Olá! Como posso te chamar?", ""],
        [local(at[2]), "lead", "[image]", "no (waiting)"],
        [local(at[2]), "lead", "[red]Ana[/red] aqui", "no (waiting)"],
        [local(at[3]), "operator", "Oi Ana, aqui é o Carlos", ""],
        [local(at[4]), "lead", "quero falar com alguém", "no (paused)"],
        [local(at[6]), "lead", "alô?", "no (waiting)"],
    ]
    assert "last 10 message(s)" in out and "old 0" not in out and "old 1" not in out
    assert "1 pending follow-up(s)" in out
    assert ["reengage", "1", local(T0 + timedelta(days=1))] in rows_of(out)
    assert [local(T0 + timedelta(minutes=5)), "opt_out", "lead"] in rows_of(out)

    code, out, err = await run(clean, "show", LID, "--json")  # the LID finds the lead it was linked to
    assert code == 0, err
    doc = json.loads(out)
    assert doc["lead"]["phone_number"] == ANA and doc["lead"]["bill_value"] == "487.35"
    assert doc["status"] == ["opted-out", "paused"] and doc["ignored"] is None
    assert doc["pause"] == {"until": "2099-12-31T21:00:00-03:00", "by": "handoff", "since": "2026-03-02T09:00:00-03:00"}
    assert doc["opted_out_since"] == "2026-03-02T09:05:00-03:00"
    assert len(doc["messages"]) == 10 and doc["messages"][0]["text"] == "old 2"
    last = doc["messages"][-1]
    assert (last["who"], last["text"], last["answered"], last["why_not"]) == ("lead", "alô?", False, "waiting")
    assert [m["answered"] for m in doc["messages"] if m["who"] != "lead"] == [None, None]
    assert doc["follow_ups"] == [{"kind": "reengage", "step": 1, "due_at": "2026-03-03T09:00:00-03:00"}]
    assert [(e["kind"], e["actor"]) for e in doc["events"]] == [("opt_out", "lead"), ("handoff", "bot")]

    # Ignored through sdr.toml: said so.
    code, out, err = await run(clean, "show", ANA, "--json", SDR_HANDOVER_IGNORE=ANA)
    assert code == 0 and json.loads(out)["ignored"] == "sdr.toml [handover] ignore", err
    code, _, err = await run(clean, "show", "5511999999999")
    assert code == 1 and "no lead with phone 5511999999999" in err and "Traceback" not in err


# --- pause, resume -------------------------------------------------------------------------


async def cached(endpoints: Endpoints, phone: str) -> bool:
    r = aioredis.Redis.from_url(endpoints.redis_url)
    try:
        return bool(await r.exists(f"sdr:cache:lead:{{{phone}}}"))
    finally:
        await r.aclose()


async def cache(endpoints: Endpoints, phone: str) -> None:
    r = aioredis.Redis.from_url(endpoints.redis_url)
    try:
        await r.set(f"sdr:cache:lead:{{{phone}}}", b'{"stage": "new"}')
    finally:
        await r.aclose()


async def events(endpoints: Endpoints) -> list[tuple[int | None, str, str]]:
    return [
        (r["lead_id"], r["kind"], r["actor"]) for r in await sql(endpoints, "SELECT * FROM lead_events ORDER BY id")
    ]


async def follow_up_states(endpoints: Endpoints) -> list[tuple[str, str | None, bool]]:
    """(status, last_error, whether updated_at moved), by id."""
    rows = await sql(endpoints, "SELECT status, last_error, updated_at FROM follow_ups ORDER BY id")
    return [(r["status"], r["last_error"], r["updated_at"] > PAST) for r in rows]


async def test_pause_stops_the_bot_for_a_while_and_resume_brings_it_back(clean: Endpoints) -> None:
    lead = await add_lead(clean, ANA)
    await add_follow_up(clean, lead, "pending", T0)
    await add_follow_up(clean, lead, "executing", T0)  # being sent: never touched
    await add_follow_up(clean, lead, "sent", T0)
    await cache(clean, ANA)

    code, out, err = await run(clean, "pause", "55 11 90000-0001", "--for", "2h")
    assert code == 0, err
    [row] = await sql(clean, "SELECT paused_until, paused_by, paused_at FROM leads")
    assert row["paused_by"] == "cli" and row["paused_until"] - row["paused_at"] == timedelta(hours=2)
    assert f"paused {ANA} until {local(row['paused_until'])} (2h)" in out
    assert "cancelled 1 pending follow-up(s)" in out
    assert await follow_up_states(clean) == [
        ("cancelled", PAUSE_REASON, True),
        ("executing", None, False),
        ("sent", None, False),
    ]
    assert await events(clean) == [(lead, "paused", "cli")]
    assert not await cached(clean, ANA)  # the daemons' copy of the lead is dropped

    # Without --for: the profile's [handover] pause; a pause still running is replaced and said.
    code, out, err = await run(clean, "pause", ANA, SDR_HANDOVER_PAUSE="5400", SDR_FOLLOWUPS_TIMEZONE="UTC")
    assert code == 0, err
    [again] = await sql(clean, "SELECT paused_until, paused_at FROM leads")
    assert again["paused_until"] - again["paused_at"] == timedelta(minutes=90) and "(90m)" in out
    assert f"until {again['paused_until']:%Y-%m-%d %H:%M} UTC" in out
    assert f"(it was paused by cli until {row['paused_until']:%Y-%m-%d %H:%M} UTC)" in out
    assert "cancelled 0 pending follow-up(s)" in out

    await cache(clean, ANA)
    code, out, err = await run(clean, "resume", ANA)
    assert code == 0, err
    assert f"resumed {ANA}: it was paused by cli until {local(again['paused_until'])}" in out
    [row] = await sql(clean, "SELECT paused_until, paused_by, paused_at FROM leads")
    assert tuple(row) == (None, None, None)
    assert await events(clean) == [(lead, "paused", "cli"), (lead, "paused", "cli"), (lead, "resumed", "cli")]
    assert not await cached(clean, ANA)

    # Nothing to resume: said so, and no event (the report counts real resumes).
    code, out, err = await run(clean, "resume", ANA)
    assert code == 0 and f"{ANA} was not paused; nothing to resume" in out, err
    await sql(clean, "UPDATE leads SET paused_until = $1, paused_by = 'handoff'", PAST)  # a pause long over
    code, out, err = await run(clean, "resume", ANA)
    assert code == 0 and "was not paused" in out, err
    assert len(await events(clean)) == 3
    assert [tuple(r) for r in await sql(clean, "SELECT paused_until, paused_by FROM leads")] == [(None, None)]


async def test_pause_refuses_a_bad_duration_and_an_unknown_lead(clean: Endpoints) -> None:
    for bad in ("2", "2 hours", "-1h", "0m"):
        code, _, err = await run(clean, "pause", ANA, "--for", bad)
        assert code == 2 and f"--for {bad!r}" in err and "Traceback" not in err, err
    code, _, err = await run(clean, "pause", ANA, "--for", "2")
    assert ALLOWED in " ".join(err.split())
    code, _, err = await run(clean, "pause", ANA)
    assert code == 1 and f"no lead with phone {ANA}" in err, err
    code, _, err = await run(clean, "resume", ANA)
    assert code == 1 and f"no lead with phone {ANA}" in err, err


# --- ignore, unignore ----------------------------------------------------------------------


async def test_ignore_creates_or_flags_the_lead_and_unignore_undoes_it(clean: Endpoints) -> None:
    # A number that never wrote: its lead row is created, ignored.
    code, out, err = await run(clean, "ignore", "+55 11 90000-0001")
    assert code == 0, err
    assert f"ignoring {ANA} (it had never written: its lead row was created)" in out
    [row] = await sql(clean, "SELECT id, phone_number, stage, name, ignored FROM leads")
    assert (row["phone_number"], row["stage"], row["name"], row["ignored"]) == (ANA, "new", None, True)
    code, out, err = await run(clean, "ignore", ANA)
    assert code == 0 and f"{ANA} is ignored already" in out, err
    assert await events(clean) == [(row["id"], "ignored", "cli")]

    # A lead with follow-ups: the pending one is cancelled, its cached copy dropped.
    bia = await add_lead(clean, BIA, name="Bia")
    await add_follow_up(clean, bia, "pending", T0)
    await add_follow_up(clean, bia, "pending", T0 + timedelta(days=1), "nurture")
    await cache(clean, BIA)
    code, out, err = await run(clean, "ignore", BIA)
    assert code == 0, err
    assert f"ignoring {BIA}: the bot stores" in out and "cancelled 2 pending follow-up(s)" in out
    assert await follow_up_states(clean) == [("cancelled", IGNORE_REASON, True)] * 2
    assert not await cached(clean, BIA)
    assert [tuple(r) for r in await sql(clean, "SELECT name, ignored FROM leads WHERE id = $1", bia)] == [("Bia", True)]

    code, out, err = await run(clean, "unignore", BIA)
    assert code == 0 and f"{BIA} is no longer ignored" in out, err
    code, out, err = await run(clean, "unignore", BIA)
    assert code == 0 and f"{BIA} was not ignored" in out, err
    assert [r["ignored"] for r in await sql(clean, "SELECT ignored FROM leads ORDER BY id")] == [True, False]
    assert len(await events(clean)) == 2  # unignore has no event kind (sql/0011)

    # A number sdr.toml ignores stays ignored: said so, exit 1.
    code, out, err = await run(clean, "unignore", ANA, SDR_HANDOVER_IGNORE=ANA)
    assert code == 1 and f"{ANA} is no longer ignored" in out, err
    assert "still ignored: it is in sdr.toml's [handover] ignore" in err
    code, _, err = await run(clean, "unignore", CAIO)
    assert code == 1 and f"no lead with phone {CAIO}" in err, err
    # Numbers only: a LID is no phone to ignore.
    code, _, err = await run(clean, "ignore", LID)
    assert code == 2 and "digits only, 10 to 15" in err and "LID" not in err, err


# --- bad phones ----------------------------------------------------------------------------


async def test_a_bad_phone_exits_2_saying_what_is_allowed() -> None:
    cases = [
        ("pause", "12345"),
        ("resume", "5511 9999 00001 2345"),  # 17 digits
        ("ignore", "call me"),
        ("unignore", "5511999990000@s.whatsapp.net"),
        ("show", "abc@lid"),
        ("forget", "55.11.99999.0000"),
    ]
    for command, phone in cases:
        code, _, err = await sdrctl("leads", command, phone, *(["--yes"] if command == "forget" else []))
        assert code == 2, (command, err)
        assert f"PHONE {phone!r}: use digits only, 10 to 15 of them" in err and "e.g. 5511999990000" in err
        assert ("LID jid" in err) == (command in ("pause", "resume", "show", "forget")), (command, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# --- forget --------------------------------------------------------------------------------

PHONE, OTHER = "5511987650001", "5511987650002"
SAID = ["Meu nome é Zuleica Quintanilha", "Quanto custa a instalação no sítio Xeremzinho?"]
WORDS = ["zuleica", "quintanilha", "xeremzinho"]  # in no other lead's row, nor the knowledge base
FAR_TS = FAR.timestamp()


async def post(url: str, *events: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        for e in events:
            resp = await http.post("/webhook/evolution", json=e)
            assert resp.status_code == 200, resp.text


async def replies(endpoints: Endpoints, phone: str, count: int) -> list[str]:
    async def enough() -> list[str] | None:
        rows = await sql(endpoints, "SELECT body FROM outbox WHERE phone_number = $1 ORDER BY id", phone)
        return [r["body"] for r in rows] if len(rows) >= count else None

    return await wait_for(enough, timeout=60)


async def tables(endpoints: Endpoints) -> list[str]:
    rows = await sql(
        endpoints,
        """SELECT table_name FROM information_schema.tables
            WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1""",
    )
    return [r["table_name"] for r in rows]


async def rows_mentioning(endpoints: Endpoints, needles: list[str]) -> list[tuple[str, str]]:
    """(table, row as JSON) of every row, in every table, whose text has one of `needles`."""
    found = []
    for table in await tables(endpoints):
        for r in await sql(endpoints, f'SELECT row_to_json(t)::text AS doc FROM public."{table}" t'):
            if any(n.lower() in r["doc"].lower() for n in needles):
                found.append((table, r["doc"][:200]))
    return found


async def counts(endpoints: Endpoints) -> dict[str, int]:
    return {
        t: (await sql(endpoints, f'SELECT count(*) FROM public."{t}"'))[0]["count"] for t in await tables(endpoints)
    }


async def redis_mentioning(r: aioredis.Redis, needles: list[str]) -> list[str]:
    """Every key whose name, string value or sorted-set member has one of `needles`."""
    found = []
    async for raw in r.scan_iter(count=1000):
        key = raw.decode(errors="replace")
        kind = (await r.type(raw)).decode()
        texts = [key]
        if kind == "string":
            texts.append((await r.get(raw) or b"").decode(errors="replace"))
        elif kind == "zset":
            texts += [m.decode(errors="replace") for m in await r.zrange(raw, 0, -1)]
        found += [f"{key}: {t[:80]}" for t in texts if any(n.lower() in t.lower() for n in needles)]
    return found


async def a_conversation(d: Any, endpoints: Endpoints, bill: bytes) -> tuple[str, str]:
    """The lead says hello, its name, sends a bill photo, asks a question, starts typing;
    another lead says hello. Returns the first reply (the greeting of a lead the bot does not
    know) and the stage it left the lead in. Ends when the last turn has (its lock is free):
    its follow-up planned, its lead cached."""
    await post(d.url, event(PHONE, "Oi"), event(OTHER, "Oi"))
    [greeting] = await replies(endpoints, PHONE, 1)
    [first] = await sql(endpoints, "SELECT stage FROM leads WHERE phone_number = $1", PHONE)
    await replies(endpoints, OTHER, 1)
    await post(d.url, event(PHONE, SAID[0]))
    assert "Zuleica" in (await replies(endpoints, PHONE, 2))[1]
    b64 = base64.b64encode(bill).decode()
    await post(d.url, media_event(PHONE, "image", message_id="PHOTO1", instance="sdr", b64=b64, mimetype="image/jpeg"))
    assert "R$ 512,90" in (await replies(endpoints, PHONE, 3))[2]
    await post(d.url, event(PHONE, SAID[1]))
    await replies(endpoints, PHONE, 4)
    r = aioredis.Redis.from_url(endpoints.redis_url)
    try:
        await wait_for(lambda: _free(r, PHONE))
    finally:
        await r.aclose()
    await post(d.url, presence_event(PHONE, "composing", instance="sdr"))
    return greeting, first["stage"]


async def _free(r: aioredis.Redis, phone: str) -> bool:
    return not await r.exists(f"sdr:lock:{{{phone}}}")


async def test_forget_erases_every_trace_of_a_lead_after_a_real_conversation(clean: Endpoints) -> None:
    bill = bill_image(amount="512,90", kwh=401)
    r = aioredis.Redis.from_url(clean.redis_url)
    try:
        async with run_daemon(make_config(clean, SDR_FOLLOWUPS_ENABLED="false")) as d:
            greeting, greeted_stage = await a_conversation(d, clean, bill)
            [lead] = await sql(clean, "SELECT id, name, bill_value FROM leads WHERE phone_number = $1", PHONE)
            assert lead["name"] == "Zuleica Quintanilha" and lead["bill_value"] == Decimal("512.90")
            await sql(clean, "INSERT INTO lead_events (lead_id, kind, actor) VALUES ($1, 'handoff', 'bot')", lead["id"])
            # Buffer members as a daemon leaves them mid-burst, both forms (the lead; one
            # message without coalescing); the other lead's stays.
            await r.zadd(DUE, {PHONE: FAR_TS, f"{PHONE}|999": FAR_TS, OTHER: FAR_TS})
            await r.zadd(FIRST, {PHONE: time.time(), f"{PHONE}|999": time.time()})
            await r.zadd(TYPING, {PHONE: FAR_TS})
            await r.zadd(PRESENT, {PHONE: time.time()})

            # What there is to erase: rows (a follow-up planned too), and in Redis its fence,
            # cached lead, the photo's analysis (by content hash), its words in the
            # knowledge-search cache.
            assert await sql(clean, "SELECT 1 FROM follow_ups WHERE lead_id = $1 AND status = 'pending'", lead["id"])
            media_key = f"sdr:cache:media:{{{hashlib.sha256(bill).hexdigest()}}}"
            assert await r.exists(media_key, f"sdr:fence:{{{PHONE}}}", f"sdr:cache:lead:{{{PHONE}}}") == 3
            assert [k for k in await redis_mentioning(r, ["xeremzinho"]) if k.startswith("sdr:cache:knowledge:")]
            mentioned = {t for t, _ in await rows_mentioning(clean, [PHONE, *WORDS])}
            assert mentioned == {"leads", "conversations", "messages", "outbox"}
            per_table = {
                t: (await sql(clean, f"SELECT count(*) FROM {t} WHERE lead_id = $1", lead["id"]))[0]["count"]
                for t in ("outbox", "messages", "follow_ups", "turns", "conversations")
            }
            assert per_table["messages"] == 8 and per_table["turns"] == 4  # 4 in, 4 replies
            before, events_before = await counts(clean), await events(clean)

            # No terminal and no --yes: refused, nothing deleted. A terminal answering "n": nothing either.
            code, _, err = await run_with_stdin(clean, asyncio.subprocess.DEVNULL, "forget", PHONE)
            assert code == 2 and "pass --yes to confirm" in err and "Traceback" not in err, err
            primary, secondary = os.openpty()
            try:
                os.write(primary, b"n\n")
                code, out, err = await run_with_stdin(clean, secondary, "forget", PHONE)
            finally:
                os.close(primary)
                os.close(secondary)
            assert code == 1 and f"Erase {PHONE} for good" in out and "nothing was deleted" in out, (out, err)
            assert await counts(clean) == before and await r.exists(media_key)

            code, out, err = await run(clean, "forget", f"+{PHONE}", "--yes")
            assert code == 0, err
            assert f"forgot {PHONE}" in out
            deleted = {row[0]: int(row[1]) for row in rows_of(out)}
            assert deleted == {**per_table, "discarded_replies": 0, "leads": 1}
            assert "lead_events: 1 row(s) kept without the lead" in out
            assert f"sdr:fence:{{{PHONE}}}" in out and f"sdr:cache:lead:{{{PHONE}}}" in out
            assert "6 buffer member(s), 1 cached media analysis(es)" in out, out

            # Nothing of the lead anywhere: no row in any table, no key, value or member in Redis.
            assert await rows_mentioning(clean, [PHONE, *SAID, *WORDS]) == []
            assert await redis_mentioning(r, [PHONE, *WORDS]) == []
            assert not await r.exists(media_key)

            # ...and no daemon keeps a copy in its own memory (the invalidation reached it).
            async def dropped() -> bool:
                return await d.runtime.leads.get(PHONE) is None

            await wait_for(dropped)
            # The counts survive: every event kept, without the lead, and the erasure counted.
            assert await events(clean) == [(None, k, a) for _, k, a in events_before] + [(None, "forgotten", "cli")]
            # The other lead is untouched.
            after = await counts(clean)
            assert after["leads"] == before["leads"] - 1 and await replies(clean, OTHER, 1)
            assert await r.zscore(DUE, OTHER) == FAR_TS and await r.exists(f"sdr:fence:{{{OTHER}}}")

            # Writing again, the lead is a stranger: a new row, no name, greeted as the first time.
            await post(d.url, event(PHONE, "Oi"))
            assert await replies(clean, PHONE, 1) == [greeting]
            [fresh] = await sql(clean, "SELECT id, name, bill_value, stage FROM leads WHERE phone_number = $1", PHONE)
        assert fresh["id"] != lead["id"] and fresh["name"] is None and fresh["bill_value"] is None
        assert fresh["stage"] == greeted_stage != "new"  # from 'new', as the first time
        [n] = await sql(clean, "SELECT count(*) FROM messages WHERE lead_id = $1", fresh["id"])
        assert n["count"] == 2  # its "Oi" and the greeting: no history
    finally:
        await r.aclose()


async def test_forget_a_lid_only_lead_never_under_a_running_turn_and_an_unknown_one(clean: Endpoints) -> None:
    lead = await add_lead(clean, LID)
    await add_message(clean, lead, "só pelo LID", T0)
    r = aioredis.Redis.from_url(clean.redis_url)
    try:
        await r.set(f"sdr:fence:{{{LID}}}", "1")
        await r.set(f"sdr:lock:{{{LID}}}", "a-daemon", px=120_000)  # a turn holds the lead
        code, out, err = await run(clean, "forget", LID, "--yes", SDR_TIMEOUTS_REDIS_LOCK_TTL="0.3")
        assert code == 1 and "still holds the lead after 0.3s; try again" in err, err
        assert "waiting for it" in err and "Traceback" not in err
        assert await r.get(f"sdr:lock:{{{LID}}}") == b"a-daemon"  # never freed by us
        assert len(await sql(clean, "SELECT 1 FROM messages")) == 1

        await r.delete(f"sdr:lock:{{{LID}}}")  # the turn ended
        code, out, err = await run(clean, "forget", LID, "--yes")
        assert code == 0, err
        assert (
            f"forgot {LID}" in out
            and {"leads": 1, "messages": 1}.items() <= {row[0]: int(row[1]) for row in rows_of(out)}.items()
        )
        assert await sql(clean, "SELECT 1 FROM leads") == [] and await r.keys("*") == []
        assert await events(clean) == [(None, "forgotten", "cli")]
    finally:
        await r.aclose()
    code, _, err = await run(clean, "forget", LID, "--yes")
    assert code == 1 and f"no lead with phone {LID}" in err and "Traceback" not in err, err


async def test_without_redis_a_pause_holds_and_says_so_and_forget_deletes_nothing(clean: Endpoints) -> None:
    lead = await add_lead(clean, ANA, name="Ana")
    await add_message(clean, lead, "Oi", T0)
    dead = {"SDR_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    code, out, err = await run(clean, "pause", ANA, "--for", "1h", **dead)
    assert code == 1 and f"paused {ANA} until" in out, err
    assert "paused in PostgreSQL, but Redis failed" in err and "Traceback" not in err
    assert [r["paused_by"] for r in await sql(clean, "SELECT paused_by FROM leads")] == ["cli"]
    before = await counts(clean)
    code, out, err = await run(clean, "forget", ANA, "--yes", **dead)
    assert code == 1 and "Redis failed" in err and "Traceback" not in err, err
    assert await counts(clean) == before and "forgot" not in out
