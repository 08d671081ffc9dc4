"""`sdrctl migrate verify`: EXPLAIN (ANALYZE, BUFFERS) of the pipeline's hot queries.

Each plan is reduced to its access paths (which scan on which table, through which
index), rows and time. A sequential scan on a table larger than a threshold fails the
check: on a big table that is the query that will time out first. `--sample-data N` fills
a throw-away schema with N generated leads (about 20 messages each) so the check means
something on an empty database, and shows the plans before and after the index migration.
EXPLAIN ANALYZE runs the query, so every one runs in a transaction that is rolled back."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from daemon import migrations
from daemon.knowledge.search import FULL_TEXT
from daemon.store import HISTORY, PENDING_MESSAGES

DUE_FOLLOW_UPS = """
SELECT id FROM follow_ups
 WHERE status = 'pending' AND due_at <= now()
 ORDER BY due_at LIMIT $1
   FOR UPDATE SKIP LOCKED"""

LEAD_BY_PHONE = "SELECT * FROM leads WHERE phone_number = $1"


@dataclass(frozen=True)
class HotQuery:
    name: str
    sql: str
    args: Callable[[dict[str, Any]], tuple[Any, ...]]  # from a sample of the data


HOT_QUERIES = [
    HotQuery("lead by phone", LEAD_BY_PHONE, lambda s: (s["phone"],)),
    HotQuery("a lead's unanswered messages", PENDING_MESSAGES, lambda s: (s["phone"], None)),
    HotQuery("last N messages of a conversation", HISTORY, lambda s: (s["conversation_id"], s["history_limit"])),
    HotQuery("knowledge-base full-text search", FULL_TEXT, lambda s: ("placa | solar | economia", s["kb_results"])),
    HotQuery("due follow-ups", DUE_FOLLOW_UPS, lambda s: (s["claim_batch"],)),
]


@dataclass(frozen=True)
class Scan:
    node: str  # Seq Scan, Index Scan, Bitmap Heap Scan, ...
    table: str | None
    index: str | None
    table_rows: int  # the table's size estimate (pg_class.reltuples)

    def __str__(self) -> str:
        via = f" using {self.index}" if self.index else ""
        return f"{self.node}{via}" + (f" on {self.table}" if self.table else "")


@dataclass
class PlanResult:
    query: str
    scans: list[Scan]
    rows: int
    time_ms: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "access": [str(s) for s in self.scans],
            "rows": self.rows,
            "time_ms": round(self.time_ms, 3),
            "ok": self.ok,
            "problems": self.problems,
        }


async def sample_args(conn: asyncpg.Connection, limits: dict[str, int]) -> dict[str, Any]:
    """Real values to explain with: the most recent lead and its conversation."""
    row = await conn.fetchrow(
        "SELECT l.phone_number, c.id FROM leads l LEFT JOIN conversations c ON c.lead_id = l.id "
        "ORDER BY l.id DESC LIMIT 1"
    )
    phone, conversation = (row[0], row[1]) if row else ("5511999990000", 0)
    return {"phone": phone, "conversation_id": conversation or 0, **limits}


async def explain_all(conn: asyncpg.Connection, args: dict[str, Any], seq_scan_rows: int) -> list[PlanResult]:
    return [await explain(conn, q, q.args(args), seq_scan_rows) for q in HOT_QUERIES]


async def explain(conn: asyncpg.Connection, q: HotQuery, args: tuple[Any, ...], seq_scan_rows: int) -> PlanResult:
    tr = conn.transaction()
    await tr.start()
    try:
        raw = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {q.sql}", *args)
    finally:
        await tr.rollback()
    doc = json.loads(raw) if isinstance(raw, str) else raw
    top = doc[0]
    plan = top["Plan"]
    sizes = await _table_sizes(conn, _tables(plan))
    scans = [
        Scan(n["Node Type"], n.get("Relation Name"), n.get("Index Name"), sizes.get(n.get("Relation Name") or "", 0))
        for n in _walk(plan)
        if "Relation Name" in n or "Index Name" in n  # table and index access only
    ]
    result = PlanResult(q.name, scans, int(plan.get("Actual Rows", 0)), float(top.get("Execution Time", 0.0)))
    for s in scans:
        if s.node == "Seq Scan" and s.table_rows > seq_scan_rows:
            result.problems.append(
                f"sequential scan on {s.table} ({s.table_rows:,} rows > {seq_scan_rows:,}): an index is missing or unused"
            )
    return result


def _walk(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(_walk(child))
    return nodes


def _tables(plan: dict[str, Any]) -> set[str]:
    return {n["Relation Name"] for n in _walk(plan) if "Relation Name" in n}


async def _table_sizes(conn: asyncpg.Connection, tables: set[str]) -> dict[str, int]:
    rows = await conn.fetch(
        """SELECT c.relname, greatest(c.reltuples, 0)::bigint AS n FROM pg_class c
            WHERE c.relname = ANY($1::text[]) AND c.relnamespace = current_schema()::regnamespace""",
        sorted(tables),
    )
    return {r["relname"]: r["n"] for r in rows}


# --- sample data in a throw-away schema -----------------------------------------------

SAMPLE_DATA = """
INSERT INTO leads (phone_number, push_name, stage, bill_value)
SELECT '55119' || lpad(g::text, 8, '0'), 'Lead ' || g, 'qualifying', 150 + g % 900
  FROM generate_series(1, {leads}) g;
