"""Searching the knowledge base: full-text (Portuguese), by meaning (vector similarity,
when an embeddings endpoint is set), and both fused by reciprocal rank.

Reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009): an entry scores
sum(1 / (k + rank)) over the signals that ranked it. It needs no calibration between
ts_rank and cosine similarity (scores on unrelated scales), and an entry both signals
rank well beats one only a single signal likes. The question's vector has its own timeout
inside the search's budget: when the endpoint is slow or down, the search answers with
full-text alone (counted), and that answer is not cached, so the next question tries
again."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from daemon.cache import TwoTierCache
from daemon.connections import pg_boundary
from daemon.knowledge.embeddings import Embedder, EmbeddingsError, as_vector, has_vectors
from daemon.models import KbEntry
from daemon.store import tsquery_any

log = logging.getLogger("sdr.knowledge")

METHODS = ("fts", "vector", "hybrid")
_COLUMNS = "k.id, k.category, k.title, k.content, k.key"
FULL_TEXT = f"""
SELECT {_COLUMNS}, ts_rank(k.tsv, q) AS rank
  FROM knowledge_base k, to_tsquery('portuguese', $1) q
 WHERE k.tsv @@ q ORDER BY rank DESC, k.id LIMIT $2"""
BY_MEANING = f"""
SELECT {_COLUMNS}, 1 - (e.embedding <=> $1::text::vector) AS rank
  FROM knowledge_base k JOIN kb_embeddings e ON e.content_hash = k.content_hash AND e.model = $2
 ORDER BY e.embedding <=> $1::text::vector, k.id LIMIT $3"""


@dataclass(frozen=True)
class Signal:
    rank: int  # 1-based, within that signal's candidates
    score: float  # full-text: ts_rank; vector: cosine similarity


@dataclass(frozen=True)
class Ranked:
    key: str
    entry: KbEntry
    score: float  # what ordered it: the signal's own score, or the fused RRF score (hybrid)
    signals: dict[str, Signal] = field(default_factory=dict)  # "fts", "vector": where each put it


class Degraded(Exception):
    """The vector half failed (timeout, error): `results` are full-text only, not to be cached."""

    def __init__(self, results: list[Ranked], why: str) -> None:
        super().__init__(why)
        self.results = results


@pg_boundary
class KnowledgeSearch:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        embedder: Embedder | None,
        vectors: TwoTierCache[list[float]] | None,
        candidates: int,
        rrf_k: int,
        embeddings_timeout: float,
        timeout: float,
        on_degraded: Callable[[str], None] | None = None,
    ) -> None:
        self.pool = pool
        self.embedder = embedder
        self.vectors = vectors  # the questions' embeddings, bounded (LRU + TTL, shared in Redis)
        self.candidates = candidates
        self.rrf_k = rrf_k
        self.embeddings_timeout = embeddings_timeout
        self.timeout = timeout  # one query
        self.on_degraded = on_degraded  # counts a search that fell back to full-text
        self._has_vectors: bool | None = None  # sql/0015 made the table (pgvector is there)

    @property
    def methods(self) -> tuple[str, ...]:
        return METHODS if self.embedder is not None else ("fts",)

    async def search(self, text: str, limit: int, method: str = "hybrid") -> list[Ranked]:
        """The `limit` best entries for `text`. Raises Degraded (holding the full-text
        results) when the vector half was wanted and failed; ValueError for a method this
        search cannot run (vector without an endpoint)."""
        if method not in METHODS:
            raise ValueError(f"method {method!r}: one of {', '.join(METHODS)}")
        if method != "fts" and (self.embedder is None or not await self._vectors_exist()):
            if method == "vector":
                raise ValueError("vector search needs [knowledge] embeddings_url and pgvector")
            method = "fts"
        if method == "fts":
            return self._alone("fts", await self._full_text(text, limit))
        if method == "vector":
            return self._alone("vector", await self._by_meaning(text, limit))
        full_text = asyncio.ensure_future(self._full_text(text, self.candidates))
        try:
            meaning = await self._by_meaning(text, self.candidates)
        except (EmbeddingsError, TimeoutError) as exc:
            why = str(exc) or "the question's embedding timed out"
            log.warning("knowledge search on full-text only: %s", why)
            if self.on_degraded is not None:
                self.on_degraded(why)
            raise Degraded(self._alone("fts", await full_text)[:limit], why) from None
        except BaseException:
            full_text.cancel()
            raise
        return self._fuse({"fts": await full_text, "vector": meaning})[:limit]

    async def _full_text(self, text: str, limit: int) -> list[KbEntry]:
        query = tsquery_any(text)
        if not query:
            return []
        rows = await self.pool.fetch(FULL_TEXT, query, limit, timeout=self.timeout)
        return [KbEntry(**dict(r)) for r in rows]

    async def _by_meaning(self, text: str, limit: int) -> list[KbEntry]:
        async with asyncio.timeout(self.embeddings_timeout):
            vector = await self._vector_of(text)
        rows = await self.pool.fetch(BY_MEANING, as_vector(vector), self._model, limit, timeout=self.timeout)
        return [KbEntry(**dict(r)) for r in rows]

    async def _vector_of(self, text: str) -> list[float]:
        assert self.embedder is not None
        embedder = self.embedder
        normal = " ".join(text.lower().split())

        async def load() -> list[float]:
            [vector] = await embedder.embed([normal], self.embeddings_timeout)
            return vector

        if self.vectors is None:
            return await load()
        key = f"{embedder.model}:{hashlib.sha256(normal.encode()).hexdigest()[:32]}"
        return await self.vectors.get_or_load(key, load)

    @property
    def _model(self) -> str:
        assert self.embedder is not None
        return self.embedder.model

    async def _vectors_exist(self) -> bool:
        if self._has_vectors is None:
            self._has_vectors = await has_vectors(self.pool)
        return self._has_vectors

    def _alone(self, name: str, entries: list[KbEntry]) -> list[Ranked]:
        return [Ranked(e.key, e, e.rank, {name: Signal(i, e.rank)}) for i, e in enumerate(entries, start=1)]

    def _fuse(self, ranked: dict[str, list[KbEntry]]) -> list[Ranked]:
        """Reciprocal rank fusion of the signals' candidate lists; ties go to the entry's id."""
        scores: dict[int, float] = {}
        signals: dict[int, dict[str, Signal]] = {}
        entries: dict[int, KbEntry] = {}
        for name, found in ranked.items():
            for rank, e in enumerate(found, start=1):
                scores[e.id] = scores.get(e.id, 0.0) + 1 / (self.rrf_k + rank)
                signals.setdefault(e.id, {})[name] = Signal(rank, e.rank)
                entries.setdefault(e.id, e)
        order = sorted(scores, key=lambda i: (-scores[i], i))
        return [Ranked(entries[i].key, entries[i], scores[i], signals[i]) for i in order]
