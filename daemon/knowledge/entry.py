"""An entry as the files and the table hold it, and what identifies its content."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    key: str  # stable: what an import matches on (a slug of the title unless the file sets it)
    title: str
    content: str
    category: str = "geral"
    tags: tuple[str, ...] = ()  # stored in knowledge_base.keywords (full-text, weight B)
    questions: tuple[str, ...] = ()  # questions it answers, as leads ask them
    source: str = field(default="", compare=False)  # "file:line", for messages

    def embed_text(self) -> str:
        """What is embedded for vector search (and hashed: an unchanged entry is never
        embedded again)."""
        return embed_text(self.title, self.questions, self.content)

    @property
    def content_hash(self) -> str:
        return content_hash(self.title, self.questions, self.content)


def embed_text(title: str, questions: tuple[str, ...] | list[str], content: str) -> str:
    return "\n".join([title, *questions, content])


def content_hash(title: str, questions: tuple[str, ...] | list[str], content: str) -> str:
    """sha256 of embed_text, hex; sql/0014 computes the same in SQL for the seeded rows:
    encode(sha256(convert_to(concat_ws(E'\\n', title, NULLIF(array_to_string(questions, E'\\n'), ''), content), 'UTF8')), 'hex')."""
    return hashlib.sha256(embed_text(title, questions, content).encode()).hexdigest()


def slug(title: str) -> str:
    """ "Diferença entre sistema on-grid e off-grid" -> "diferenca-entre-sistema-on-grid-e-off-grid"."""
    ascii_ = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", ascii_).strip("-")
