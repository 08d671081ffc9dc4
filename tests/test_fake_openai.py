"""The fake OpenAI-compatible API speaks OpenAI's chat-completions wire format, read with
plain httpx over real HTTP: function calling, streaming (server-sent events), usage,
errors with Retry-After, streams cut mid-answer, scripted steps and the timing events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from daemon.testing.fake_openai import FakeOpenAI, Step, run_fake_openai

MESSAGES = [{"role": "system", "content": "Você é a Sol."}, {"role": "user", "content": "oi, tudo bem?"}]
TOOLS = [{"type": "function", "function": {"name": "save_lead", "parameters": {"type": "object"}}}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with run_fake_openai() as server:
        yield server


@pytest.fixture
async def http(fake: FakeOpenAI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, timeout=10) as client:
        yield client


def request(**extra: Any) -> dict[str, Any]:
    return {"model": "test-model", "messages": MESSAGES, "tools": TOOLS, **extra}


async def post(http: httpx.AsyncClient, **extra: Any) -> httpx.Response:
    return await http.post("/chat/completions", json=request(**extra))


async def stream(http: httpx.AsyncClient, seen: list[Any] | None = None, **extra: Any) -> list[Any]:
    """The decoded `data:` events of a streamed completion ("[DONE]" kept as is), appended to
    `seen` as they arrive (so a test sees what came before an error)."""
    events: list[Any] = [] if seen is None else seen
    async with http.stream("POST", "/chat/completions", json=request(stream=True, **extra)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line:
                assert line.startswith("data: ")
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def deltas(events: list[Any]) -> list[dict[str, Any]]:
    return [e["choices"][0]["delta"] for e in events if e != "[DONE]" and e["choices"]]


def text(events: list[Any]) -> str:
    return "".join(d.get("content") or "" for d in deltas(events))


async def test_a_tool_call_answer_has_the_calls_and_finish_reason_tool_calls(
    fake: FakeOpenAI, http: httpx.AsyncClient
) -> None:
    arguments = {"name": "João", "bill_value": 487.35}
    fake.then(Step(tool_calls=[("save_lead", arguments), ("book", '{"day": ')]))

    answer = (await post(http)).json()

    assert answer["id"].startswith("chatcmpl-") and answer["object"] == "chat.completion"
    assert answer["model"] == "test-model" and isinstance(answer["created"], int)
    [choice] = answer["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] is None
    first, second = message["tool_calls"]
    assert first["id"].startswith("call_") and first["id"] != second["id"]
    assert first["type"] == "function" and first["function"]["name"] == "save_lead"
    assert isinstance(first["function"]["arguments"], str)
    assert json.loads(first["function"]["arguments"]) == arguments
    assert second["function"] == {"name": "book", "arguments": '{"day": '}  # malformed, verbatim
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] == 7 and usage["completion_tokens"] == 4 + 1  # words of the arguments
    assert fake.usages == [{"prompt_tokens": 7, "completion_tokens": 5}]

    plain = (await post(http)).json()  # the knobs: text, no tool_calls key
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": fake.content}
    assert plain["choices"][0]["finish_reason"] == "stop"


async def test_a_streamed_answer_reassembles_and_ends_with_done(fake: FakeOpenAI, http: httpx.AsyncClient) -> None:
    content = "Olá, Ana! Financiamos em até 120 parcelas.\nQuer agendar?"
    fake.then(Step(content=content), Step(content=content))

    events = await stream(http)

    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "test-model" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1  # one id for the whole stream
    assert all("usage" not in c for c in chunks)  # no include_usage: no usage at all
    assert deltas(events)[0] == {"role": "assistant", "content": ""}
    assert text(events) == content
    assert len(chunks) > 5  # token-like pieces, not one blob
    *middle, last = chunks
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert fake.usages == []  # none was sent

    events = await stream(http, stream_options={"include_usage": True})

    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(content.split())
    assert all(c["usage"] is None for c in chunks)  # as OpenAI: null until the last chunk
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and text(events) == content
    assert fake.usages == [{"prompt_tokens": 7, "completion_tokens": len(content.split())}]


async def test_a_step_without_usage_sends_none(fake: FakeOpenAI, http: httpx.AsyncClient) -> None:
    fake.then(Step(content="oi", usage=False), Step(content="oi", usage=False))
    assert "usage" not in (await post(http)).json()
    events = await stream(http, stream_options={"include_usage": True})
    assert all(e == "[DONE]" or e["choices"] for e in events) and text(events) == "oi"
    assert fake.usages == []


async def test_streamed_tool_call_fragments_reassemble_to_the_arguments(
    fake: FakeOpenAI, http: httpx.AsyncClient
) -> None:
    arguments = {"name": "Ana Maria", "bill_value": 487.35, "solution": "on-grid"}
    fake.then(Step(content="Anotado!", tool_calls=[("save_lead", arguments), ("book", "{not json")]))

    events = await stream(http)

    calls: dict[int, dict[str, Any]] = {}
    fragments = 0
    for delta in deltas(events):
        for call in delta.get("tool_calls", []):
            if "id" in call:  # the first delta of a call: id, type, name, no arguments yet
                assert call["type"] == "function" and call["function"]["arguments"] == ""
                calls[call["index"]] = {"id": call["id"], "name": call["function"]["name"], "arguments": ""}
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                calls[call["index"]]["arguments"] += call["function"]["arguments"]
                fragments += 1
    assert [c["name"] for c in calls.values()] == ["save_lead", "book"]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert json.loads(calls[0]["arguments"]) == arguments
    assert calls[1]["arguments"] == "{not json"
    assert fragments > 4  # the JSON arrives in pieces
    assert text(events) == "Anotado!"
    assert events[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "tool_calls"}


async def test_an_error_step_has_openais_body_and_retry_after(fake: FakeOpenAI, http: httpx.AsyncClient) -> None:
    fake.then(
        Step(status=429, retry_after=2, content="Rate limit reached"),
        Step(status=503, retry_after=0.5),
        Step(status=500),
    )

    limited = await post(http)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
    assert limited.json() == {
        "error": {"message": "Rate limit reached", "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    }
    unavailable = await post(http, stream=True)  # an error is JSON even to a streamed request
    assert unavailable.status_code == 503 and unavailable.headers["retry-after"] == "0.5"
    assert unavailable.json()["error"]["type"] == "server_error"
    failed = await post(http)
    assert failed.status_code == 500 and "retry-after" not in failed.headers
    assert set(failed.json()["error"]) == {"message", "type", "param", "code"}
    assert (await post(http)).status_code == 200  # the script is over: the knobs answer
    assert [what for _, what in fake.events].count("error") == 3


async def test_a_cut_stream_raises_on_the_client_before_done(fake: FakeOpenAI, http: httpx.AsyncClient) -> None:
    fake.then(Step(content="um dois três quatro cinco seis sete", cut_after=3))
    seen: list[Any] = []

    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        await stream(http, seen, stream_options={"include_usage": True})

    assert "[DONE]" not in seen
    assert text(seen) == "um dois três"  # never the rest
    assert all(c["choices"][0]["finish_reason"] is None for c in seen)
    assert fake.usages == []
    assert [what for _, what in fake.events] == ["request", "first_chunk", "cut"]
    # The server is still fine: the next request is answered.
    assert text(await stream(http)) == fake.content


async def test_a_cut_stream_of_tool_calls_and_a_cut_plain_answer(fake: FakeOpenAI, http: httpx.AsyncClient) -> None:
    fake.then(Step(tool_calls=[("save_lead", {"name": "Ana Maria"})], cut_after=2), Step(content="oi", cut_after=0))
    seen: list[Any] = []
    with pytest.raises(httpx.RemoteProtocolError):
        await stream(http, seen)
    [header, fragment] = [d["tool_calls"][0] for d in deltas(seen)[1:]]
    assert header["function"]["name"] == "save_lead" and fragment["function"]["arguments"] == '{"'

    with pytest.raises(httpx.RemoteProtocolError, match="without sending complete message body"):
        await post(http)  # a non-streamed body cut short of its Content-Length


async def test_steps_are_taken_in_order_then_the_knobs_answer(fake: FakeOpenAI, http: httpx.AsyncClient) -> None:
    fake.then(Step(content="primeiro")).then(Step(content="segundo"))
    fake.content = "dos knobs"

    answers = [(await post(http, n=i)).json()["choices"][0]["message"]["content"] for i in range(3)]
    streamed = text(await stream(http))

    assert answers == ["primeiro", "segundo", "dos knobs"] and streamed == "dos knobs"
    assert fake.script == []
    assert [r["body"].get("n") for r in fake.requests] == [0, 1, 2, None]
    fake.status = 500  # the knobs still answer errors and raw bodies when the script is empty
    assert (await post(http)).status_code == 500
    fake.status, fake.raw = 200, "<html>Bad Gateway</html>"
    assert (await post(http)).text == "<html>Bad Gateway</html>"


async def test_events_are_recorded_in_order_with_the_pacing(fake: FakeOpenAI, http: httpx.AsyncClient) -> None:
    fake.ttft, fake.token_interval = 0.1, 0.02
    fake.then(Step(content="um dois três quatro"), Step(content="um dois", ttft=0.05, token_interval=0))

    start = time.monotonic()
    events = await stream(http)
    assert text(events) == "um dois três quatro"
    (requested, what1), (first, what2), (done, what3) = fake.events
    assert (what1, what2, what3) == ("request", "first_chunk", "done")
    assert start <= requested < first < done <= time.monotonic()
    assert first - requested >= 0.1  # ttft
    assert done - first >= 3 * 0.02  # four pieces, three intervals

    fake.events.clear()
    assert (await post(http)).json()["choices"][0]["message"]["content"] == "um dois"
    (requested, _), (first, _), (done, _) = fake.events
    assert 0.05 <= first - requested < 0.1 and [w for _, w in fake.events] == ["request", "first_chunk", "done"]


async def test_a_client_that_hangs_up_mid_stream_is_let_go(fake: FakeOpenAI, http: httpx.AsyncClient) -> None:
    fake.then(Step(content="uma resposta bem longa que ninguém vai ler até o fim", token_interval=30))
    async with http.stream("POST", "/chat/completions", json=request(stream=True)) as response:
        lines = response.aiter_lines()
        assert json.loads((await anext(lines)).removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    for _ in range(200):  # the server notices the hang-up and stops waiting
        if fake.events[-1][1] == "disconnect":
            break
        await asyncio.sleep(0.01)
    assert [w for _, w in fake.events] == ["request", "first_chunk", "disconnect"]
