"""Configuration: `sdr.toml` (where things are) + a profile (the tuning knobs) + `SDR_` env.

Every setting is a field of a frozen dataclass carrying its help text, unit and allowed
range, so validation, `tune show` and the docs read from one place. Unknown keys are
refused by name (a typo must never silently do nothing)."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.durations import parse_duration
from daemon.errors import ConfigError
from daemon.latency import SPEC_HELP, parse_latency
from daemon.text import phrase

ENV_PREFIX = "SDR_"


def knob(
    default: Any,
    help: str,
    *,
    unit: str = "",
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    check: Callable[[Any], object] | None = None,
    describe: str | None = None,
) -> Any:
    """A setting: its default plus what `tune show` and error messages say about it.
    `check` raises ValueError for a value outside what `describe` says is allowed."""
    meta = {
        "help": help,
        "unit": unit,
        "min": min,
        "max": max,
        "choices": choices,
        "check": check,
        "describe": describe,
    }
    return field(default=default, metadata=meta)


# --- sdr.toml: where things are -------------------------------------------------------


@dataclass(frozen=True)
class DaemonSettings:
    host: str = knob("127.0.0.1", "address `serve` binds to")
    port: int = knob(8080, "TCP port `serve` listens on", min=1, max=65535)
    data_dir: str = knob("./var", "folder of the embedded PostgreSQL and Redis")
    profile: str = knob("recommended", "tuning profile: a name in profiles/ or a .toml path")
    log_level: str = knob("info", "log verbosity", choices=("debug", "info", "warning", "error"))
    log_phones: bool = knob(False, "show leads' phone numbers in logs (debugging only; masked otherwise)")
    log_format: str = knob(
        "text",
        "log lines on stderr: text (for a person) or json (one object a line, for a log shipper)",
        choices=("text", "json"),
    )


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = knob("", "PostgreSQL URL; empty = embedded PostgreSQL under data_dir")
    migrate_url: str = knob(
        "",
        "a direct (not pooled) PostgreSQL URL for `migrate` and serve's pending-migrations check; empty = url",
    )
    pooler: str = knob(
        "auto",
        "what `url` points at: transaction (PgBouncer pool_mode=transaction, Supabase's "
        "port 6543: no statement cache, no session state), none (a direct connection or a "
        "session pooler), auto (transaction for port 6543 or ?pgbouncer=true)",
        choices=("auto", "none", "transaction"),
    )


@dataclass(frozen=True)
class RedisSettings:
    url: str = knob(
        "",
        "Redis URL (redis://, rediss://, unix://; redis+cluster:// or rediss+cluster:// "
        "for a Redis Cluster); empty = embedded Redis under data_dir",
    )
    cluster: bool = knob(False, "url is a node of a Redis Cluster (same as a redis+cluster:// url)")


@dataclass(frozen=True)
class EvolutionSettings:
    base_url: str = knob("", "Evolution API base URL; empty = replies go to the outbox table")
    instance: str = knob("sdr", "Evolution API instance name")
    api_key_env: str = knob("EVOLUTION_API_KEY", "environment variable holding the API key")
    instance_token_env: str = knob(
        "EVOLUTION_INSTANCE_TOKEN",
        "environment variable holding the instance's token, which "
        "Evolution puts in each webhook body's `apikey` (with AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES"
        "=true): a webhook carrying it is accepted without the bearer header (the global webhook "
        "sends no headers); unset = the API key is compared",
    )
    stores_messages: str = knob(
        "auto",
        "whether the Evolution instance keeps message history (DATABASE_SAVE_DATA_NEW_MESSAGE"
        "=true), so findMessages can tell whether a reply arrived and getBase64FromMediaMessage can "
        "fetch media by id: yes, no, or auto (asked once with findMessages for a reply we sent)",
        choices=("auto", "yes", "no"),
    )
    on_uncertain_send: str = knob(
        "resend",
        "a reply whose send may or may not have arrived (timeout, 5xx, connection lost) "
        "that findMessages cannot settle: resend (a possible duplicate) or skip (a possible silence)",
        choices=("resend", "skip"),
    )


@dataclass(frozen=True)
class WebhookSettings:
    token_env: str = knob(
        "SDRCTL_WEBHOOK_TOKEN",
        "environment variable holding the webhook's bearer token; unset = loopback only",
    )
    max_body_bytes: int = knob(
        16 * 1024 * 1024, "largest webhook body accepted", unit="bytes", min=1024, max=64 * 1024 * 1024
    )


@dataclass(frozen=True)
class AgentSettings:
    backend: str = knob(
        "playbook",
        "agent backend: playbook (offline pt-BR flow), openai (any "
        "OpenAI-compatible chat-completions API) or simulated (benches)",
        choices=("playbook", "openai", "simulated"),
    )
    persona: str = knob("Sol", "the agent's first name, as leads see it")
    company: str = knob("Sol Nascente Energia Solar", "the company the agent speaks for")
    base_url: str = knob("https://api.openai.com/v1", "openai backend: the API's base URL")
    model: str = knob("gpt-4o-mini", "openai backend: the model")
    api_key_env: str = knob("OPENAI_API_KEY", "openai backend: environment variable holding the key")
    temperature: float = knob(0.3, "openai backend: sampling temperature", min=0, max=2)
    price_in: float = knob(
        0.0, "a million prompt tokens, in the currency the provider bills; 0 = costs not computed", min=0, max=10**6
    )
    price_out: float = knob(0.0, "a million completion tokens, likewise", min=0, max=10**6)
    max_tokens: int = knob(400, "openai backend: longest reply", unit="tokens", min=16, max=8192)
    max_tool_rounds: int = knob(
        3, "openai backend: rounds of tool calls a turn may make before the model must answer", min=0, max=10
    )
    stream: bool = knob(True, "openai backend: stream the reply and send each paragraph the moment it is complete")
    stream_min_part: int = knob(
        40, "streamed replies: a paragraph shorter than this waits for the next", unit="chars", min=1, max=4096
    )
    rate_limit_retries: int = knob(
        2,
        "openai backend: a 429/503's Retry-After waited out this often, when it fits the agent timeout",
        min=0,
        max=10,
    )
    leak_words: int = knob(
        12,
        "openai backend: a reply repeating this many consecutive words of the system prompt gets the fallback",
        unit="words",
        min=5,
        max=200,
    )
    transcription_url: str = knob(
        "",
        "voice notes: an OpenAI-compatible API base URL for /audio/transcriptions; empty = "
        "no transcription (the agent asks the lead to type)",
    )
    transcription_model: str = knob("whisper-1", "voice notes: the transcription model")
    vision_model: str = knob(
        "", "openai backend: a vision-capable model that also gets the lead's photos; empty = text only"
    )
    simulated_latency: str = knob(
        "lognormal:median=1.5,p95=4",
        "simulated backend: latency distribution",
        check=parse_latency,
        describe=SPEC_HELP,
    )


@dataclass(frozen=True)
class SloSettings:
    response_p95: float = knob(5.0, "P95 response time target", unit="s", min=0.1, max=120)
    timeout_rate: float = knob(0.01, "highest share of turns with a timeout", min=0, max=1)
    cache_hit_rate: float = knob(0.8, "lowest cache hit rate", min=0, max=1)
    concurrent_leads: int = knob(100, "concurrent leads the SLO must hold for", min=1, max=10**6)


def parse_durations(text: str) -> list[float]:
    """ "30m, 24h" -> [1800.0, 86400.0]: delays as people write them (daemon/durations.py)."""
    return [parse_duration(part) for part in text.split(",") if part.strip()]


def parse_clock(text: str) -> tuple[int, int]:
    hour, _, minute = text.partition(":")
    h, m = int(hour), int(minute or 0)
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise ValueError(text)
    return h, m


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_days(text: str) -> set[int]:
    days = {d.strip().lower() for d in text.split(",") if d.strip()}
    if not days or days - set(WEEKDAYS):
        raise ValueError(text)
    return {WEEKDAYS.index(d) for d in days}


def _timezone(name: str) -> object:
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


@dataclass(frozen=True)
class FollowUpSettings:
    """[followups] in sdr.toml: what is sent and when (business hours, delays, templates,
    the CRM). The profile's [followups] (FollowUpKnobs) says how the scheduler runs."""

    enabled: bool = knob(True, "send follow-ups (re-engagement, nurturing, meeting reminders)")
    timezone: str = knob(
        "America/Sao_Paulo",
        "the business's time zone (IANA name)",
        check=_timezone,
        describe="an IANA time zone such as America/Sao_Paulo",
    )
    business_days: str = knob(
        "mon,tue,wed,thu,fri,sat",
        "days follow-ups may be sent",
        check=parse_days,
        describe="comma-separated mon,tue,wed,thu,fri,sat,sun",
    )
    business_start: str = knob("08:00", "opening time (HH:MM, local)", check=parse_clock, describe="HH:MM")
    business_end: str = knob("20:00", "closing time (HH:MM, local)", check=parse_clock, describe="HH:MM")
    reengage_after: str = knob(
        "30m, 24h",
        "silence after our last reply before each re-engagement (mid-qualification)",
        check=parse_durations,
        describe="comma-separated durations such as 30m, 24h (s, m, h, d, w; decimals allowed)",
    )
    nurture_every: str = knob(
        "24h",
        "interval of nurturing messages after the re-engagements (and for leads who said 'not now')",
        check=parse_durations,
        describe="a duration such as 24h",
    )
    nurture_count: int = knob(3, "nurturing messages at most", min=0, max=100)
    meeting_confirm_after: str = knob(
        "2m",
        "delay of the meeting confirmation after a meeting is booked",
        check=parse_durations,
        describe="a duration such as 2m",
    )
    meeting_reminders: str = knob(
        "24h, 2h",
        "reminders this long before a meeting",
        check=parse_durations,
        describe="comma-separated durations such as 24h, 2h",
    )
    savings_rate: float = knob(0.9, "share of the bill a lead saves (for {savings})", min=0, max=1)
    reengage_template: str = knob(
        "Oi{name_comma}! Ficou alguma dúvida sobre a energia solar? Com uma conta de {bill_value}, "
        "dá para economizar cerca de {savings} por mês. Posso te ajudar a continuar?",
        "re-engagement message ({name}, {name_comma}, {bill_value}, {savings})",
    )
    nurture_template: str = knob(
        "Oi{name_comma}! Passando para lembrar que a energia solar pode reduzir sua conta de luz "
        "em até 90%. Quando quiser conversar, é só me chamar por aqui ☀️",
        "nurturing message (same placeholders)",
    )
    meeting_confirmation_template: str = knob(
        "Confirmado{name_comma}! Sua conversa com um consultor está marcada para {meeting}. "
        "Qualquer mudança, é só me avisar por aqui.",
        "meeting confirmation ({meeting} too)",
    )
    meeting_reminder_template: str = knob(
        "Oi{name_comma}! Lembrete: sua conversa com um consultor é {meeting}. Até lá! ☀️",
        "meeting reminder ({meeting} too)",
    )
    agent_followup_template: str = knob(
        "Oi{name_comma}! Conforme combinamos, estou passando para retomar nossa conversa sobre energia "
        "solar. Podemos continuar?",
        "the follow-up the agent scheduled with the lead (schedule_followup; same placeholders)",
    )
    agent_followup_min: str = knob(
        "1h",
        "schedule_followup: the shortest delay the agent may ask for",
        check=parse_durations,
        describe="a duration",
    )
    agent_followup_max: str = knob(
        "30d", "schedule_followup: the longest", check=parse_durations, describe="a duration such as 30d"
    )
    meeting_notice: str = knob(
        "1h", "book_meeting: the earliest meeting, from now", check=parse_durations, describe="a duration"
    )
    meeting_horizon: str = knob(
        "60d", "book_meeting: the latest meeting, from now", check=parse_durations, describe="a duration"
    )
    meeting_length: str = knob(
        "20m", "book_meeting: a meeting ends inside business hours too", check=parse_durations, describe="a duration"
    )
    crm_url: str = knob("", "POST lead changes as JSON batches here; empty = no CRM push")


