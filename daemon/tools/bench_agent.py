"""`sdrctl bench --agent fake-llm`: the time to the first WhatsApp message and to the whole
reply, streamed against not, in one run.

Two daemons of the same profile run side by side on the same simulated leads, both with the
`openai` backend, each talking to its own fake OpenAI-compatible server
(daemon/testing/fake_openai.py, in this process) that writes the same three-paragraph reply
at a model's pace: "whole" (`SDR_AGENT_STREAM=false`: the reply goes as one message once
the completion is done) and "streamed" (`SDR_AGENT_STREAM=true`: each paragraph goes the
moment it is complete). The pace (time to first token, tokens per second) is a knob; its
defaults are typical published figures for hosted small models (gpt-4o-mini class), not
measurements of ours. The fake writes one word per streamed chunk and bills words as
tokens (its `usage`), so "tokens" here are words.

Per daemon, from what the lead saw (the fake Evolution API's arrival times, the bench's
clock): for each answered burst, its last message -> the first part of the reply whose
turn holds it (the bench's usual "response") and -> the last part of that reply (the whole
reply), and the parts it came in; tokens and cost per turn from the turns table (priced at
gpt-4o-mini's 0.15 / 0.60 USD a million tokens); the ratios streamed / whole."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from daemon.config import load_profile
from daemon.errors import ConfigError
from daemon.store import init_connection
from daemon.testing.fake_evolution import run_fake_evolution
from daemon.testing.fake_openai import FakeOpenAI, run_fake_openai
from daemon.tools.bench import ProfileResult, Progress, burst_records, drive
from daemon.tools.bursts import ratio, spread
from daemon.tools.daemons import DaemonUnderTest, start_daemon
from daemon.tools.workload import Workload

# A hosted small model's pace, as published for the gpt-4o-mini class: about half a second
# to the first token, then about 70 tokens a second. Typical figures, not ours: knobs
# (`--llm-ttft`, `--llm-tokens-per-s`), scaled with the workload's time scale.
LLM_TTFT = 0.5
LLM_TOKENS_PER_S = 70.0
PRICE_IN, PRICE_OUT = 0.15, 0.60  # gpt-4o-mini, USD a million prompt / completion tokens
MODES = (("whole", False), ("streamed", True))  # (daemon, SDR_AGENT_STREAM)

# What the fake model answers every turn: a pt-BR SDR reply of three paragraphs (greeting,
# savings estimate, invitation to book), 89 words, so a streamed reply has parts to cut.
REPLY = (
    "Oi! Aqui é a Sol, da Sol Nascente Energia Solar. Obrigada pelo contato, vou te ajudar a ver "
    "quanto dá para economizar.\n\n"
    "Com uma conta de uns R$ 450 por mês, um sistema no telhado pode reduzir o valor em até 90 %. "
    "O investimento se paga em uns quatro anos, e dá para financiar com parcelas parecidas com a "
    "conta de hoje.\n\n"
    "Que tal uma conversa de 20 minutos com um consultor para fazer a simulação com a sua conta? "
    "Qual dia e horário ficam melhores para você?"
)


@dataclass(frozen=True)
class LlmPace:
    """How fast the fake model writes, unscaled: seconds to the first token, tokens a second."""

    ttft: float = LLM_TTFT
    tokens_per_s: float = LLM_TOKENS_PER_S

    def validated(self) -> LlmPace:
        if not 0 <= self.ttft <= 60:
            raise ConfigError(f"--llm-ttft must be from 0 to 60 seconds (got {self.ttft:g})")
        if not 1 <= self.tokens_per_s <= 10_000:
            raise ConfigError(f"--llm-tokens-per-s must be from 1 to 10000 (got {self.tokens_per_s:g})")
        return self

    def apply(self, fake: FakeOpenAI, time_scale: float) -> None:
        fake.content = REPLY
        fake.ttft = self.ttft * time_scale
        fake.token_interval = time_scale / self.tokens_per_s


def agent_env(llm_url: str, streamed: bool) -> dict[str, str]:
    """What a daemon under test needs to talk to the fake model (replaces the simulated agent)."""
    return {
        "SDR_AGENT_BACKEND": "openai",
        "SDR_AGENT_BASE_URL": llm_url,
        "SDR_AGENT_STREAM": "true" if streamed else "false",
        "SDR_AGENT_API_KEY_ENV": "OPENAI_API_KEY",
        "OPENAI_API_KEY": "sk-fake-bench",
        "SDR_AGENT_PRICE_IN": repr(PRICE_IN),
        "SDR_AGENT_PRICE_OUT": repr(PRICE_OUT),
    }


# --- figures ------------------------------------------------------------------------------


@dataclass
class ReplyTimes:
    """Per answered burst: last message -> first part, -> last part (seconds), and parts."""

    first: list[float] = dataclasses.field(default_factory=list)
    whole: list[float] = dataclasses.field(default_factory=list)
    parts: list[int] = dataclasses.field(default_factory=list)


def reply_times(result: ProfileResult, stored: dict[str, int | None], deliveries: dict[int, list[float]]) -> ReplyTimes:
    """For each burst the accounting answered (whole or split, so it has a `response`): the
    parts of the reply whose turn holds its last message, timed from that message."""
    times = ReplyTimes()
    if result.bursts is None:  # not accounted for: nothing to time
        return times
    for burst, outcome in zip(result.tally.sent, result.bursts.outcomes, strict=True):
        last = burst.last
        if outcome.response is None or last is None:
            continue
        turn = stored.get(last[0])
        arrived = deliveries.get(turn, []) if turn is not None else []
        if not arrived:
            continue
        times.first.append(min(arrived) - last[1])
        times.whole.append(max(arrived) - last[1])
        times.parts.append(len(arrived))
    return times


async def spend(database_url: str, since: float) -> dict[str, Any]:
    """Tokens and cost per turn, from the turns table (a turn's own agent call; an agent call
    thrown away, overtaken by a newer message, shows in the LLM requests per turn)."""
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        row = await conn.fetchrow(
            """SELECT count(prompt_tokens) AS billed, avg(prompt_tokens)::float8 AS prompt,
                      avg(completion_tokens)::float8 AS completion, avg(cost)::float8 AS cost,
                      sum(cost)::float8 AS total
                 FROM turns WHERE started_at >= to_timestamp($1)""",
            since,
        )
    finally:
        await conn.close()
    return {
        "billed_turns": row["billed"],
        "prompt_tokens_per_turn": row["prompt"],
        "completion_tokens_per_turn": row["completion"],
        "cost_per_turn_usd": row["cost"],
        "cost_usd": row["total"],
    }


@dataclass
class AgentResult:
    mode: str  # whole | streamed
    bench: ProfileResult
    times: ReplyTimes
    spend: dict[str, Any]
    llm_requests: int  # completions the fake model answered for this daemon

    def summary(self) -> dict[str, Any]:
        parts = self.times.parts
        return {
            **self.bench.summary(),
            "mode": self.mode,
            "stream": self.mode == "streamed",
            "first_message_s": spread(self.times.first),
            "whole_reply_s": spread(self.times.whole),
            "parts_per_reply": ratio(sum(parts), len(parts)),
            "parts_hist": {str(k): v for k, v in sorted(Counter(parts).items())},
            "llm_requests": self.llm_requests,
            "llm_requests_per_turn": ratio(self.llm_requests, self.bench.turns["turns"]),
            **self.spend,
        }


# The figures put side by side (streamed / whole): where to find each in a summary.
_COMPARED: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "first_message_p50": lambda s: s["first_message_s"]["p50"],
    "first_message_p95": lambda s: s["first_message_s"]["p95"],
    "whole_reply_p50": lambda s: s["whole_reply_s"]["p50"],
    "whole_reply_p95": lambda s: s["whole_reply_s"]["p95"],
    "parts_per_reply": lambda s: s["parts_per_reply"],
    "prompt_tokens_per_turn": lambda s: s["prompt_tokens_per_turn"],
    "completion_tokens_per_turn": lambda s: s["completion_tokens_per_turn"],
    "cost_per_turn": lambda s: s["cost_per_turn_usd"],
    "cpu_s_per_turn": lambda s: s.get("cpu_s_per_turn"),
}


def streamed_over_whole(results: Sequence[AgentResult]) -> dict[str, float | None]:
    """Ratios streamed / whole (None where whole's is 0 or either is unknown)."""
    by_mode = {r.mode: r.summary() for r in results}
    whole, streamed = by_mode["whole"], by_mode["streamed"]
    out: dict[str, float | None] = {}
    for name, get in _COMPARED.items():
        a, b = get(whole), get(streamed)
        out[name] = None if a in (None, 0) or b is None else b / a
    return out


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _x(*values: float | None) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}x" for v in values)


