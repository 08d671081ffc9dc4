"""The per-lead rate limit: a flooding lead gets 429 while every other lead is served,
in bounded memory, and 0 turns it off."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from daemon.embedded import Endpoints
from daemon.ratelimit import LeadRateLimiter, retry_after
from tests.helpers import event, fetch, make_config, metric, run_daemon

FLOODER = "5511911110000"
OTHER = "5511922220000"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def typing_event(phone: str) -> dict[str, Any]:
    jid = f"{phone}@s.whatsapp.net"
    return {
        "event": "presence.update",
        "instance": "sdr",
        "data": {"id": jid, "presences": {jid: {"lastKnownPresence": "composing"}}},
    }


def test_a_bucket_allows_the_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = LeadRateLimiter(rate=2, burst=3, tracked=100, clock=clock)
    assert [limiter.wait(FLOODER) for _ in range(3)] == [0, 0, 0]
    assert limiter.wait(FLOODER) == 0.5  # one token every 1/rate seconds
    assert limiter.wait(OTHER) == 0  # another lead has its own bucket
    clock.now += 0.5
    assert limiter.wait(FLOODER) == 0 and limiter.wait(FLOODER) > 0
    clock.now += 3600  # a long silence refills up to the burst, never past it
    assert [limiter.wait(FLOODER) for _ in range(4)][-1] > 0


def test_memory_stays_bounded_forgetting_the_least_recently_seen() -> None:
    clock = Clock()
    limiter = LeadRateLimiter(rate=1, burst=1, tracked=3, clock=clock)
    assert limiter.wait(FLOODER) == 0
    for i in range(1000):
        assert limiter.wait(FLOODER) > 0  # seen on every round: never forgotten
        limiter.wait(f"55119{i:08d}")
        assert len(limiter) <= 3
    assert len(limiter) == 3


def test_rate_zero_disables_the_limit_and_remembers_nothing() -> None:
    limiter = LeadRateLimiter(rate=0, burst=1, tracked=100)
    assert not limiter.enabled
    assert all(limiter.wait(FLOODER) == 0 for _ in range(1000))
    assert len(limiter) == 0


def test_retry_after_is_whole_seconds_and_never_zero() -> None:
    assert [retry_after(w) for w in (0.001, 1.0, 1.2, 99.5)] == ["1", "1", "2", "100"]


async def test_a_flooding_lead_gets_429_while_another_is_served(clean: Endpoints) -> None:
    cfg = make_config(clean, SDR_LIMITS_LEAD_RATE="0.01", SDR_LIMITS_LEAD_BURST="3")
    async with run_daemon(cfg) as d, httpx.AsyncClient(base_url=d.url) as http:
        burst = [await http.post("/webhook/evolution", json=event(FLOODER, f"oi {i}")) for i in range(3)]
        over, other = await asyncio.gather(  # the same moment
            http.post("/webhook/evolution", json=event(FLOODER, "de novo")),
            http.post("/webhook/evolution", json=event(OTHER, "olá")),
        )
        typing = await http.post("/webhook/evolution", json=typing_event(FLOODER))
        mine = event(FLOODER, "aqui é o Rafael, da loja")
        mine["data"]["key"]["fromMe"] = True  # a person on the business's phone: not the lead's, not limited
        person = await http.post("/webhook/evolution", json=mine)
        metrics = (await http.get("/metrics")).text
    assert [r.json() for r in burst] == [{"status": "stored"}] * 3
    assert over.status_code == 429 and typing.status_code == 429
    assert 1 <= int(over.headers["retry-after"]) <= 100  # 0.01/s: a token every 100 s
    assert "0.01/s" in over.json()["error"] and "bursts of 3" in over.json()["error"]
    assert other.status_code == 200 and other.json() == {"status": "stored"}
    assert person.json() == {"status": "takeover"}
    assert metric(metrics, "sdr_webhooks_total", outcome="rate_limited") == 2
    rows = await fetch(clean.database_url, "SELECT body FROM messages WHERE direction = 'in'")
    assert sorted(r["body"] for r in rows) == ["oi 0", "oi 1", "oi 2", "olá"]


async def test_lead_rate_zero_serves_every_request(clean: Endpoints) -> None:
    cfg = make_config(clean, SDR_LIMITS_LEAD_RATE="0", SDR_LIMITS_LEAD_BURST="1")
    async with run_daemon(cfg) as d, httpx.AsyncClient(base_url=d.url) as http:
        answers = [await http.post("/webhook/evolution", json=event(FLOODER, f"m{i}")) for i in range(20)]
    assert {r.status_code for r in answers} == {200}