def parse_phones(text: str) -> list[str]:
    """ "5511999990000, 5511988887777" -> the numbers, digits only (10 to 15 of them)."""
    phones = [p.strip().lstrip("+") for p in text.split(",") if p.strip()]
    for p in phones:
        if not (p.isdigit() and 10 <= len(p) <= 15):
            raise ValueError(p)
    return phones


def parse_phrases(text: str) -> list[str]:
    """ "parar, sair" -> the phrases, as matched (daemon.text.phrase)."""
    phrases = [phrase(p) for p in text.split(",") if phrase(p)]
    if not phrases:
        raise ValueError(text)
    return phrases


@dataclass(frozen=True)
class HandoverSettings:
    """[handover] in sdr.toml: people beside the bot (a consultant who takes over a chat, a
    lead who asks for one), who the bot never answers, and what it says when it steps back."""

    notify_url: str = knob("", "POST a JSON notice here when the bot hands a lead to a person; empty = none")
    ignore: str = knob(
        "",
        "numbers the bot never answers (staff, partners, test phones); `sdrctl leads ignore` adds more",
        check=parse_phones,
        describe="comma-separated phone numbers, digits only (10 to 15), such as 5511999990000",
    )
    handoff_reply: str = knob(
        "Claro! Vou chamar um consultor da nossa equipe para falar com você por aqui. Ele te responde em breve 😊",
        "what the bot says when it hands the lead to a person",
    )
    opt_out_reply: str = knob(
        "Tudo bem! Você não vai mais receber mensagens automáticas nossas. Se quiser voltar a "
        "conversar, é só mandar uma mensagem por aqui.",
        "the one confirmation of an opt-out",
    )
    opt_in_reply: str = knob(
        "Que bom te ver de volta! Voltamos a te mandar novidades por aqui. Como posso te ajudar?",
        "the confirmation when a lead who opted out asks to receive messages again",
    )


