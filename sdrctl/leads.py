"""`sdrctl leads`: an operator's hand on one lead (list, show, pause, resume, ignore,
unignore, forget). The SQL and Redis work is in daemon/leads.py; this module parses and renders."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, tzinfo
from decimal import Decimal
from typing import Annotated, Any, TypeVar
from zoneinfo import ZoneInfo

import asyncpg
import typer
from redis.exceptions import RedisError
from rich.table import Table
from rich.text import Text

from daemon import leads
from daemon.cache import REDIS_ERRORS
from daemon.config import Config, parse_phones
from daemon.connections import Redis, pg_options, redis_client
from daemon.durations import duration_option
from daemon.embedded import Endpoints, services
from daemon.errors import ConfigError, UnavailableError
from sdrctl.common import ConfigOpt, ProfileOpt, err, fail, friendly_errors, load, out
from sdrctl.migrate import with_connection

app = typer.Typer(
    help="List and show leads; pause, resume, ignore or unignore the bot for one; forget one (LGPD).",
    no_args_is_help=True,
)
T = TypeVar("T")
PhoneArg = Annotated[str, typer.Argument(metavar="PHONE", help=f"the lead's number: {leads.PHONE_HELP}")]
IdentityArg = Annotated[str, typer.Argument(metavar="PHONE", help=f"the lead's number: {leads.IDENTITY_HELP}")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON (times with the business time zone's offset)")]


def _local(when: datetime | None, tz: tzinfo) -> str:
    return f"{when.astimezone(tz):%Y-%m-%d %H:%M %Z}" if when else ""


def _plain(value: Any, tz: tzinfo) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(tz).isoformat(timespec="seconds")
    return str(value) if isinstance(value, Decimal) else value


def _span(seconds: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def say(message: str) -> None:
    """Our text with database values in it, never read as rich markup ("[handover]" is text)."""
    out.print(Text(message))


def _ignore_list(cfg: Config) -> list[str]:
    return parse_phones(cfg.handover.ignore)


def _run(cfg: Config, work: Callable[[asyncpg.Connection, Redis], Awaitable[T]]) -> T:
    """`work` on one connection to the direct URL and a Redis client, as with_connection
    (sdrctl.migrate) but with Redis too (embedded ones started when no URL is set)."""

    async def run(ep: Endpoints) -> T:
        try:
            conn = await asyncpg.connect(
                ep.direct_url, timeout=cfg.profile.timeouts.database, **pg_options(ep.direct_pooled)
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise UnavailableError(f"cannot connect to PostgreSQL: {exc}") from None
        client = redis_client(ep.redis_url, ep.redis_cluster, cfg)
        try:
            return await work(conn, client)
        except RedisError as exc:
            raise UnavailableError(f"Redis failed: {type(exc).__name__}: {exc}") from None
        except (OSError, asyncpg.InterfaceError) as exc:
            raise UnavailableError(f"lost the connection to PostgreSQL or Redis: {exc}") from None
        finally:
            await conn.close()
            await client.aclose()

    with services(cfg) as endpoints:
        return asyncio.run(run(endpoints))


async def _invalidate(redis: Redis, phone: str, done: str) -> str | None:
    """Drops the daemons' cached copy of the lead; on a Redis failure, what to tell the operator."""
    try:
        await leads.invalidate_lead(redis, [phone])
    except REDIS_ERRORS as exc:
        return f"{done} in PostgreSQL, but Redis failed ({type(exc).__name__}): daemons may show the agent the old lead until its cache entry expires"
    return None


def _warn(problem: str | None) -> None:
    if problem:
        fail(problem)
        raise typer.Exit(1)


# --- list, show ----------------------------------------------------------------------


def _status_text(s: leads.LeadSummary, tz: tzinfo) -> str:
    parts = {
        "paused": f"paused until {_local(s.paused_until, tz)}",
        "opted-out": "opted out",
        "unreachable": "unreachable",
        "ignored": "ignored",
        "active": "active",
    }
    return ", ".join(parts[x] for x in s.statuses)


