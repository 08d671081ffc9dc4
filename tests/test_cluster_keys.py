"""Redis Cluster readiness: keys used together live in one hash slot."""

from __future__ import annotations

import httpx
from redis.crc import key_slot

from daemon.buffer import DUE, FIRST
from daemon.embedded import Endpoints
from daemon.locks import again_key, fence_key, lock_key
from tests.helpers import event, fetch, make_config, run_daemon, wait_for

PHONE = "5511933332222"


async def test_a_leads_keys_share_its_hash_slot_and_the_buffer_scripts_keys_share_one(clean: Endpoints) -> None:
    async with run_daemon(make_config(clean)) as d:
        async with httpx.AsyncClient(base_url=d.url) as http:
            await http.post("/webhook/evolution", json=event(PHONE, "Oi"))
        await wait_for(lambda: fetch(clean.database_url, "SELECT 1 FROM outbox"))
        lead_keys = [k.decode() for k in await d.runtime.redis.keys(f"*{PHONE}*")]
    assert lead_keys  # the lead's cache entry at least
    slots = {key_slot(k.encode()) for k in [*lead_keys, lock_key(PHONE), again_key(PHONE), fence_key(PHONE)]}
    assert slots == {key_slot(PHONE.encode())}
    assert key_slot(DUE.encode()) == key_slot(FIRST.encode())