@dataclass(frozen=True)
class KnowledgeSettings:
    """[knowledge] in sdr.toml: how the knowledge base is searched. Without an embeddings
    endpoint, full-text (Portuguese) only; with one, full-text and vector similarity fused
    by reciprocal rank."""

    embeddings_url: str = knob("", "an OpenAI-compatible API base URL for /embeddings; empty = full-text search only")
    embeddings_model: str = knob("text-embedding-3-small", "the embeddings model")
    api_key_env: str = knob("OPENAI_API_KEY", "environment variable holding the embeddings API's key")
    candidates: int = knob(20, "entries each signal ranks before they are fused", min=1, max=1000)
    embed_batch: int = knob(
        64, "entries per /embeddings request when their vectors are made", unit="entries", min=1, max=2048
    )
    rrf_k: int = knob(
        60, "reciprocal rank fusion's k: a larger k weighs the signals' lower ranks more", min=1, max=1000
    )


def _otlp_url(value: str) -> None:
    if value and not (value.startswith(("http://", "https://")) and len(value.split("://", 1)[1]) > 0):
        raise ValueError


@dataclass(frozen=True)
class TelemetrySettings:
    """[telemetry] in sdr.toml: traces of each turn (OpenTelemetry), sent over OTLP/HTTP."""

    otlp_endpoint: str = knob(
        "",
        "an OpenTelemetry collector's OTLP/HTTP address for the traces of each turn, e.g. "
        "http://127.0.0.1:4318 (/v1/traces is added to a URL without a path); empty = no tracing, at no cost",
        check=_otlp_url,
        describe="an http:// or https:// URL, or empty",
    )


