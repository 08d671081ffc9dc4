"""Sends due follow-ups exactly once, whichever daemon claims them.

One pass (`run_due`): claim due rows (SKIP LOCKED, so concurrent daemons split them),
then per row, at most `concurrency` at a time:
- still relevant? (a lead who wrote since, a changed meeting: cancelled);
- within business hours? (else back to pending at the next opening);
- under the lead's lock, like a live turn (a lead mid-turn: retried a little later);
- the outbox row first, then the send; sent -> the next of the sequence is planned;
  failed -> retried with backoff up to max_attempts, then failed.
A row reclaimed from a dead daemon whose send had started is not sent again: a follow-up
arriving twice is worse than one lost."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any

from daemon import unguarded
from daemon.agents.tools import AGENT_FOLLOWUP
from daemon.config import Config
from daemon.errors import LeaseLapsed, SendFailed
from daemon.followups.calendar import BusinessHours, Clock, utc_now
from daemon.followups.planner import QUALIFYING, SILENCE_KINDS, Planner
from daemon.followups.store import Claimed, FollowUpStore
from daemon.followups.templates import render, values_for
from daemon.locks import LeadLocks, Lease
from daemon.metrics import Metrics
from daemon.outbox import Outbox, Status

log = logging.getLogger("sdr.followups")


class FollowUpExecutor:
    def __init__(
        self,
        config: Config,
        store: FollowUpStore,
        outbox: Outbox,
        locks: LeadLocks,
        metrics: Metrics,
        clock: Clock = utc_now,
    ) -> None:
        self.settings = config.followups
        self.knobs = config.profile.followups
        self.store = store
        self.outbox = outbox  # sends like a turn's reply...
        self.locks = locks  # ...under the lead's lock, like a turn
        self.metrics = metrics
        self.clock = clock
        self.planner = Planner(config.followups)
        self.hours = BusinessHours.from_settings(config.followups)
        self.templates = {
            "reengage": config.followups.reengage_template,
            "nurture": config.followups.nurture_template,
            "meeting_confirmation": config.followups.meeting_confirmation_template,
            "meeting_reminder": config.followups.meeting_reminder_template,
            AGENT_FOLLOWUP: config.followups.agent_followup_template,
        }
        self.slots = asyncio.Semaphore(self.knobs.concurrency)

    async def run_due(self) -> int:
        """One pass; returns how many follow-ups it claimed."""
        claimed = await self.store.claim(self.clock(), self.knobs.claim_batch, self.knobs.stuck_after)
        await asyncio.gather(*(self._one(f) for f in claimed))
        return len(claimed)

    async def _one(self, f: Claimed) -> None:
        async with self.slots:
            try:
                outcome = await self._execute(f)
            except Exception as exc:  # a database or Redis error: the row is reclaimed later
                log.warning("follow-up %d: %s: %s", f.id, exc.__class__.__name__, exc)
                outcome = "error"
        self.metrics.followups.labels(f.kind, outcome).inc()

    async def _execute(self, f: Claimed) -> str:
        now = self.clock()
        if f.last_send is not None and f.last_send != Status.FAILED:
            # Reclaimed from a daemon that died after starting the send: never twice.
            await self.store.finish(f, "failed", now, f"interrupted during its send ({f.last_send}); not sent again")
            return "interrupted"
        lead, wrote_at = await self.store.lead(f.lead_id)
        why_not = self._irrelevant(f, lead, wrote_at)
        if why_not:
            await self.store.finish(f, "cancelled", now, why_not)
            return "cancelled"
        if not self.hours.is_open(now):
            await self.store.retry_at(f, self.hours.next_opening(now), now, None, attempt=False)
            return "deferred"
        async with self.locks.held(f.phone) as lease:
            if lease is None:  # a live turn holds the lead: its reply may change everything
                return await self._busy(f, now)
            fence = None if unguarded.off("fence") else lease.fence
            # The lead's newest token, or a turn that took the lead meanwhile wins.
            if fence is not None and (lease.lapsed or not await self.outbox.rows.take_fence(f.phone, fence)):
                self.metrics.fenced.labels("lapsed" if lease.lapsed else "fenced").inc()
                return await self._busy(f, now)
            return await self._send(f, lead, fence, lease)

    async def _busy(self, f: Claimed, now: datetime) -> str:
        await self.store.retry_at(f, now + timedelta(seconds=self.knobs.busy_delay), now, None, attempt=False)
        return "busy"

    def _irrelevant(self, f: Claimed, lead: dict[str, Any], wrote_at: datetime | None) -> str | None:
        if why := self.planner.silenced(lead, self.clock()):  # opted out, paused, ignored
            return why
        if f.kind in SILENCE_KINDS:
            if wrote_at is not None and wrote_at > f.created_at:
                return "the lead wrote again"
            if f.kind == "reengage" and (lead.get("stage") or "new") not in QUALIFYING:
                return f"the lead is past qualification ({lead.get('stage')})"
        else:
            meeting = lead.get("meeting_at")
            planned_for = f.payload.get("meeting_at")
            if not meeting or (planned_for and _instant(meeting) != _instant(planned_for)):
                return "the meeting changed"
            if _instant(meeting) <= self.clock():
                return "the meeting is past"
        return None

    async def _send(self, f: Claimed, lead: dict[str, Any], fence: int | None, lease: Lease) -> str:
        now = self.clock()
        meeting = lead.get("meeting_at")
        text = render(
            self.templates[f.kind], values_for(lead, self.settings, _instant(meeting) if meeting else None, self.hours)
        )
        if not text:
            await self.store.finish(f, "cancelled", now, "the template left nothing to say")
            return "cancelled"
        outbox, rows = self.outbox, self.outbox.rows
        local = outbox.local
        outbox_id = await rows.open_follow_up(f.id, f.lead_id, f.phone, text, now, fence, local=local)
        if outbox_id is None:  # a newer lock holder's token: its turn may change everything
            self.metrics.fenced.labels("fenced").inc()
            return await self._busy(f, now)
        provider_id = None
        if not local:
            try:
                provider_id = await outbox.attempt(outbox_id, f.phone, text, lease=lease)
            except LeaseLapsed:  # frozen past the lock: this row did not go; the follow-up is retried
                await rows.delivered([outbox_id], Status.FAILED, error="its lock lapsed before the send")
                return await self._busy(f, now)
            except SendFailed as exc:
                if exc.uncertain:
                    outcome, provider_id = await outbox.settle(f.phone, text, now)
                    if outcome == "skip":
                        await rows.delivered([outbox_id], Status.FAILED, error=str(exc))
                        await self.store.finish(
                            f, "failed", self.clock(), f"{exc} (uncertain; on_uncertain_send = skip)"
                        )
                        return "failed"
                # Not arrived, or cannot be known and resend is the policy: this row fails,
                # the follow-up is retried with a row of its own (or fails for good).
                if provider_id is None:
                    await rows.delivered([outbox_id], Status.FAILED, error=str(exc))
                    if exc.final:
                        if exc.kind == "unreachable":
                            await rows.mark_unreachable(f.phone)
                        await self.store.finish(f, "failed", self.clock(), str(exc))
                        return "failed"
                    return await self._failed(f, str(exc))
        await self.store.sent(f, outbox_id, provider_id, self.clock(), self.planner.after_sent(f.kind, f.step, now))
        return "sent"

    async def _failed(self, f: Claimed, error: str) -> str:
        now = self.clock()
        if f.attempts >= self.knobs.max_attempts:
            await self.store.finish(f, "failed", now, f"{error} (after {f.attempts} attempts)")
            return "failed"
        delay = self.knobs.retry_backoff * 2 ** (f.attempts - 1)
        await self.store.retry_at(f, now + timedelta(seconds=delay), now, error, attempt=True)
        return "retry"


def _instant(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