def agent_rows(results: Sequence[AgentResult]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The reply-timing table as text: its columns (one per daemon, then streamed / whole)
    and its rows (figure, a value per column)."""
    s = [r.summary() for r in results]
    q = streamed_over_whole(results)

    def pair(key: str) -> list[str]:
        return [f"{_s(x[key]['p50'])} / {_s(x[key]['p95'])}" for x in s]

    usd = ["-" if x["cost_per_turn_usd"] is None else f"{x['cost_per_turn_usd']:.6f}" for x in s]
    tokens = [f"{_n(x['prompt_tokens_per_turn'])} / {_n(x['completion_tokens_per_turn'])}" for x in s]
    rows = [
        ("first message P50/P95 (s)", [*pair("first_message_s"), _x(q["first_message_p50"], q["first_message_p95"])]),
        ("whole reply P50/P95 (s)", [*pair("whole_reply_s"), _x(q["whole_reply_p50"], q["whole_reply_p95"])]),
        ("parts per reply", [*(_s(x["parts_per_reply"]) for x in s), _x(q["parts_per_reply"])]),
        ("replies timed", [*(str(x["first_message_s"]["n"]) for x in s), ""]),
        ("LLM calls / turns", [*(f"{x['llm_requests']} / {x['turns']}" for x in s), ""]),
        ("fallback replies", [*(str(x["fallbacks"]) for x in s), ""]),
        ("tokens in / out per turn", [*tokens, _x(q["prompt_tokens_per_turn"], q["completion_tokens_per_turn"])]),
        ("cost per turn (USD)", [*usd, _x(q["cost_per_turn"])]),
    ]
    return [r.mode for r in results] + ["streamed/whole"], rows


def agent_report(results: Sequence[AgentResult], workload: Workload, pace: LlmPace, profile: str) -> dict[str, Any]:
    """What `--json` writes."""
    return {
        "workload": workload.__dict__,
        "scaled": workload.time_scale != 1,
        "agent": "fake-llm",
        "profile": profile,
        "llm": {
            "ttft_s": pace.ttft,
            "tokens_per_s": pace.tokens_per_s,
            "time_scale": workload.time_scale,
            "price_in_usd_per_mtok": PRICE_IN,
            "price_out_usd_per_mtok": PRICE_OUT,
            "reply_words": len(REPLY.split()),
        },
        "daemons": [r.summary() for r in results],
        "ratios_streamed_over_whole": streamed_over_whole(results),
    }


# --- a run --------------------------------------------------------------------------------


async def run_agent_bench(
    profile: str,
    workload: Workload,
    pace: LlmPace = LlmPace(),
    *,
    config_path: str | None = None,
    progress: Progress | None = None,
) -> list[AgentResult]:
    """The whole and the streamed daemon of `profile`, side by side on the same leads."""
    workload.validated()
    pace.validated()
    base = load_profile(profile)
    ready = base.timeouts.embedded_start * 4
    async with run_fake_evolution(keep_bodies=False) as evolution, contextlib.AsyncExitStack() as stack:
        llms: list[FakeOpenAI] = []
        daemons: list[DaemonUnderTest] = []
        for mode, streamed in MODES:
            llm = await stack.enter_async_context(run_fake_openai())
            pace.apply(llm, workload.time_scale)
            llms.append(llm)
            # Named after the mode: the bench tells its daemons apart by profile name.
            daemon = start_daemon(
                dataclasses.replace(base, name=mode),
                evolution.url,
                workload,
                config_path,
                ready,
                extra_env=agent_env(llm.url, streamed),
            )
            daemons.append(await stack.enter_async_context(daemon))
        since = time.time()
        results = await drive(daemons, evolution, workload, progress=progress)
        out = []
        for (mode, _), llm, d, r in zip(MODES, llms, daemons, results, strict=True):
            ids = [m for b in r.tally.sent for m in b.ids]
            stored, deliveries, _ = await burst_records(d.database_url, since, ids, evolution.delivered_at)
            out.append(
                AgentResult(
                    mode, r, reply_times(r, stored, deliveries), await spend(d.database_url, since), len(llm.requests)
                )
            )
        return out