# --- profiles/NAME.toml: the tuning knobs ---------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    webhook: float = knob(20.0, "whole webhook request, intake to 200", unit="s", min=0.1, max=300)
    request_read: float = knob(
        10.0,
        "a request's headers and body must all arrive within this time of its first byte (or of "
        "the connection's opening), else the connection is closed (slow clients); 0 = no limit",
        unit="s",
        min=0,
        max=300,
    )
    keep_alive: float = knob(
        5.0,
        "an idle keep-alive connection is closed after this long (a proxy in front should "
        "close its idle connections to us sooner)",
        unit="s",
        min=0.1,
        max=300,
    )
    reply_hold: float = knob(
        30.0,
        "longest a finished reply waits for a lead who is still typing ([buffer] speculate)",
        unit="s",
        min=0,
        max=300,
    )
    message_buffer: float = knob(
        20.0, "upper bound of a lead's buffer window (first message -> turn)", unit="s", min=0.05, max=60
    )
    agent: float = knob(30.0, "agent call for one turn", unit="s", min=0.05, max=300)
    multimodal: float = knob(20.0, "whole media analysis of a turn", unit="s", min=0.05, max=300)
    audio_processing: float = knob(15.0, "voice note conversion", unit="s", min=0.05, max=300)
    image_processing: float = knob(10.0, "image preparation; 0 = no limit (legacy)", unit="s", min=0, max=300)
    evolution_read: float = knob(15.0, "reads from the Evolution API", unit="s", min=0.05, max=300)
    evolution_send: float = knob(10.0, "one sendText call", unit="s", min=0.05, max=300)
    knowledge_base: float = knob(2.0, "knowledge-base search", unit="s", min=0.01, max=60)
    embeddings: float = knob(
        0.5,
        "one embeddings call (a question's vector); past it the search is full-text only, within knowledge_base",
        unit="s",
        min=0.01,
        max=60,
    )
    embeddings_import: float = knob(
        120.0, "one embeddings request of up to 64 entries, at import", unit="s", min=0.1, max=3600
    )
    personalization: float = knob(15.0, "loading the lead and history", unit="s", min=0.01, max=300)
    redis_lock_ttl: float = knob(10.0, "lead lock TTL", unit="s", min=0.1, max=600)
    database: float = knob(5.0, "one database operation on the hot path", unit="s", min=0.01, max=120)
    redis: float = knob(2.0, "connect/read timeout of one Redis command", unit="s", min=0.01, max=60)
    shutdown_grace: float = knob(10.0, "time in-flight turns get to finish on shutdown", unit="s", min=0, max=600)
    embedded_start: float = knob(15.0, "start of the embedded Redis (and readiness waits)", unit="s", min=0.5, max=300)


@dataclass(frozen=True)
class Buffer:
    coalesce: bool = knob(True, "join a lead's burst into one turn (false: a turn per message)")
    adaptive: bool = knob(True, "adapt the window to context (false: always quiet_window)")
    quiet_window: float = knob(
        1.0, "silence after a lead's last message that closes the burst", unit="s", min=0.01, max=60
    )
    min_window: float = knob(
        0.5, "shortest window: after a question or a long complete message", unit="s", min=0, max=60
    )
    extended_window: float = knob(
        3.0, "window while the lead is typing or recording, or after media", unit="s", min=0.01, max=60
    )
    long_message_chars: int = knob(
        120, "a complete message at least this long closes the window sooner", unit="chars", min=1, max=10000
    )
    poll_interval: float = knob(
        0.01,
        "least wait between two claims of due bursts (a claim runs when the soonest window closes)",
        unit="s",
        min=0.005,
        max=5,
    )
    claim_idle: float = knob(
        0.5,
        "longest wait between two claims: how late a burst armed by a daemon that died is claimed by another",
        unit="s",
        min=0.01,
        max=30,
    )
    claim_batch: int = knob(64, "due leads claimed per poll", min=1, max=10000)
    sweep_interval: float = knob(
        30.0,
        "how often messages left unanswered past a whole turn's time are re-queued (a safety net)",
        unit="s",
        min=1,
        max=3600,
    )
    speculate: bool = knob(
        True,
        "start the agent when the window closes, but send its reply only once the lead has been "
        "quiet for settle_window (presence_settle) and is not typing; a reply overtaken by a newer "
        "message is thrown away and the whole burst answered again",
    )
    settle_window: float = knob(
        5.0,
        "silence after a lead's last message before a reply may be sent (speculate), for a lead "
        "whose typing presence is not seen",
        unit="s",
        min=0,
        max=120,
    )
    presence_settle: float = knob(
        3.0,
        "the same for a lead whose typing presence was seen within presence_memory: 'composing' "
        "holds the reply, so only the pause before typing has to be waited out",
        unit="s",
        min=0,
        max=120,
    )
    typing_ttl: float = knob(
        10.0,
        "a lead's 'composing' counts this long unless refreshed, ended by 'paused' or by a message",
        unit="s",
        min=0.1,
        max=120,
    )
    presence_memory: float = knob(
        3600.0, "a lead whose presence was seen this recently is known to send it", unit="s", min=1, max=86400 * 30
    )
    hold_poll: float = knob(
        0.25, "how often a held reply checks for a newer message or typing", unit="s", min=0.005, max=5
    )


