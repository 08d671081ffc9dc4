"""Prometheus series. One registry per runtime, so tests can run several daemons in one
process and each /metrics shows only its own."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.response_time = Histogram(
            "sdr_response_time_seconds",
            "Lead's last message of a burst -> reply sent",
            buckets=BUCKETS,
            registry=r,
        )
        self.stage_time = Histogram(
            "sdr_stage_seconds",
            "Time spent in each turn stage",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.timeouts = Counter("sdr_timeouts_total", "Stages that timed out", ["stage"], registry=r)
        self.failures = Counter("sdr_stage_failures_total", "Stages that failed", ["stage"], registry=r)
        self.webhooks = Counter("sdr_webhooks_total", "Webhook requests by outcome", ["outcome"], registry=r)
        self.read_timeouts = Counter(
            "sdr_http_read_timeouts_total",
            "Connections closed because a request did not arrive whole within [timeouts] request_read",
            registry=r,
        )
        self.ignored = Counter("sdr_ignored_total", "Events not from a lead, by reason", ["reason"], registry=r)
        self.turns = Counter("sdr_turns_total", "Turns by outcome", ["outcome"], registry=r)
        self.discarded = Counter(
            "sdr_replies_discarded_total",
            "Agent replies thrown away: overtaken by a newer message of the lead, or written by a turn that"
            " lost the lead (lapsed, fenced); each an agent call",
            ["reason"],
            registry=r,
        )
        self.agent_tokens = Counter(
            "sdr_agent_tokens_total",
            "Tokens the agent's model billed, by kind (prompt, completion)",
            ["kind"],
            registry=r,
        )
        self.kb_degraded = Counter(
            "sdr_knowledge_fulltext_only_total",
            "Knowledge searches that wanted the question's embedding and answered on full-text alone"
            " (the embeddings endpoint timed out or failed)",
            registry=r,
        )
        self.agent_tools = Counter(
            "sdr_agent_tool_calls_total",
            "Tool calls of the agent's model, by tool and outcome (accepted, refused: outside its rules)",
            ["tool", "outcome"],
            registry=r,
        )
        self.agent_cost = Counter(
            "sdr_agent_cost_total", "What the agent's model billed, at [agent] price_in/price_out", registry=r
        )
        self.handover = Counter(
            "sdr_handover_total",
            "People beside the bot: takeover (a person wrote from the business phone), handoff (the bot"
            " asked for one), opt_out, opt_in, suppressed (a reply not sent: the lead is paused or ignored)",
            ["kind"],
            registry=r,
        )
        self.handover_notices = Counter(
            "sdr_handover_notices_total",
            "Hand-off notices to [handover] notify_url, by outcome",
            ["outcome"],
            registry=r,
        )
        self.fenced = Counter(
            "sdr_turns_fenced_total",
            "Turns and follow-up sends stopped because their lock lapsed (lapsed) or a newer lock holder's"
            " fencing token refused their write (fenced)",
            ["reason"],
            registry=r,
        )
        self.sends = Counter("sdr_sends_total", "Replies delivered, by status", ["status"], registry=r)
        # sendText answers that were not a delivery: transient (retried), uncertain (looked
        # up before any re-send), unreachable (exists: false), refused (another 4xx).
        self.send_errors = Counter("sdr_send_errors_total", "sendText failures, by kind", ["kind"], registry=r)
        self.uncertain = Counter(
            "sdr_uncertain_sends_total",
            "Sends of unknown outcome, by how they were settled (arrived, absent, resend, skip)",
            ["outcome"],
            registry=r,
        )
        self.turns_in_flight = Gauge("sdr_turns_in_flight", "Turns running now", registry=r)
        self.active_leads = Gauge("sdr_active_leads", "Leads with a burst waiting in the buffer", registry=r)
        self.cache_hits = Counter("sdr_cache_hits", "Cache hits", ["cache", "tier"], registry=r)
        self.cache_misses = Counter("sdr_cache_misses", "Cache misses", ["cache"], registry=r)
        self.followups = Counter(
            "sdr_followups_total", "Follow-ups handled, by kind and outcome", ["kind", "outcome"], registry=r
        )
        self.jobs = Counter("sdr_jobs_total", "Scheduled job runs, by job and outcome", ["job", "outcome"], registry=r)
        self.media = Counter("sdr_media_total", "Photos and voice notes, by outcome", ["kind", "outcome"], registry=r)
        # Set by the readiness check (/readyz, and every scrape of /metrics): an alert reads
        # the same answer a load balancer gets.
        self.dependency_up = Gauge(
            "sdr_dependency_up",
            "1 when /readyz's check of a dependency (database, redis, buffer) passed at the last probe, else 0",
            ["dependency"],
            registry=r,
        )
        # Set by each re-delivery pass (the outbox is a PostgreSQL table every daemon sees:
        # each reports the same backlog).
        self.outbox_backlog = Gauge(
            "sdr_outbox_backlog",
            "Replies waiting for re-delivery (undelivered, uncertain, or left sending by a daemon that"
            " died), at the last re-delivery pass",
            registry=r,
        )
        self.outbox_oldest = Gauge(
            "sdr_outbox_backlog_oldest_seconds",
            "Age of the oldest reply waiting for re-delivery at the last pass (0: none waits)",
            registry=r,
        )
        # process_start_time_seconds (restarts), process_resident_memory_bytes and
        # process_open_fds (leak hunting, `sdrctl bench --soak`), read at scrape time.
        ProcessCollector(registry=r)
        # NaN where it cannot be read (no running loop).
        Gauge("sdr_asyncio_tasks", "asyncio tasks alive in the daemon's loop", registry=r).set_function(tasks_alive)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def tasks_alive() -> float:
    """Tasks of the running loop. /metrics renders in the loop's thread, so this is safe."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # rendered outside a loop (a unit test)
        return float("nan")
