"""pt-BR text helpers shared by the agent and the follow-ups."""

from __future__ import annotations

import unicodedata
from decimal import Decimal


def fold(text: str) -> str:
    """Lower case without accents: how we compare what leads type."""
    norm = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in norm if not unicodedata.combining(c)).strip()


def brl(value: Decimal | float) -> str:
    """R$ 1.234,56 as Brazilians write it."""
    text = f"{Decimal(value):,.2f}"
    return "R$ " + text.replace(",", "X").replace(".", ",").replace("X", ".")
