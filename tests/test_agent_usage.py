"""What the agent's model bills (issue #18, usage and cost): tokens per turn from the API's
`usage` (counted when the answer has none), their cost at [agent] price_in/price_out, on
the turn, in /metrics and in `sdrctl report`. The fake OpenAI API answers over real HTTP."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from daemon.config import SloSettings
from daemon.embedded import Endpoints
from daemon.testing.fake_openai import Step, run_fake_openai
from daemon.tools.report import Window, build_report
from tests.helpers import event, fetch, make_config, metric, run_daemon, wait_for

PHONE = "5511933332222"
# A streamed reply's turn is written with its first part; its tokens once the model is done.
DONE = "SELECT * FROM turns WHERE stages ? 'agent'"


async def one_turn(clean: Endpoints, **env: str) -> tuple[list[dict[str, int]], asyncpg.Record, str]:
    async with run_fake_openai() as llm:
        cfg = make_config(
            clean, SDR_AGENT_BACKEND="openai", SDR_AGENT_BASE_URL=llm.url, OPENAI_API_KEY="sk-test", **env
        )
        async with run_daemon(cfg) as d:
            async with httpx.AsyncClient(base_url=d.url) as http:
                assert (
                    await http.post("/webhook/evolution", json=event(PHONE, "Oi, quanto custa?"))
                ).status_code == 200
                rows = await wait_for(lambda: fetch(clean.database_url, DONE))
                scraped = (await http.get("/metrics")).text
        return llm.usages, rows[0], scraped


async def test_a_turn_records_what_the_model_billed_and_what_it_cost(clean: Endpoints) -> None:
    start = datetime.now(UTC)
    usages, turn, scraped = await one_turn(clean, SDR_AGENT_PRICE_IN="0.15", SDR_AGENT_PRICE_OUT="0.60")
    [usage] = usages
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    cost = (prompt * 0.15 + completion * 0.60) / 1_000_000
    assert (turn["prompt_tokens"], turn["completion_tokens"]) == (prompt, completion) and prompt > 50
    assert float(turn["cost"]) == pytest.approx(cost, abs=1e-6)
    assert metric(scraped, "sdr_agent_tokens_total", kind="prompt") == prompt
    assert metric(scraped, "sdr_agent_tokens_total", kind="completion") == completion
    assert metric(scraped, "sdr_agent_cost_total") == pytest.approx(cost, abs=1e-9)
    conn = await asyncpg.connect(clean.database_url)
    try:
        report = await build_report(conn, Window(start, datetime.now(UTC) + timedelta(minutes=1)), SloSettings())
    finally:
        await conn.close()
    spend = report.to_dict()["agent"]
    assert spend["calls"] == 1 and spend["prompt_tokens"] == prompt and spend["completion_tokens"] == completion
    assert spend["cost_per_turn"] == pytest.approx(cost, abs=1e-6)
    assert spend["qualified_leads"] == 0 and spend["cost_per_qualified_lead"] is None  # nobody booked yet


async def test_without_prices_tokens_are_kept_and_no_cost_is_made_up(clean: Endpoints) -> None:
    _, turn, scraped = await one_turn(clean)
    assert turn["prompt_tokens"] > 0 and turn["cost"] is None
    assert metric(scraped, "sdr_agent_cost_total") == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_an_answer_without_usage_is_counted_from_its_text(clean: Endpoints, stream: bool) -> None:
    """Some OpenAI-compatible servers omit `usage` (and streams have it only when asked):
    about 4 characters a token."""
    text = "Olá! Eu sou a Sol ☀️ Como posso te chamar?"
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
    async with run_fake_openai() as llm:
        if stream:
            llm.then(Step(content=text, usage=False))
        else:
            llm.raw = json.dumps(answer)
        cfg = make_config(
            clean,
            SDR_AGENT_BACKEND="openai",
            SDR_AGENT_BASE_URL=llm.url,
            SDR_AGENT_STREAM=str(stream).lower(),
            OPENAI_API_KEY="sk-test",
        )
        async with run_daemon(cfg) as d:
            async with httpx.AsyncClient(base_url=d.url) as http:
                assert (await http.post("/webhook/evolution", json=event(PHONE, "Oi"))).status_code == 200
            [turn] = await wait_for(lambda: fetch(clean.database_url, DONE))
    assert llm.requests[0]["body"].get("stream", False) is stream and llm.usages == []
    assert turn["completion_tokens"] == -(-len(text) // 4) and turn["prompt_tokens"] > 100


async def test_a_reply_overtaken_by_a_newer_message_keeps_what_it_cost(clean: Endpoints) -> None:
    """Speculating, a finished reply the lead's next message overtook is thrown away; the
    model billed it all the same, so its tokens and cost are recorded with it."""
    async with run_fake_openai() as llm:
        llm.then(Step(content="Olá! Como posso te chamar?", ttft=0.4))
        cfg = make_config(
            clean,
            SDR_AGENT_BACKEND="openai",
            SDR_AGENT_BASE_URL=llm.url,
            SDR_AGENT_STREAM="false",
            SDR_AGENT_PRICE_IN="0.15",
            SDR_AGENT_PRICE_OUT="0.60",
            OPENAI_API_KEY="sk-test",
        )
        async with run_daemon(cfg) as d, httpx.AsyncClient(base_url=d.url) as http:
            assert (await http.post("/webhook/evolution", json=event(PHONE, "oi"))).status_code == 200
            await wait_for(lambda: asyncio.sleep(0.01, bool(llm.requests) or None))
            # The lead writes again while the model is still answering the first message.
            assert (await http.post("/webhook/evolution", json=event(PHONE, "tudo bem?"))).status_code == 200
            [thrown] = await wait_for(lambda: fetch(clean.database_url, "SELECT * FROM discarded_replies"))
            await wait_for(lambda: fetch(clean.database_url, DONE))
    first = llm.usages[0]
    assert (thrown["reason"], thrown["prompt_tokens"], thrown["completion_tokens"]) == (
        "newer_message",
        first["prompt_tokens"],
        first["completion_tokens"],
    )
    assert float(thrown["cost"]) > 0