@dataclass(frozen=True)
class Pools:
    db_min_size: int = knob(2, "PostgreSQL pool: connections kept open", min=1, max=500)
    db_max_size: int = knob(10, "PostgreSQL pool: most connections", min=1, max=500)
    redis_max_connections: int = knob(50, "Redis pool: most connections", min=1, max=10000)
    http_max_connections: int = knob(50, "Evolution API client: most connections", min=1, max=10000)
    agent_pool_size: int = knob(256, "agent calls running at once", min=1, max=10000)
    webhooks_in_flight: int = knob(
        2000,
        "webhook requests handled at once (open connections do not count); more get 503 (Evolution retries)",
        min=1,
        max=10**6,
    )
    ingest_batch: int = knob(256, "most webhook messages stored in one round trip (group commit)", min=1, max=10000)
    ingest_flushes: int = knob(
        2, "group commits in flight at once, each on its own PostgreSQL connection", min=1, max=64
    )


@dataclass(frozen=True)
class Limits:
    history_limit: int = knob(50, "messages of history given to the agent", min=1, max=1000)
    history_tokens: int = knob(
        3000,
        "history given to the model, at most (about 4 characters a token; the oldest messages go first)",
        unit="tokens",
        min=100,
        max=1_000_000,
    )
    kb_results: int = knob(3, "knowledge-base entries per search", min=1, max=50)
    lock_attempts: int = knob(
        3, "tries to take a busy lead's lock (after asking its holder to hand it back)", min=1, max=100
    )
    lock_backoff: float = knob(0.005, "first wait between lock tries (doubles)", unit="s", min=0.0001, max=10)
    send_attempts: int = knob(3, "tries of a sendText that certainly did not arrive", min=1, max=20)
    send_backoff: float = knob(0.2, "first wait between send tries (doubles)", unit="s", min=0.001, max=30)
    max_message_length: int = knob(
        1000, "longer replies are split on sentence boundaries", unit="chars", min=50, max=65536
    )
    redeliver_interval: float = knob(
        5.0,
        "how often replies that did not go out (5xx, timeout, no connection, a dead daemon) are re-sent",
        unit="s",
        min=0.01,
        max=3600,
    )
    redeliver_attempts: int = knob(10, "sends of one reply, in all, before it is marked failed", min=1, max=100)
    redeliver_backoff: float = knob(
        5.0,
        "wait before re-sending a reply that did not go out (doubles per try, at most an hour)",
        unit="s",
        min=0,
        max=3600,
    )
    redeliver_within: float = knob(
        1800.0,
        "a reply not delivered this long after its turn is given up (marked failed): later, "
        "it no longer answers anything",
        unit="s",
        min=1,
        max=7 * 86400,
    )
    uncertain_look_back: int = knob(
        3,
        "pages of the Evolution instance's message history (findMessages, newest first) searched "
        "for a reply whose send is uncertain, before it is sent again",
        min=1,
        max=50,
    )
    lead_rate: float = knob(
        5.0,
        "webhooks per second one lead may sustain (per daemon); more get 429; 0 = no limit",
        unit="1/s",
        min=0,
        max=100000,
    )
    lead_burst: int = knob(30, "webhooks one lead may send at once before lead_rate applies", min=1, max=100000)
    error_log_interval: float = knob(
        30.0,
        "a failure that lasts (due bursts that cannot be claimed, webhooks refused as too many "
        "in flight) is logged once per this interval, not once per occurrence",
        unit="s",
        min=0.1,
        max=3600,
    )
    rate_tracked_leads: int = knob(
        100_000, "leads the rate limiter remembers (least recently seen forgotten first)", min=100, max=10**7
    )


@dataclass(frozen=True)
class Features:
    parallel_context: bool = knob(
        True, "start lead, history and knowledge search together (false: search first, then the rest)"
    )
    typing_presence: bool = knob(True, "show 'typing...' to the lead while a slow turn runs")
    typing_after: float = knob(
        1.0,
        "show 'typing...' only once a turn has run this long (quick replies need none)",
        unit="s",
        min=0,
        max=60,
    )


