"""pt-BR text helpers shared by the agent and the follow-ups."""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal

_WORD = re.compile(r"[a-z0-9]+")
# Polite words around an intent ("parar, por favor"), dropped before phrases are compared.
FILLERS = frozenset({"por", "favor", "pfv", "pf", "pls", "obrigado", "obrigada", "ok", "oi", "ola"})


def fold(text: str) -> str:
    """Lower case without accents: how we compare what leads type."""
    norm = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in norm if not unicodedata.combining(c)).strip()


def phrase(text: str) -> str:
    """A whole message as intents are compared (daemon.handover): folded, words only (no
    punctuation or emoji), polite fillers and a final plural 's' dropped."""
    words = [_singular(w) for w in _WORD.findall(fold(text))]
    kept = [w for w in words if w not in FILLERS]
    return " ".join(kept or words)


def _singular(word: str) -> str:
    if word.endswith("ns"):  # mensagens -> mensagem
        return word[:-2] + "m"
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def brl(value: Decimal | float) -> str:
    """R$ 1.234,56 as Brazilians write it."""
    text = f"{Decimal(value):,.2f}"
    return "R$ " + text.replace(",", "X").replace(".", ",").replace("X", ".")
