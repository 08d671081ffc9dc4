"""Which follow-ups a lead should get next, and when: pure functions of the lead, the time
and the settings (the store writes what they return).

- Mid-qualification silence: re-engagement after each `reengage_after` delay (30 min,
  then 24 h), then nurturing every `nurture_every`, `nurture_count` times. Leads who said
  "not now" (stage nurture) get the nurturing directly.
- A booked meeting with a time: a confirmation shortly after, and reminders
  `meeting_reminders` before it (24 h and 2 h).
- Every due time is moved into business hours."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from daemon.config import FollowUpSettings, parse_durations
from daemon.followups.calendar import BusinessHours

# Stages where the lead is still being qualified: silence there is worth a re-engagement.
QUALIFYING = frozenset({"new", "ask_name", "ask_bill", "confirm_bill", "ask_property", "ask_decision", "offer_meeting"})
SILENCE_KINDS = ("reengage", "nurture")  # cancelled when the lead writes again


@dataclass(frozen=True)
class Planned:
    kind: str
    step: int
    due_at: datetime
    payload: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "step": self.step, "due_at": self.due_at.isoformat(), "payload": self.payload}


class Planner:
    def __init__(self, settings: FollowUpSettings) -> None:
        self.settings = settings
        self.hours = BusinessHours.from_settings(settings)
        self.reengage = parse_durations(settings.reengage_after)
        self.nurture_every = parse_durations(settings.nurture_every)[0]
        self.confirm_after = parse_durations(settings.meeting_confirm_after)[0]
        self.reminders = sorted(parse_durations(settings.meeting_reminders), reverse=True)

    def _at(self, when: datetime) -> datetime:
        return self.hours.next_opening(when)

    @staticmethod
    def silenced(lead: dict[str, Any], at: datetime) -> str | None:
        """Why no follow-up may go to the lead at `at` (None: they may): it opted out (until
        it opts in again), a person has it (paused), or the bot never answers it."""
        if lead.get("opted_out_at"):
            return "the lead opted out"
        if lead.get("ignored"):
            return "the lead is ignored"
        paused = lead.get("paused_until")
        if paused and _as_datetime(paused) > at:
            return "a person has the lead (paused)"
        return None

    def after_turn(self, lead: dict[str, Any], replied_at: datetime, *, meeting_changed: bool) -> list[Planned]:
        """Follow-ups to (re)plan after we replied to the lead: they replace its pending
        silence follow-ups; meeting ones are planned when this turn set the meeting."""
        stage = lead.get("stage") or "new"
        planned: list[Planned] = []
        if stage in QUALIFYING:
            planned = self.silence_step("reengage", 1, replied_at)
        elif stage == "nurture":
            planned = self.silence_step("nurture", 1, replied_at)
        if meeting_changed and lead.get("meeting_at"):
            planned += self.meeting(_as_datetime(lead["meeting_at"]), replied_at)
        return planned

    def silence_step(self, kind: str, step: int, since: datetime) -> list[Planned]:
        """The next message of a silent lead's sequence: re-engagements, then nurturing."""
        if kind == "reengage" and step > len(self.reengage):
            kind, step = "nurture", 1
        if kind == "reengage":
            delay = self.reengage[step - 1]
        elif step <= self.settings.nurture_count:
            delay = self.nurture_every
        else:
            return []
        return [Planned(kind, step, self._at(since + timedelta(seconds=delay)), {})]

    def after_sent(self, kind: str, step: int, sent_at: datetime) -> list[Planned]:
        if kind in SILENCE_KINDS:
            return self.silence_step(kind, step + 1, sent_at)
        return []

    def meeting(self, meeting_at: datetime, now: datetime) -> list[Planned]:
        payload = {"meeting_at": meeting_at.isoformat()}
        planned = [Planned("meeting_confirmation", 1, self._at(now + timedelta(seconds=self.confirm_after)), payload)]
        for step, before in enumerate(self.reminders, start=1):
            due = self._at(meeting_at - timedelta(seconds=before))
            if now < due < meeting_at:  # moved into business hours, still before the meeting
                planned.append(Planned("meeting_reminder", step, due, {**payload, "before_s": before}))
        return planned


def _as_datetime(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
