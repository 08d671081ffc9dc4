"""Follow-up messages from the [followups] *_template strings.

A lead must never read "conta de None", "R$ 0,00" or "{nome}": a sentence whose
placeholder has no value (or is not a placeholder we know) is left out, and a message with
nothing left worth sending is not sent."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from daemon.config import FollowUpSettings
from daemon.followups.calendar import BusinessHours
from daemon.text import brl

# A sentence ends at . ! or ? followed by white space (kept, so line breaks survive).
SENTENCE_END = re.compile(r"(?<=[.!?])(\s+)")
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# Placeholders that read as nothing, rather than sinking their sentence, when unknown.
OPTIONAL = {"name_comma"}
# Words a sentence needs to carry a message on its own: "Oi, Ana!" and "Até lá! ☀️" don't.
MIN_WORDS = 3

WEEKDAYS_PT = (
    "segunda-feira",
    "terça-feira",
    "quarta-feira",
    "quinta-feira",
    "sexta-feira",
    "sábado",
    "domingo",
)


def render(template: str, values: dict[str, str | None]) -> str | None:
    """The message, or None when it should not be sent (nothing meaningful left).

    Braces are placeholders only (no "{{" escaping). When a sentence had to be dropped, what
    is left must still hold a sentence of MIN_WORDS words: a greeting and an emoji alone
    are not a follow-up. A template rendered whole is sent as the operator wrote it."""
    parts = SENTENCE_END.split(template.strip())
    # [sentence, space, sentence, space, ..., sentence] -> (sentence, space after it)
    pairs = zip(parts[::2], [*parts[1::2], ""], strict=True)
    kept: list[tuple[str, str]] = []
    dropped = False
    for sentence, space in pairs:
        text = _fill(sentence, values)
        if text is None:
            dropped = True
        else:
            kept.append((text, space))
    message = "".join(text + space for text, space in kept).strip()
    if not re.search(r"\w", message):
        return None
    if dropped and not any(len(re.findall(r"\w+", text)) >= MIN_WORDS for text, _ in kept):
        return None
    return message


def _fill(sentence: str, values: dict[str, str | None]) -> str | None:
    """The sentence with its placeholders filled, or None when one has no value."""
    missing = False

    def value(match: re.Match[str]) -> str:
        nonlocal missing
        key = match.group(1).strip()
        found = values.get(key)
        if found:
            return found
        if key not in OPTIONAL:
            missing = True
        return ""

    filled = PLACEHOLDER.sub(value, sentence)
    # A lone brace left in the template ("{nome") is a broken placeholder too; checked on
    # the template's text only, so a value may contain braces.
    if missing or re.search(r"[{}]", PLACEHOLDER.sub("", sentence)):
        return None
    return filled


def values_for(
    lead: dict[str, Any], settings: FollowUpSettings, meeting_at: datetime | None, hours: BusinessHours
) -> dict[str, str | None]:
    """What the templates' placeholders stand for, for this lead; None when unknown."""
    name = _name(lead)
    bill = _money(lead.get("bill_value"))
    savings = bill * Decimal(str(settings.savings_rate)) if bill is not None else None
    return {
        "name": name,
        "name_comma": f", {name}" if name else "",
        "bill_value": brl(bill) if bill is not None else None,
        "savings": brl(savings) if savings else None,  # a 0 rate promises nothing
        "meeting": meeting_phrase(meeting_at, hours) if meeting_at is not None else None,
    }


def meeting_phrase(when: datetime, hours: BusinessHours) -> str:
    """ "sexta-feira, 27/11, às 15h" (or "às 15h30") on the business's clock."""
    here = hours.local(when)
    clock = f"{here.hour}h{here.minute:02d}" if here.minute else f"{here.hour}h"
    return f"{WEEKDAYS_PT[here.weekday()]}, {here:%d/%m}, às {clock}"


def _name(lead: dict[str, Any]) -> str | None:
    """The name the lead gave us, else the first word of their WhatsApp profile name
    ("ana 🌻 silva" -> "Ana"); push names are often emoji or nicknames, so letters only."""
    given = str(lead.get("name") or "").strip()
    if given:
        return given
    word = re.search(r"[^\W\d_]+(?:['’-][^\W\d_]+)*", str(lead.get("push_name") or ""))
    return word.group(0).capitalize() if word else None


def _money(raw: object) -> Decimal | None:
    """A positive bill value from a Decimal, float or text ("487.35", "R$ 1.234,56")."""
    if raw is None or isinstance(raw, bool):
        return None
    text = str(raw).replace("R$", "").strip()
    if "," in text:  # Brazilian writing: dots group thousands, the comma is decimal
        text = text.replace(".", "").replace(",", ".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() and value > 0 else None
