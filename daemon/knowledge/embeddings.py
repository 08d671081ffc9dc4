"""Vectors for the knowledge base: an OpenAI-compatible /embeddings client, and the entries'
vectors kept in PostgreSQL (pgvector) by content hash, so re-importing an unchanged entry
costs nothing."""

from __future__ import annotations

import logging

import asyncpg
import httpx

from daemon.config import Config
from daemon.connections import pg_boundary
from daemon.errors import SdrError
from daemon.knowledge.entry import embed_text
from daemon.openai_http import error_text, one_line

log = logging.getLogger("sdr.knowledge")

MISSING = """
SELECT DISTINCT ON (k.content_hash) k.content_hash, k.title, k.questions, k.content
  FROM knowledge_base k
 WHERE NOT EXISTS (SELECT 1 FROM kb_embeddings e WHERE e.content_hash = k.content_hash AND e.model = $1)"""
STORE = """
INSERT INTO kb_embeddings (content_hash, model, embedding)
SELECT h, $1, v::vector FROM unnest($2::text[], $3::text[]) AS x(h, v)
ON CONFLICT DO NOTHING"""


class EmbeddingsError(SdrError):
    """The embeddings endpoint did not answer with vectors (the search goes on full-text)."""


class Embedder:
    """One pooled httpx client to `[knowledge] embeddings_url`."""

    def __init__(
        self, url: str, model: str, key: str | None, max_connections: int, import_timeout: float, batch: int = 64
    ) -> None:
        self.model = model
        self.import_timeout = import_timeout  # one request of up to `batch` entries, at import
        self.batch = batch
        self._key = key
        self.http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"} if key else {},
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def embed(self, texts: list[str], timeout: float) -> list[list[float]]:
        try:
            resp = await self.http.post(
                "/embeddings", json={"model": self.model, "input": texts}, timeout=httpx.Timeout(timeout)
            )
        except httpx.TimeoutException:
            raise EmbeddingsError(f"embeddings: no answer within {timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise EmbeddingsError(f"embeddings: request failed: {one_line(exc, self._key)}") from None
        if resp.status_code >= 400:
            raise EmbeddingsError(f"embeddings: HTTP {resp.status_code}: {one_line(error_text(resp), self._key)}")
        try:
            data = sorted(resp.json()["data"], key=lambda d: d["index"])
            vectors = [[float(x) for x in d["embedding"]] for d in data]
        except (ValueError, KeyError, TypeError):
            raise EmbeddingsError("embeddings: the answer has no data[].embedding") from None
        if len(vectors) != len(texts) or len({len(v) for v in vectors}) > 1 or not vectors[0]:
            raise EmbeddingsError(f"embeddings: {len(vectors)} vectors for {len(texts)} texts")
        return vectors

    async def close(self) -> None:
        await self.http.aclose()


def make_embedder(config: Config) -> Embedder | None:
    """The configured endpoint's client; None without one (full-text search only)."""
    k = config.knowledge
    if not k.embeddings_url:
        return None
    p = config.profile
    return Embedder(
        k.embeddings_url,
        k.embeddings_model,
        config.embeddings_api_key,
        p.pools.http_max_connections,
        p.timeouts.embeddings_import,
        k.embed_batch,
    )


def as_vector(values: list[float]) -> str:
    """pgvector's text form: asyncpg has no codec for the type, the server parses this."""
    return "[" + ",".join(f"{x:.7g}" for x in values) + "]"


async def has_vectors(pool: asyncpg.Pool) -> bool:
    """Whether this database can hold vectors (sql/0015 created the table: pgvector is there)."""
    return bool(await pool.fetchval("SELECT to_regclass('kb_embeddings') IS NOT NULL"))


@pg_boundary
class EntryVectors:
    def __init__(self, pool: asyncpg.Pool, embedder: Embedder) -> None:
        self.pool = pool
        self.embedder = embedder

    async def ensure(self) -> int:
        """Embeds the entries whose content has no vector for this model yet; returns how
        many it embedded (0 when nothing changed: a re-import costs no request)."""
        if not await has_vectors(self.pool):
            log.warning("embeddings_url is set but this database has no pgvector: full-text search only")
            return 0
        rows = await self.pool.fetch(MISSING, self.embedder.model)
        done = 0
        size = self.embedder.batch
        for start in range(0, len(rows), size):
            batch = rows[start : start + size]
            texts = [embed_text(r["title"], list(r["questions"]), r["content"]) for r in batch]
            vectors = await self.embedder.embed(texts, self.embedder.import_timeout)
            await self.pool.execute(
                STORE, self.embedder.model, [r["content_hash"] for r in batch], [as_vector(v) for v in vectors]
            )
            done += len(batch)
        if done:
            log.info("embedded %d knowledge-base entries with %s", done, self.embedder.model)
        return done


async def ensure_embeddings(pool: asyncpg.Pool, embedder: Embedder) -> int:
    """What `sdrctl kb import --apply` and the daemon's start call."""
    return await EntryVectors(pool, embedder).ensure()
