"""The pipeline done right: coalescing, locks, parallel stages, timeouts, caches, records."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.buffer import DUE, FIRST, window_for
from daemon.config import load_config, load_profile
from daemon.embedded import Endpoints
from daemon.testing.fake_openai import run_fake_openai
from daemon.turn import FALLBACK
from tests.helpers import (
    event,
    fetch,
    make_config,
    metric,
    run_daemon,
    run_fake_evolution,
    start_serve,
    wait_for,
)

PHONE = "5511977776666"


async def post_all(url: str, events: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url) as http:
        return [await http.post("/webhook/evolution", json=e) for e in events]


def burst(texts: list[str], phone: str = PHONE) -> list[dict[str, Any]]:
    base = datetime.now(UTC).timestamp()
    return [event(phone, text, timestamp=base + i) for i, text in enumerate(texts)]


async def rows(endpoints: Endpoints, sql: str, *args: Any) -> list[asyncpg.Record]:
    return await fetch(endpoints.database_url, sql, *args)


async def metrics_of(url: str) -> str:
    async with httpx.AsyncClient(base_url=url) as http:
        return (await http.get("/metrics")).text


async def test_a_burst_delivered_out_of_order_is_one_turn_in_timestamp_order(clean: Endpoints) -> None:
    async with run_fake_openai() as llm:
        llm.content = "Entendi! Me conta mais."
        cfg = make_config(clean, SDR_AGENT_BACKEND="openai", SDR_AGENT_BASE_URL=llm.url)
        async with run_daemon(cfg) as d:
            events = burst(["primeira", "segunda", "terceira", "quarta"])
            await post_all(d.url, [events[2], events[0], events[3], events[1]])
            await wait_for(lambda: rows(clean, "SELECT * FROM outbox"))
            await asyncio.sleep(0.7)  # past the cap: nothing else may follow
    assert len(llm.requests) == 1
    last_user = llm.requests[0]["body"]["messages"][-1]
    assert last_user == {"role": "user", "content": "primeira\nsegunda\nterceira\nquarta"}
    [turn] = await rows(clean, "SELECT * FROM turns")
    assert turn["messages_joined"] == 4 and turn["agent_backend"] == "openai"
    assert len(await rows(clean, "SELECT * FROM outbox")) == 1


async def test_the_same_message_three_times_gets_one_reply(config: Any, clean: Endpoints) -> None:
    async with run_daemon(config) as d:
        once = event(PHONE, "Olá")
        answers = await post_all(d.url, [once, once, once])
        await wait_for(lambda: rows(clean, "SELECT * FROM outbox"))
        await asyncio.sleep(0.7)
    assert [r.json()["status"] for r in answers] == ["stored", "duplicate", "duplicate"]
    assert len(await rows(clean, "SELECT * FROM outbox")) == 1


async def test_racing_bursts_on_two_daemons_never_overlap_and_nothing_is_dropped(clean: Endpoints) -> None:
    # A slow agent, and bursts landing on either daemon while the lead's turn runs.
    cfg = make_config(clean, SDR_AGENT_BACKEND="simulated", SDR_AGENT_SIMULATED_LATENCY="fixed:0.3")
    async with run_daemon(cfg) as a, run_daemon(cfg) as b:
        for i in range(6):
            await post_all((a if i % 2 else b).url, [event(PHONE, f"mensagem {i}")])
            await asyncio.sleep(0.2)

        async def all_answered() -> bool:
            left = await rows(clean, "SELECT 1 FROM messages WHERE direction = 'in' AND turn_id IS NULL")
            return not left

        await wait_for(all_answered, timeout=20)
    turns = await rows(clean, "SELECT started_at, finished_at, messages_joined FROM turns ORDER BY started_at")
    assert sum(t["messages_joined"] for t in turns) == 6
    for earlier, later in zip(turns, turns[1:], strict=False):
        assert earlier["finished_at"] <= later["started_at"], "two turns of one lead overlapped"
    assert len(await rows(clean, "SELECT * FROM outbox")) == len(turns)


async def test_an_agent_slower_than_its_timeout_gets_the_fallback_and_is_counted(clean: Endpoints) -> None:
    cfg = make_config(
        clean, SDR_AGENT_BACKEND="simulated", SDR_AGENT_SIMULATED_LATENCY="fixed:2", SDR_TIMEOUTS_AGENT="0.1"
    )
    async with run_daemon(cfg) as d:
        await post_all(d.url, [event(PHONE, "Olá")])
        [reply] = await wait_for(lambda: rows(clean, "SELECT body FROM outbox"))
        text = await metrics_of(d.url)
    assert reply["body"] == FALLBACK
    assert metric(text, "sdr_timeouts_total", stage="agent") == 1
    [turn] = await rows(clean, "SELECT outcome, timeouts FROM turns")
    assert (turn["outcome"], turn["timeouts"]) == ("fallback", ["agent"])


async def test_a_knowledge_search_slower_than_its_timeout_still_gets_an_answer(clean: Endpoints) -> None:
    cfg = make_config(clean, SDR_TIMEOUTS_KNOWLEDGE_BASE="0.1")
    blocker = await asyncpg.connect(clean.database_url)
    try:  # the search waits behind this lock until it times out
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE knowledge_base IN ACCESS EXCLUSIVE MODE")
        async with run_daemon(cfg) as d:
            await post_all(d.url, [event(PHONE, "Vocês têm financiamento?")])
            [reply] = await wait_for(lambda: rows(clean, "SELECT body FROM outbox"))
            text = await metrics_of(d.url)
        await tx.rollback()
    finally:
        await blocker.close()
    assert "Boa pergunta!" in reply["body"] and "como posso te chamar" in reply["body"]
    [turn] = await rows(clean, "SELECT outcome, timeouts FROM turns")
    assert (turn["outcome"], turn["timeouts"]) == ("ok", ["knowledge"])
    assert metric(text, "sdr_timeouts_total", stage="knowledge") == 1


async def test_a_turn_whose_store_fails_is_retried_and_answered_once(clean: Endpoints) -> None:
    cfg = make_config(clean, SDR_TIMEOUTS_DATABASE="0.3")
    blocker = await asyncpg.connect(clean.database_url)
    try:  # the turn's single write waits behind this lock until it times out
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        async with run_daemon(cfg) as d:
            await post_all(d.url, [event(PHONE, "Olá")])
            await wait_for(lambda: _failed_store(d.url))
            await tx.rollback()  # the database recovers
            [reply] = await wait_for(lambda: rows(clean, "SELECT body FROM outbox"))
            await asyncio.sleep(0.7)
    finally:
        await blocker.close()
    assert "Sol Nascente" in reply["body"]
    assert len(await rows(clean, "SELECT * FROM outbox")) == 1
    assert len(await rows(clean, "SELECT * FROM turns")) == 1


async def test_a_message_whose_buffer_entry_was_lost_is_still_answered(clean: Endpoints) -> None:
    cfg = make_config(
        clean,
        SDR_BUFFER_QUIET_WINDOW="0.5",
        SDR_BUFFER_SWEEP_INTERVAL="1",
        SDR_TIMEOUTS_AGENT="0.5",
        SDR_TIMEOUTS_REDIS_LOCK_TTL="0.5",
        SDR_TIMEOUTS_EVOLUTION_SEND="0.2",
    )
    async with run_daemon(cfg) as d:
        await post_all(d.url, [event(PHONE, "Olá")])
        await d.runtime.redis.delete(DUE, FIRST)  # e.g. Redis restarted without its data
        [reply] = await wait_for(lambda: rows(clean, "SELECT body FROM outbox"))
    assert "Sol Nascente" in reply["body"]


async def _failed_store(url: str) -> bool:
    return metric(await metrics_of(url), "sdr_timeouts_total", stage="store") >= 1


async def test_caches_hit_after_the_first_turn_and_stay_bounded(clean: Endpoints) -> None:
    cfg = make_config(clean, SDR_CACHE_KB_SIZE="2")
    async with run_daemon(cfg) as d:
        for question in ["Quanto custa?", "quanto custa", "Tem garantia?", "E a manutenção?", "Funciona à noite?"]:
            before = len(await rows(clean, "SELECT id FROM outbox"))
            await post_all(d.url, [event(PHONE, question)])
            await wait_for(lambda before=before: _more(clean, before))
        text = await metrics_of(d.url)
        assert len(d.runtime.knowledge) <= 2
        assert len(d.runtime.leads) == 1
    turns = await rows(clean, "SELECT cache_hits, cache_misses FROM turns ORDER BY id")
    # Turn 1 finds the lead the intake wrote through, and misses the search; turn 2 hits
    # both ("quanto custa" is the same search as "Quanto custa?").
    assert (turns[0]["cache_hits"], turns[0]["cache_misses"]) == (1, 1)
    assert (turns[1]["cache_hits"], turns[1]["cache_misses"]) == (2, 0)
    assert all(t["cache_hits"] >= 1 for t in turns[1:])  # the lead, written through each turn
    assert metric(text, "sdr_cache_hits_total", cache="knowledge", tier="local") == 1
    assert metric(text, "sdr_cache_misses_total", cache="knowledge") == 4
    assert metric(text, "sdr_cache_misses_total", cache="lead") == 0


async def _more(endpoints: Endpoints, before: int) -> list[asyncpg.Record]:
    found = await rows(endpoints, "SELECT id FROM outbox")
    return found if len(found) > before else []


async def test_caches_off_reads_postgres_every_time(clean: Endpoints) -> None:
    cfg = make_config(clean, SDR_CACHE_ENABLED="false")
    async with run_daemon(cfg) as d:
        for question in ["Quanto custa?", "Quanto custa?"]:
            before = len(await rows(clean, "SELECT id FROM outbox"))
            await post_all(d.url, [event(PHONE, question)])
            await wait_for(lambda before=before: _more(clean, before))
    turns = await rows(clean, "SELECT cache_hits, cache_misses FROM turns ORDER BY id")
    assert [(t["cache_hits"], t["cache_misses"]) for t in turns] == [(0, 2), (0, 2)]


async def test_metrics_expose_every_documented_series(config: Any, clean: Endpoints) -> None:
    async with run_daemon(config) as d:
        await post_all(d.url, [event(PHONE, "Olá")])
        await wait_for(lambda: rows(clean, "SELECT * FROM outbox"))
        names = {f.name for f in text_string_to_metric_families(await metrics_of(d.url))}
    assert names >= {
        "sdr_response_time_seconds",
        "sdr_stage_seconds",
        "sdr_timeouts",
        "sdr_cache_hits",
        "sdr_cache_misses",
        "sdr_webhooks",
        "sdr_active_leads",
        "sdr_turns_in_flight",
    }


# --- the adaptive window --------------------------------------------------------------


def test_the_window_adapts_to_context_within_its_bounds() -> None:
    b = load_profile("recommended", env={}).buffer
    assert window_for("text", "oi", b) == b.quiet_window
    assert window_for("text", "Quanto custa a instalação?", b) == b.min_window
    long_and_complete = "Tenho uma casa em Campinas com telhado de cerâmica e a conta vem uns 600 reais por mês, quero entender direitinho como funciona o financiamento."
    assert window_for("text", long_and_complete, b) == b.min_window
    assert window_for("audio", "", b) == b.extended_window
    assert window_for("image", "minha conta", b) == b.extended_window
    legacy = load_profile("legacy", env={}).buffer
    assert {window_for(k, t, legacy) for k, t in [("text", "?"), ("audio", ""), ("text", "oi")]} == {5.0}


async def test_typing_extends_a_pending_burst_but_never_past_the_cap(clean: Endpoints) -> None:
    cfg = make_config(
        clean, SDR_BUFFER_QUIET_WINDOW="0.3", SDR_BUFFER_EXTENDED_WINDOW="5", SDR_TIMEOUTS_MESSAGE_BUFFER="1"
    )
    presence = {
        "event": "presence.update",
        "instance": "sdr",
        "data": {
            "id": f"{PHONE}@s.whatsapp.net",
            "presences": {f"{PHONE}@s.whatsapp.net": {"lastKnownPresence": "composing"}},
        },
    }
    async with run_daemon(cfg) as d:
        idle = (await post_all(d.url, [presence]))[0].json()
        await post_all(d.url, [event(PHONE, "oi")])
        before = await d.runtime.redis.zscore(DUE, PHONE)
        typing = (await post_all(d.url, [presence]))[0].json()
        after = await d.runtime.redis.zscore(DUE, PHONE)
        first = await d.runtime.redis.zscore(FIRST, PHONE)
        await wait_for(lambda: rows(clean, "SELECT * FROM outbox"))
    assert idle == {"status": "presence", "buffer": "idle"}  # nothing pending: nothing to wait for
    assert typing == {"status": "presence", "buffer": "extended"}
    assert after > before
    # Epoch seconds: an absolute tolerance (the default relative one is ±30 min here).
    assert after == pytest.approx(first + 1.0, abs=0.01)  # capped at the first message + message_buffer


# --- the legacy switches --------------------------------------------------------------


async def test_legacy_answers_message_by_message(clean: Endpoints) -> None:
    short = {
        "SDR_BUFFER_MIN_WINDOW": "0.2",
        "SDR_BUFFER_QUIET_WINDOW": "0.2",
        "SDR_BUFFER_EXTENDED_WINDOW": "0.2",
        "SDR_TIMEOUTS_MESSAGE_BUFFER": "0.2",
        "SDR_TIMEOUTS_SHUTDOWN_GRACE": "5",
        "SDR_LIMITS_LOCK_BACKOFF": "0.01",
    }
    urls = {"SDR_DATABASE_URL": clean.database_url, "SDR_REDIS_URL": clean.redis_url}
    legacy = load_config(None, "legacy", {**urls, **short})
    assert not legacy.profile.buffer.coalesce and not legacy.profile.cache.enabled
    async with run_daemon(legacy) as d:
        await post_all(d.url, burst(["oi", "tudo bem", "quero saber de energia solar"]))

        async def three() -> list[asyncpg.Record]:
            found = await rows(clean, "SELECT * FROM turns")
            return found if len(found) == 3 else []

        turns = await wait_for(three)
    assert [t["messages_joined"] for t in turns] == [1, 1, 1]
    assert len(await rows(clean, "SELECT * FROM outbox")) == 3
    assert all(t["cache_hits"] == 0 for t in turns)


# --- sending ------------------------------------------------------------------------


async def test_long_replies_are_split_on_sentences_and_sent_in_order_after_typing(clean: Endpoints) -> None:
    async with run_fake_evolution() as evo:
        cfg = make_config(
            clean,
            SDR_EVOLUTION_BASE_URL=evo.url,
            SDR_LIMITS_MAX_MESSAGE_LENGTH="120",
            SDR_FEATURES_TYPING_AFTER="0",
        )
        async with run_daemon(cfg) as d:
            await post_all(d.url, [event(PHONE, "Quanto custa?")])
            sent = await wait_for(lambda: _sent(clean, 2))
    texts = [m["text"] for m in evo.sent]
    assert len(texts) >= 2 and all(len(t) <= 120 for t in texts)
    assert texts[-1].endswith("como posso te chamar?")
    assert [r["body"] for r in sent] == texts  # one outbox row per WhatsApp message, in order
    assert evo.presences and evo.presences[0]["number"] == PHONE
    assert evo.presences[0]["presence"] == "composing"
    assert evo.presences[0]["at"] <= evo.sent[0]["at"]


async def _sent(endpoints: Endpoints, at_least: int) -> list[asyncpg.Record]:
    found = await rows(endpoints, "SELECT body, status FROM outbox ORDER BY id")
    done = all(r["status"] == "sent" for r in found)
    return found if len(found) >= at_least and done else []


# --- lifecycle ----------------------------------------------------------------------


async def test_killed_between_intake_and_reply_the_reply_is_sent_once_after_restart(
    clean: Endpoints, tmp_path: Path
) -> None:
    env = {
        "SDR_DATABASE_URL": clean.database_url,
        "SDR_REDIS_URL": clean.redis_url,
        "SDR_AGENT_BACKEND": "simulated",
        "SDR_AGENT_SIMULATED_LATENCY": "fixed:1.5",
        "SDR_TIMEOUTS_REDIS_LOCK_TTL": "0.5",
    }
    first = await start_serve(env, tmp_path / "first.log")
    await first.wait_ready()
    await post_all(first.url, [event(PHONE, "Olá")])

    async def claimed() -> bool:  # the turn is running: the burst left the buffer
        return not await rows(clean, "SELECT 1 FROM turns") and await _due_empty(clean)

    await wait_for(claimed)
    assert await first.stop(9) == -9  # SIGKILL mid-turn: no chance to clean up
    assert await rows(clean, "SELECT * FROM outbox") == []
    second = await start_serve(env, tmp_path / "second.log")
    try:
        await second.wait_ready()
        await wait_for(lambda: rows(clean, "SELECT * FROM outbox"))
        await asyncio.sleep(1)
    finally:
        assert await second.stop() == 0, second.log
    assert len(await rows(clean, "SELECT * FROM outbox")) == 1
    assert "re-queued 1 unanswered message(s)" in second.log


async def _due_empty(endpoints: Endpoints) -> bool:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(endpoints.redis_url)
    try:
        return await r.zcard(DUE) == 0
    finally:
        await r.aclose()


async def test_sigterm_during_a_turn_lets_it_complete(clean: Endpoints, tmp_path: Path) -> None:
    env = {
        "SDR_DATABASE_URL": clean.database_url,
        "SDR_REDIS_URL": clean.redis_url,
        "SDR_AGENT_BACKEND": "simulated",
        "SDR_AGENT_SIMULATED_LATENCY": "fixed:1.5",
    }
    serve = await start_serve(env, tmp_path / "serve.log")
    await serve.wait_ready()
    await post_all(serve.url, [event(PHONE, "Olá")])
    await wait_for(lambda: _due_empty(clean))
    assert await serve.stop() == 0, serve.log
    assert len(await rows(clean, "SELECT * FROM outbox")) == 1
    assert "waiting up to" in serve.log