@app.command("list")
@friendly_errors
def list_cmd(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help=f"only leads that are: {', '.join(leads.STATUSES)}")] = None,
    limit: Annotated[int, typer.Option(help="show at most this many", min=1, max=100_000)] = 50,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Leads with their stage, last message time (business time zone, [followups] timezone)
    and status: paused until when, opted out, unreachable (not on WhatsApp), ignored, or
    active (none of those). Most recent message first."""
    if status is not None:
        leads.check_status(status)  # bad input exits 2 before any database is started
    cfg = load(ctx, config, profile)
    tz = ZoneInfo(cfg.followups.timezone)
    rows = with_connection(cfg, lambda c: leads.list_leads(c, _ignore_list(cfg), status, limit))
    if as_json:
        doc = [{**{k: _plain(v, tz) for k, v in vars(s).items()}, "status": s.statuses} for s in rows]
        print(json.dumps(doc, indent=2))
        return
    if not rows:
        say(f"no {status + ' ' if status else ''}leads")
        return
    table = Table(title=f"{len(rows)} {status + ' ' if status else ''}lead(s), most recent message first")
    for col in ("phone", "name", "stage", f"last message ({cfg.followups.timezone})", "status"):
        table.add_column(col)
    for s in rows:
        # Database text goes in as Text: a name like "[red]" is shown, not read as markup.
        table.add_row(
            Text(s.phone), Text(s.name or ""), Text(s.stage), _local(s.last_message_at, tz), _status_text(s, tz)
        )
    out.print(table)
    if len(rows) == limit:
        err.print(f"showing the first {limit}; --limit shows more")


FIELDS = (
    ("phone_number", "phone"),
    ("lid", "LID"),
    ("name", "name"),
    ("push_name", "WhatsApp name"),
    ("stage", "stage"),
    ("bill_value", "bill (R$)"),
    ("consumption_kwh", "consumption (kWh)"),
    ("solution", "solution"),
    ("property_type", "property"),
    ("decision_maker", "decision maker"),
    ("meeting_at", "meeting"),
    ("created_at", "first seen"),
    ("unreachable_at", "unreachable since"),
)


def _show_doc(d: leads.LeadDetail, tz: tzinfo) -> dict[str, Any]:
    f = d.fields
    return {
        "lead": {k: _plain(v, tz) for k, v in f.items()},
        "status": _detail_statuses(d),
        "pause": {"until": _plain(f["paused_until"], tz), "by": f["paused_by"], "since": _plain(f["paused_at"], tz)}
        if d.paused
        else None,
        "opted_out_since": _plain(f["opted_out_at"], tz),
        "ignored": _ignored_by(d),
        "messages": [{k: _plain(v, tz) for k, v in vars(m).items()} for m in d.messages],
        "follow_ups": [{k: _plain(v, tz) for k, v in x.items()} for x in d.follow_ups],
        "events": [{k: _plain(v, tz) for k, v in e.items()} for e in d.events],
    }


def _detail_statuses(d: leads.LeadDetail) -> list[str]:
    f = d.fields
    return leads.statuses(_ignored_by(d) is not None, f["opted_out_at"], d.paused, f["unreachable_at"])


def _ignored_by(d: leads.LeadDetail) -> str | None:
    if d.fields["ignored"]:
        return "sdrctl leads ignore"
    return "sdr.toml [handover] ignore" if d.ignored_by_config else None


@app.command()
@friendly_errors
def show(
    ctx: typer.Context,
    phone: IdentityArg,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """One lead: its fields, pause, opt-out and ignore state, its last 10 messages (inbound
    ones with whether they were answered), pending follow-ups and recent events."""
    identity = leads.parse_phone(phone, lid=True)
    cfg = load(ctx, config, profile)
    tz = ZoneInfo(cfg.followups.timezone)
    d = with_connection(cfg, lambda c: leads.show(c, identity, _ignore_list(cfg)))
    if as_json:
        print(json.dumps(_show_doc(d, tz), indent=2))
        return
    f = d.fields
    table = Table(title=f"lead {f['phone_number']} (times in {cfg.followups.timezone})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, label in FIELDS:
        if f[key] is not None:
            table.add_row(label, _local(f[key], tz) if isinstance(f[key], datetime) else Text(str(f[key])))
    table.add_row("status", ", ".join(_detail_statuses(d)))
    if d.paused:
        since = _local(f["paused_at"], tz)
        table.add_row("paused", Text(f"until {_local(f['paused_until'], tz)}, by {f['paused_by']}, since {since}"))
    if f["opted_out_at"]:
        table.add_row("opted out", f"since {_local(f['opted_out_at'], tz)}")
    table.add_row("ignored", f"yes ({_ignored_by(d)})" if _ignored_by(d) else "no")
    out.print(table)

    messages = Table(title=f"last {len(d.messages)} message(s)")
    for col in ("time", "from", "text", "answered"):
        messages.add_column(col)
    for m in d.messages:
        text = m.text if m.kind in ("text", "operator") else f"[{m.kind}] {m.text}".rstrip()
        answered = "" if m.answered is None else "yes" if m.answered else f"no ({m.why_not})"
        messages.add_row(_local(m.at, tz), m.who, Text(text), answered)
    out.print(messages)
    if d.follow_ups:
        pending = Table("kind", "step", "due", title=f"{len(d.follow_ups)} pending follow-up(s)")
        for x in d.follow_ups:
            pending.add_row(Text(x["kind"]), str(x["step"]), _local(x["due_at"], tz))
        out.print(pending)
    else:
        say("no pending follow-ups")
    if d.events:
        events = Table("time", "event", "by", title="recent events")
        for e in d.events:
            events.add_row(_local(e["at"], tz), Text(e["kind"]), Text(e["actor"]))
        out.print(events)


# --- pause, resume, ignore, unignore ------------------------------------------------------


@app.command()
@friendly_errors
def pause(
    ctx: typer.Context,
    phone: IdentityArg,
    for_: Annotated[
        str | None, typer.Option("--for", help="how long, e.g. 30m, 2h, 1d (default: the profile's [handover] pause)")
    ] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """The bot stops answering the lead (its messages are still stored) until the pause
    ends or `resume`; its pending follow-ups are cancelled."""
    identity = leads.parse_phone(phone, lid=True)
    seconds = duration_option("--for", for_) if for_ is not None else None
    cfg = load(ctx, config, profile)
    tz = ZoneInfo(cfg.followups.timezone)
    length = seconds if seconds is not None else cfg.profile.handover.pause

    async def work(conn: asyncpg.Connection, redis: Redis) -> tuple[leads.Paused, str | None]:
        done = await leads.pause(conn, identity, length)
        return done, await _invalidate(redis, done.phone, "paused")

    done, problem = _run(cfg, work)
    say(
        f"paused {done.phone} until {_local(done.until, tz)} ({_span(length)}): the bot does not answer it until then or `sdrctl leads resume {done.phone}`"
    )
    if done.before:
        say(f"(it was paused by {done.before[1]} until {_local(done.before[0], tz)})")
    say(f"cancelled {done.cancelled} pending follow-up(s)")
    _warn(problem)


@app.command()
@friendly_errors
def resume(ctx: typer.Context, phone: IdentityArg, config: ConfigOpt = None, profile: ProfileOpt = None) -> None:
    """The bot answers the lead again (ends a pause by `pause`, a person's takeover or a hand-off)."""
    identity = leads.parse_phone(phone, lid=True)
    cfg = load(ctx, config, profile)
    tz = ZoneInfo(cfg.followups.timezone)

    async def work(conn: asyncpg.Connection, redis: Redis) -> tuple[leads.Changed, str | None]:
        done = await leads.resume(conn, identity)
        return done, await _invalidate(redis, done.phone, "resumed") if done.changed else None

    done, problem = _run(cfg, work)
    if done.changed:
        say(
            f"resumed {done.phone}: it was paused by {done.by} until {_local(done.until, tz)}; the bot answers it again"
        )
    else:
        say(f"{done.phone} was not paused; nothing to resume")
    _warn(problem)


@app.command()
@friendly_errors
def ignore(ctx: typer.Context, phone: PhoneArg, config: ConfigOpt = None, profile: ProfileOpt = None) -> None:
    """The bot never answers this number (staff, partners, test phones), even one that has
    not written yet; its messages are still stored and its pending follow-ups cancelled.
    `sdrctl leads unignore` undoes it."""
    number = leads.parse_phone(phone)
    cfg = load(ctx, config, profile)

    async def work(conn: asyncpg.Connection, redis: Redis) -> tuple[leads.Changed, str | None]:
        done = await leads.ignore(conn, number)
        return done, await _invalidate(redis, number, "ignored") if done.changed else None

    done, problem = _run(cfg, work)
    if not done.changed:
        say(f"{number} is ignored already")
    else:
        new = " (it had never written: its lead row was created)" if done.created else ""
        say(f"ignoring {number}{new}: the bot stores its messages and never answers them")
        if not done.created:
            say(f"cancelled {done.cancelled} pending follow-up(s)")
    if number in _ignore_list(cfg):
        say("(it is also in sdr.toml's [handover] ignore)")
    _warn(problem)


@app.command()
@friendly_errors
def unignore(ctx: typer.Context, phone: PhoneArg, config: ConfigOpt = None, profile: ProfileOpt = None) -> None:
    """Undoes `sdrctl leads ignore`: the bot answers the number again. A number listed in
    sdr.toml's [handover] ignore stays ignored (the command says so and exits 1)."""
    number = leads.parse_phone(phone)
    cfg = load(ctx, config, profile)

    async def work(conn: asyncpg.Connection, redis: Redis) -> tuple[leads.Changed, str | None]:
        done = await leads.unignore(conn, number)
        return done, await _invalidate(redis, number, "unignored") if done.changed else None

    done, problem = _run(cfg, work)
    say(f"{number} is no longer ignored" if done.changed else f"{number} was not ignored")
    if number in _ignore_list(cfg):
        fail(f"{number} is still ignored: it is in sdr.toml's [handover] ignore; remove it there")
        raise typer.Exit(1)
    _warn(problem)


# --- forget ----------------------------------------------------------------------------


@app.command()
@friendly_errors
def forget(
    ctx: typer.Context,
    phone: IdentityArg,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Erase the lead for good, as the LGPD (article 18) lets a person ask: its lead row,
    conversations, messages, turns, replies (outbox), follow-ups and discarded replies in
    one transaction, and its Redis entries (lock, hand-off flag, fence, cached lead, buffer
    entries, cached media analyses; the knowledge-search cache, keyed by words leads typed,
    is emptied). Its lead_events rows stay without it, so counts survive. Asks first unless
    --yes; without a terminal, --yes is required."""
    identity = leads.parse_phone(phone, lid=True)
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError(
                "forget erases the lead for good: pass --yes to confirm (standard input is not a terminal)"
            )
        if not typer.confirm(f"Erase {identity} for good (every message, reply and follow-up, and its lead row)?"):
            say("nothing was deleted")
            raise typer.Exit(1)
    cfg = load(ctx, config, profile)
    wait = cfg.profile.timeouts.redis_lock_ttl

    def waiting() -> None:
        err.print(f"a turn or follow-up of {identity} is running: waiting for it (up to {wait:g}s)")

    done = _run(cfg, lambda c, r: leads.forget(c, r, identity, lock_wait=wait, on_wait=waiting))
    say(f"forgot {' / '.join(done.identities)}")
    table = Table("PostgreSQL table", "rows deleted", title="deleted")
    for name, count in done.rows.items():
        table.add_row(name, str(count))
    out.print(table)
    say(f"lead_events: {done.events_kept} row(s) kept without the lead, and one 'forgotten' event added")
    say(f"Redis keys deleted: {', '.join(done.redis_keys) or 'none'}")
    say(
        f"Redis entries deleted: {done.buffer_members} buffer member(s), {done.media_entries} cached media "
        f"analysis(es), {done.knowledge_entries} knowledge-search cache entry(ies)"
    )
    if done.media_untied:
        hours = cfg.profile.media.result_ttl / 3600
        say(
            f"note: {done.media_untied} photo(s)/voice note(s) came without their bytes (fetched from the Evolution "
            f"API): their cached analyses cannot be tied to the lead and expire within {hours:g}h ([media] result_ttl)"
        )
    crm = f", and the CRM at {cfg.followups.crm_url}" if cfg.followups.crm_url else ""
    say(f"not reached: the chat in WhatsApp and in the Evolution API{crm}; erase it there too")