@dataclass(frozen=True)
class Cache:
    enabled: bool = knob(True, "use the caches (false: every read goes to PostgreSQL)")
    local_ttl: float = knob(30.0, "longest life of an entry in the in-process tier", unit="s", min=0, max=86400)
    lead_ttl: float = knob(300.0, "lead-by-phone entries", unit="s", min=1, max=86400)
    lead_size: int = knob(10000, "lead-by-phone: most entries in process", min=1, max=10**7)
    kb_ttl: float = knob(600.0, "knowledge-base search results", unit="s", min=1, max=86400)
    kb_size: int = knob(2000, "knowledge-base search results: most entries in process", min=1, max=10**7)
    embedding_ttl: float = knob(86400.0, "a question's embedding (for vector search)", unit="s", min=1, max=10**7)
    embedding_size: int = knob(5000, "questions' embeddings: most entries in process", min=1, max=10**7)


@dataclass(frozen=True)
class Media:
    max_image_bytes: int = knob(
        10 * 1024 * 1024,
        "largest image accepted, estimated from the base64 length before decoding",
        unit="bytes",
        min=1024,
        max=100 * 1024 * 1024,
    )
    max_pixels: int = knob(
        40_000_000,
        "largest image accepted, width x height, read from the header before decoding",
        unit="pixels",
        min=10_000,
        max=500_000_000,
    )
    max_dimension: int = knob(1920, "images are downscaled to fit this many pixels a side", unit="px", min=64, max=8192)
    jpeg_quality: int = knob(85, "quality of the prepared JPEG (OCR and vision models)", min=30, max=95)
    workers: int = knob(2, "media worker processes (image decoding off the event loop and its GIL)", min=1, max=64)
    ocr: bool = knob(True, "read electricity bills with Tesseract when it is installed")
    max_audio_seconds: float = knob(
        120.0, "longest voice note accepted; longer ones get a polite answer", unit="s", min=1, max=3600
    )
    result_ttl: float = knob(
        86400.0, "cached analysis of an image or note, by content hash", unit="s", min=1, max=30 * 86400
    )
    result_size: int = knob(1000, "cached media analyses: most entries in process", min=1, max=10**6)


@dataclass(frozen=True)
class FollowUpKnobs:
    """[followups] in a profile: how the scheduler runs (polling, batches, retries), tuned
    like every other knob. What is sent is sdr.toml's [followups] (FollowUpSettings)."""

    poll_interval: float = knob(5.0, "how often the scheduler claims due follow-ups", unit="s", min=0.01, max=3600)
    claim_batch: int = knob(50, "due follow-ups claimed at most per poll", min=1, max=10000)
    concurrency: int = knob(3, "follow-ups being sent at once", min=1, max=1000)
    max_attempts: int = knob(3, "sends of one follow-up before it is marked failed", min=1, max=100)
    retry_backoff: float = knob(60.0, "first retry delay (doubles each time)", unit="s", min=0, max=86400)
    stuck_after: float = knob(
        300.0, "a follow-up 'executing' this long is reclaimed (its daemon died)", unit="s", min=1, max=86400
    )
    busy_delay: float = knob(30.0, "retry delay when the lead is in a live turn", unit="s", min=0, max=3600)
    kb_refresh_interval: float = knob(600.0, "knowledge-base cache refresh", unit="s", min=1, max=86400)
    crm_interval: float = knob(60.0, "CRM push interval", unit="s", min=1, max=86400)
    crm_batch: int = knob(100, "leads per CRM push request", min=1, max=10000)
    crm_concurrency: int = knob(2, "CRM push requests at once", min=1, max=100)
    crm_attempts: int = knob(3, "tries of one CRM push request", min=1, max=100)
    crm_timeout: float = knob(10.0, "one CRM push request", unit="s", min=0.1, max=300)
    crm_backoff: float = knob(1.0, "first retry delay of a CRM push request (doubles)", unit="s", min=0, max=3600)


# The shipped opt-out phrases (profiles/*.toml repeat them, for operators to edit).
OPT_OUT = (
    "parar",
    "pare",
    "sair",
    "stop",
    "cancelar",
    "descadastrar",
    "remover",
    "nao quero mais",
    "nao quero mais receber",
    "nao quero mais receber mensagens",
    "nao quero receber mais mensagens",
    "nao quero mais mensagens",
    "nao me mande mais mensagens",
    "para de me mandar mensagem",
    "pare de me mandar mensagens",
    "para de mandar mensagem",
    "parar de receber",
    "parar de receber mensagem",
    "parar de mandar mensagem",
    "chega de mensagem",
    "remover meu numero",
    "remova meu numero",
    "tira meu numero",
    "descadastrar meu numero",
    "me tira da lista",
    "me remove da lista",
)