INSERT INTO conversations (lead_id, phone_number, started_at, last_message_at)
SELECT id, phone_number, now() - interval '2 days', now() FROM leads;
INSERT INTO messages (conversation_id, lead_id, provider_id, direction, body, provider_ts, received_at, turn_id)
SELECT c.id, c.lead_id, 'S' || c.id || '-' || k, CASE WHEN k % 2 = 0 THEN 'in' ELSE 'out' END,
       'mensagem ' || k || ' sobre energia solar e a conta de luz',
       now() - make_interval(mins => {per_lead} - k), now() - make_interval(mins => {per_lead} - k), NULL
  FROM conversations c, generate_series(1, {per_lead}) k;
INSERT INTO follow_ups (lead_id, kind, due_at, status)
SELECT id, 'reengage', now() + make_interval(mins => (id % 2880)::int - 60),
       CASE WHEN id % 10 = 0 THEN 'pending' ELSE 'sent' END
  FROM leads;
"""


@dataclass
class SampleRun:
    schema: str
    leads: int
    messages: int
    before: list[PlanResult]
    after: list[PlanResult]


async def with_sample_data(
    conn: asyncpg.Connection,
    leads: int,
    limits: dict[str, int],
    seq_scan_rows: int,
    folder: Path | None = None,
    per_lead: int = 20,
) -> SampleRun:
    """Builds the schema without the no-transaction (index) migrations in a throw-away
    schema, fills it, explains, applies the index migrations, explains again, drops it."""
    schema = f"sdrctl_verify_{os.getpid()}"
    files = migrations.discover(folder)
    await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")
    try:
        await conn.execute(f"SET search_path TO {schema}")
        for m in files:
            if m.transactional:
                async with conn.transaction():
                    for stmt in m.statements:
                        await conn.execute(stmt)
        await conn.execute(SAMPLE_DATA.format(leads=int(leads), per_lead=int(per_lead)))
        await conn.execute("ANALYZE")
        args = await sample_args(conn, limits)
        before = await explain_all(conn, args, seq_scan_rows)
        for m in files:
            if not m.transactional:
                for stmt in m.statements:
                    await conn.execute(stmt)
        await conn.execute("ANALYZE")
        after = await explain_all(conn, args, seq_scan_rows)
        messages = await conn.fetchval("SELECT count(*) FROM messages")
        return SampleRun(schema, leads, messages, before, after)
    finally:
        await conn.execute("RESET search_path")
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