@dataclass(frozen=True)
class HandoverKnobs:
    """[handover] in a profile: how long the bot steps back, how a hand-off notice is sent,
    and the phrases (pt-BR, accents and case ignored) that are a whole-message intent."""

    pause: float = knob(
        43200.0, "the bot's silence after a person writes to the lead (a working day)", unit="s", min=60, max=30 * 86400
    )
    notify_timeout: float = knob(5.0, "one hand-off notice request", unit="s", min=0.1, max=120)
    notify_attempts: int = knob(5, "tries of one hand-off notice", min=1, max=50)
    notify_backoff: float = knob(2.0, "first retry delay of a notice (doubles)", unit="s", min=0, max=3600)
    notify_queue: int = knob(1000, "notices waiting at most (more are dropped, and counted)", min=1, max=10**6)
    opt_out_phrases: str = knob(
        ", ".join(OPT_OUT),
        "a lead's whole message that means 'stop messaging me'",
        check=parse_phrases,
        describe="comma-separated phrases",
    )
    opt_in_phrases: str = knob(
        "voltar, quero voltar, quero voltar a receber, pode voltar a mandar, quero receber de novo",
        "a whole message that undoes an opt-out",
        check=parse_phrases,
        describe="comma-separated phrases",
    )
    handoff_phrases: str = knob(
        "atendente, humano, pessoa, falar com atendente, falar com um atendente, falar com uma pessoa, "
        "falar com humano, falar com um humano, quero falar com uma pessoa, quero falar com um atendente, "
        "quero um atendente, tem alguem ai, isso e um robo, voce e um robo, e um robo, "
        # Anger, as a whole message, wants a person too (inside a sentence it is often the
        # bill: "minha conta de luz está um absurdo").
        "que palhacada, palhacada, que absurdo, ridiculo, que ridiculo, voces sao pessimos, pessimo atendimento, "
        "que lixo, robo burro",
        "a whole message that asks for a person (or is angry)",
        check=parse_phrases,
        describe="comma-separated phrases",
    )


PROFILE_SECTIONS: dict[str, type] = {
    "timeouts": Timeouts,
    "buffer": Buffer,
    "pools": Pools,
    "limits": Limits,
    "features": Features,
    "cache": Cache,
    "media": Media,
    "followups": FollowUpKnobs,
    "handover": HandoverKnobs,
}
SETTINGS_SECTIONS: dict[str, type] = {
    "daemon": DaemonSettings,
    "database": DatabaseSettings,
    "redis": RedisSettings,
    "evolution": EvolutionSettings,
    "webhook": WebhookSettings,
    "agent": AgentSettings,
    "slo": SloSettings,
    "followups": FollowUpSettings,
    "handover": HandoverSettings,
    "knowledge": KnowledgeSettings,
    "telemetry": TelemetrySettings,
}


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    timeouts: Timeouts = field(default_factory=Timeouts)
    buffer: Buffer = field(default_factory=Buffer)
    pools: Pools = field(default_factory=Pools)
    limits: Limits = field(default_factory=Limits)
    features: Features = field(default_factory=Features)
    cache: Cache = field(default_factory=Cache)
    media: Media = field(default_factory=Media)
    followups: FollowUpKnobs = field(default_factory=FollowUpKnobs)
    handover: HandoverKnobs = field(default_factory=HandoverKnobs)


@dataclass(frozen=True)
class Config:
    source: str
    profile: Profile
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    evolution: EvolutionSettings = field(default_factory=EvolutionSettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    slo: SloSettings = field(default_factory=SloSettings)
    followups: FollowUpSettings = field(default_factory=FollowUpSettings)
    handover: HandoverSettings = field(default_factory=HandoverSettings)
    knowledge: KnowledgeSettings = field(default_factory=KnowledgeSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    # Secrets are read from the variables the file names; never printed.
    webhook_token: str | None = field(default=None, repr=False)
    evolution_api_key: str | None = field(default=None, repr=False)
    evolution_instance_token: str | None = field(default=None, repr=False)
    agent_api_key: str | None = field(default=None, repr=False)
    embeddings_api_key: str | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return Path(self.daemon.data_dir).expanduser().resolve()


# --- locating shipped files -----------------------------------------------------------


def shipped_path(name: str) -> Path:
    """profiles/ or sql/: from the checkout, else from the installed package."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / name).exists():
        return root / name
    return Path(__file__).resolve().parent / "_data" / name


def available_profiles() -> list[str]:
    names = {p.stem for p in shipped_path("profiles").glob("*.toml")}
    names |= {p.stem for p in Path("profiles").glob("*.toml")}
    return sorted(names)


def profile_path(name: str) -> Path:
    if name.endswith(".toml") or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"profile file {path} does not exist")
        return path
    for folder in (Path("profiles"), shipped_path("profiles")):
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    raise ConfigError(
        f"profile {name!r} not found; available: {', '.join(available_profiles())} (or give a path to a .toml file)"
    )


# --- parsing and validation -----------------------------------------------------------


def describe_knob(f: dataclasses.Field[Any]) -> str:
    meta = f.metadata
    if meta["describe"]:
        return str(meta["describe"])
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[_type_of(f)]
    if meta["min"] is not None and meta["max"] is not None:
        kind += f" from {meta['min']:g} to {meta['max']:g}"
    return kind + (f" ({meta['unit']})" if meta["unit"] else "")


def _type_of(f: dataclasses.Field[Any]) -> type:
    return {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]


def coerce_value(f: dataclasses.Field[Any], value: Any, from_env: bool) -> Any:
    """Returns the value as the field's type, or raises ValueError saying what is allowed."""
    kind = _type_of(f)
    if from_env and kind is not str:
        text = str(value).strip()
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            value = text.lower() in ("true", "1", "yes")
        else:
            value = kind(text)  # raises ValueError
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError
    meta = f.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError
    if meta["min"] is not None and value < meta["min"]:
        raise ValueError
    if meta["max"] is not None and value > meta["max"]:
        raise ValueError
    if meta["check"] is not None:
        meta["check"](value)
    return value


def _build_section(cls: type, section: str, values: Mapping[str, Any], where: str, env_keys: Mapping[str, str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key [{section}] {unknown[0]}; allowed: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        env_name = f"{ENV_PREFIX}{section.upper()}_{name.upper()}"
        if env_name in env_keys:
            raw, origin, from_env = env_keys[env_name], f"environment {env_name}", True
        elif name in values:
            raw, origin, from_env = values[name], f"{where}: [{section}] {name}", False
        else:
            continue
        try:
            kwargs[name] = coerce_value(f, raw, from_env)
        except (ValueError, TypeError):
            raise ConfigError(f"{origin} = {raw!r}: must be {describe_knob(f)}") from None
    return cls(**kwargs)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None


def _sections(doc: Mapping[str, Any], allowed: Mapping[str, type], where: str) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for key, value in doc.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown section [{key}]; allowed: {', '.join(allowed)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a [{key}] table")
        out[key] = value
    return out


def load_profile(name: str, env: Mapping[str, str] | None = None) -> Profile:
    env = os.environ if env is None else env
    path = profile_path(name)
    where = str(path)
    doc = _sections(_read_toml(path), PROFILE_SECTIONS, where)
    built = {sec: _build_section(cls, sec, doc.get(sec, {}), where, env) for sec, cls in PROFILE_SECTIONS.items()}
    profile = Profile(name=path.stem, source=where, **built)
    _check_relations(profile, where)
    return profile


def _check_relations(p: Profile, where: str) -> None:
    if p.buffer.quiet_window > p.timeouts.message_buffer:
        raise ConfigError(
            f"{where}: [buffer] quiet_window = {p.buffer.quiet_window:g} must not exceed "
            f"[timeouts] message_buffer = {p.timeouts.message_buffer:g} (the window's upper bound)"
        )
    if not p.buffer.min_window <= p.buffer.quiet_window <= p.buffer.extended_window:
        raise ConfigError(
            f"{where}: [buffer] windows must satisfy min_window ({p.buffer.min_window:g}) <= "
            f"quiet_window ({p.buffer.quiet_window:g}) <= extended_window ({p.buffer.extended_window:g})"
        )
    if p.pools.db_min_size > p.pools.db_max_size:
        raise ConfigError(
            f"{where}: [pools] db_min_size = {p.pools.db_min_size} must not exceed db_max_size = {p.pools.db_max_size}"
        )


def load_config(
    path: str | Path | None = None,
    profile: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Reads sdr.toml (default: ./sdr.toml when present, else built-in defaults), the
    profile it names (or `profile`), and `SDR_<SECTION>_<KEY>` overrides from `env`."""
    env = dict(os.environ if env is None else env)
    if path is None:
        path = Path("sdr.toml") if Path("sdr.toml").is_file() else None
    where = str(path) if path is not None else "built-in defaults"
    doc = _sections(_read_toml(Path(path)), SETTINGS_SECTIONS, where) if path else {}
    settings = {sec: _build_section(cls, sec, doc.get(sec, {}), where, env) for sec, cls in SETTINGS_SECTIONS.items()}
    _refuse_unknown_env(env, settings)
    _check_settings(settings, where)
    chosen = profile or settings["daemon"].profile
    token_env = settings["webhook"].token_env
    key_env = settings["evolution"].api_key_env
    agent_key_env = settings["agent"].api_key_env
    return Config(
        source=where,
        profile=load_profile(chosen, env),
        webhook_token=env.get(token_env) or None,
        evolution_api_key=env.get(key_env) or None,
        evolution_instance_token=env.get(settings["evolution"].instance_token_env) or None,
        agent_api_key=env.get(agent_key_env) or None,
        embeddings_api_key=env.get(settings["knowledge"].api_key_env) or None,
        **settings,
    )


def _check_settings(settings: Mapping[str, Any], where: str) -> None:
    f = settings["followups"]
    if parse_clock(f.business_start) >= parse_clock(f.business_end):
        raise ConfigError(
            f"{where}: [followups] business_start = {f.business_start!r} must be before "
            f"business_end = {f.business_end!r}"
        )


def _refuse_unknown_env(env: Mapping[str, str], settings: Mapping[str, Any]) -> None:
    secrets = {
        settings["webhook"].token_env,
        settings["evolution"].api_key_env,
        settings["agent"].api_key_env,
        settings["knowledge"].api_key_env,
    }
    known = {
        f"{ENV_PREFIX}{sec.upper()}_{f.name.upper()}"
        for sections in (SETTINGS_SECTIONS, PROFILE_SECTIONS)
        for sec, cls in sections.items()
        for f in dataclasses.fields(cls)
    }
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known and name not in secrets:
            raise ConfigError(
                f"environment {name}: unknown setting; use {ENV_PREFIX}<SECTION>_<KEY> "
                "with a key listed in sdr.toml or the profile"
            )
