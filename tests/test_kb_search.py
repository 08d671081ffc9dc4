"""Searching the knowledge base by meaning as well as words (issue #19): vectors computed at
import and cached by content hash, the question's vector cached, reciprocal rank fusion,
full-text alone (and uncached) when the embeddings endpoint is slow, and an edited entry
served by a running daemon within seconds. The vectors come from all-MiniLM-L6-v2 run
offline (daemon/testing/minilm.py) behind an OpenAI-compatible /embeddings server."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from daemon.embedded import Endpoints
from daemon.knowledge.embeddings import Embedder, ensure_embeddings
from daemon.knowledge.evaluate import evaluate, read_cases
from daemon.knowledge.search import Degraded, KnowledgeSearch
from daemon.testing.fake_embeddings import FakeEmbeddings, MiniLMEncoder, run_fake_embeddings
from tests.helpers import REPO, event, fetch, make_config, metric, run_daemon, sdrctl, wait_for
from tests.test_kb_files import fresh_database

FINANCING = "financiamento-de-energia-solar"
CARD = "pagamento-no-cartao-de-credito"


@pytest.fixture(scope="module")
def model() -> MiniLMEncoder:
    return MiniLMEncoder()  # loaded once for the module


@pytest.fixture
async def minilm(model: MiniLMEncoder) -> AsyncIterator[FakeEmbeddings]:
    async with run_fake_embeddings(model) as server:
        yield server


def searcher(pool: asyncpg.Pool, embedder: Embedder | None, embeddings_timeout: float = 5.0) -> KnowledgeSearch:
    return KnowledgeSearch(
        pool, embedder=embedder, vectors=None, candidates=20, rrf_k=60, embeddings_timeout=embeddings_timeout, timeout=5
    )


async def embedded(clean: Endpoints, url: str) -> tuple[asyncpg.Pool, Embedder]:
    pool = await asyncpg.create_pool(clean.database_url, min_size=1, max_size=2)
    assert pool is not None
    embedder = Embedder(url, "all-MiniLM-L6-v2", None, 4, 60.0)
    return pool, embedder


async def test_vectors_are_computed_once_per_content(clean: Endpoints, minilm: FakeEmbeddings) -> None:
    async with fresh_database(clean) as url:  # the entry edited below is the suite's otherwise
        await computed_once(Endpoints(url, clean.redis_url), minilm)


async def test_vectors_are_asked_for_embed_batch_entries_at_a_time(clean: Endpoints, minilm: FakeEmbeddings) -> None:
    """[knowledge] embed_batch: the 61 entries in requests of at most 25 texts."""
    async with fresh_database(clean) as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        embedder = Embedder(minilm.url, "all-MiniLM-L6-v2", None, 4, 60.0, batch=25)
        try:
            assert await ensure_embeddings(pool, embedder) == 61
        finally:
            await embedder.close()
            await pool.close()
    assert [r["inputs"] for r in minilm.requests] == [25, 25, 11]


async def computed_once(clean: Endpoints, minilm: FakeEmbeddings) -> None:
    pool, embedder = await embedded(clean, minilm.url)
    try:
        first = await ensure_embeddings(pool, embedder)
        calls = len(minilm.requests)
        again = await ensure_embeddings(pool, embedder)  # a re-import of the same entries costs nothing
        await pool.execute("UPDATE knowledge_base SET content = content || ' Atualizado.' WHERE key = $1", CARD)
        edited = await ensure_embeddings(pool, embedder)
        stored = await pool.fetchval("SELECT count(*) FROM kb_embeddings")
    finally:
        await embedder.close()
        await pool.close()
    assert (first, again, edited) == (61, 0, 1)
    assert len(minilm.requests) == calls + 1 and stored == 62  # the old vector stays until pruned


class ScriptedMeaning:
    """A fake encoder for the wiring of the fusion, not for quality: it gives the vector
    signal a multilingual model would (the question "dá pra parcelar?" next to the
    financing entry, far from the card entry, everything else in between). The quality of
    a real model is measured by the eval below."""

    name = "scripted"
    dimensions = 3

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [self.vector(t) for t in texts]

    @staticmethod
    def vector(text: str) -> list[float]:
        if text.startswith(("dá pra parcelar", "Financiamento de energia solar")):
            return [1.0, 0.0, 0.0]
        if text.startswith("Pagamento no cartão"):
            return [-1.0, 0.0, 0.0]
        return [0.0, 1.0, 0.0]

    def tokens(self, texts: list[str]) -> int:
        return sum(len(t.split()) for t in texts)


async def test_hybrid_finds_the_financing_entry_that_full_text_misses(clean: Endpoints) -> None:
    """Done-means of issue #19, shown with a scripted encoder: all-MiniLM-L6-v2, the only
    model that installs offline here, is English-trained and ranks the financing entry 12th
    for this question (see the eval and the README)."""
    async with run_fake_embeddings(ScriptedMeaning()) as topics:
        pool, embedder = await embedded(clean, topics.url)
        try:
            await ensure_embeddings(pool, embedder)
            search = searcher(pool, embedder)
            words = await search.search("dá pra parcelar?", 3, "fts")
            meaning = await search.search("dá pra parcelar?", 3, "vector")
            both = await search.search("dá pra parcelar?", 3, "hybrid")
        finally:
            await embedder.close()
            await pool.close()
    assert words[0].key == CARD  # "parcelar" is one of the card entry's tags
    assert meaning[0].key == FINANCING
    assert both[0].key == FINANCING, [(r.key, r.signals) for r in both]
    assert set(both[0].signals) == {"fts", "vector"}


async def test_a_slow_embeddings_endpoint_leaves_the_search_on_full_text(
    clean: Endpoints, minilm: FakeEmbeddings
) -> None:
    pool, embedder = await embedded(clean, minilm.url)
    try:
        await ensure_embeddings(pool, embedder)
        minilm.delay = 3.0
        search = searcher(pool, embedder, embeddings_timeout=0.2)
        started = time.monotonic()
        with pytest.raises(Degraded) as degraded:
            await search.search("aceita cartão?", 3)
        waited = time.monotonic() - started
    finally:
        minilm.delay = 0.0
        await embedder.close()
        await pool.close()
    assert [r.key for r in degraded.value.results][:1] == [CARD]
    assert set(degraded.value.results[0].signals) == {"fts"}
    assert waited < 3.0  # the question's embedding was given up, not waited for


async def test_a_turn_answers_on_full_text_within_budget_when_embeddings_time_out(
    clean: Endpoints, minilm: FakeEmbeddings
) -> None:
    cfg = make_config(
        clean,
        SDR_KNOWLEDGE_EMBEDDINGS_URL=minilm.url,
        SDR_KNOWLEDGE_EMBEDDINGS_MODEL="all-MiniLM-L6-v2",
        SDR_TIMEOUTS_EMBEDDINGS="0.2",
    )
    async with run_daemon(cfg) as d:
        await wait_for(lambda: fetch(clean.database_url, "SELECT 1 FROM kb_embeddings LIMIT 1"), timeout=60)
        minilm.delay = 3.0
        try:
            async with httpx.AsyncClient(base_url=d.url) as http:
                await http.post("/webhook/evolution", json=event("5511955550001", "vocês aceitam cartão de crédito?"))
                [turn] = await wait_for(lambda: fetch(clean.database_url, "SELECT * FROM turns"))
                scraped = (await http.get("/metrics")).text
        finally:
            minilm.delay = 0.0
    assert "knowledge" not in turn["timeouts"] and turn["outcome"] == "ok"
    assert turn["stages"]["knowledge"] < cfg.profile.timeouts.knowledge_base * 1000
    assert metric(scraped, "sdr_knowledge_fulltext_only_total") == 1
    [reply] = await fetch(clean.database_url, "SELECT body FROM messages WHERE direction = 'out'")
    assert "cartão" in reply["body"]  # the card entry, found by its words


async def test_an_edited_entry_is_served_by_a_running_daemon_within_seconds(clean: Endpoints, tmp_path: Path) -> None:
    async with fresh_database(clean) as url:  # the suite's knowledge base is never edited
        await served_within_seconds(Endpoints(url, clean.redis_url), tmp_path)


async def served_within_seconds(clean: Endpoints, tmp_path: Path) -> None:
    phone = "5511955550002"
    async with run_daemon(make_config(clean)) as d, httpx.AsyncClient(base_url=d.url) as http:

        async def ask() -> str:
            query = "SELECT body FROM messages WHERE direction = 'out' ORDER BY id"
            before = len(await fetch(clean.database_url, query))
            await http.post("/webhook/evolution", json=event(phone, "aceita cartão de crédito?"))
            replies = await wait_for(lambda: fetch(clean.database_url, query + f" OFFSET {before}"))
            return str(replies[-1]["body"])

        assert "21 vezes" not in await ask()  # now in both cache tiers
        source = (REPO / "knowledge" / "financiamento" / f"{CARD}.md").read_text()
        edited = tmp_path / f"{CARD}.md"
        edited.write_text(source.replace("+++\n\n", "+++\n\nNovidade: agora parcelamos em até 21 vezes no cartão. ", 1))
        env = {"SDR_DATABASE_URL": clean.database_url, "SDR_REDIS_URL": clean.redis_url}
        code, out, err = await sdrctl("kb", "import", str(edited), "--apply", env=env)
        assert code == 0, err
        applied = time.monotonic()
        while "21 vezes" not in await ask():
            assert time.monotonic() - applied < 5, "the edit did not reach the running daemon within 5 s"


async def test_the_shipped_eval_set_runs_every_method(clean: Endpoints, minilm: FakeEmbeddings) -> None:
    pool, embedder = await embedded(clean, minilm.url)
    try:
        await ensure_embeddings(pool, embedder)
        cases = read_cases(REPO / "knowledge" / "eval.jsonl")
        scores = await evaluate(searcher(pool, embedder), cases, ("fts", "vector", "hybrid"))
    finally:
        await embedder.close()
        await pool.close()
    by = {s.method: s for s in scores}
    assert all(s.cases == len(cases) for s in scores)
    assert all(0 < s.recall_1 <= s.recall_3 <= 1 and 0 < s.mrr <= 1 for s in scores)
    print("\n".join(f"{s.method}: recall@1 {s.recall_1:.3f} recall@3 {s.recall_3:.3f} MRR {s.mrr:.3f}" for s in scores))
    assert by["fts"].recall_3 > 0.5  # the shipped base answers most of the questions by their words


async def test_kb_search_explains_and_kb_eval_checks_through_the_cli(clean: Endpoints, minilm: FakeEmbeddings) -> None:
    env = {
        "SDR_DATABASE_URL": clean.database_url,
        "SDR_REDIS_URL": clean.redis_url,
        "SDR_KNOWLEDGE_EMBEDDINGS_URL": minilm.url,
        "SDR_KNOWLEDGE_EMBEDDINGS_MODEL": "all-MiniLM-L6-v2",
        "COLUMNS": "200",
    }
    code, out, err = await sdrctl("kb", "eval", str(REPO / "knowledge" / "eval.jsonl"), "--json", env=env)
    assert code == 0, err
    scores = {s["method"]: s for s in json.loads(out)["scores"]}
    assert set(scores) == {"fts", "vector", "hybrid"} and all(s["cases"] >= 70 for s in scores.values())
    code, _, err = await sdrctl("kb", "eval", str(REPO / "knowledge" / "eval.jsonl"), "--check", "0.99", env=env)
    assert code == 1 and "below --check 0.99" in err
    code, out, err = await sdrctl("kb", "search", "aceita cartão de crédito?", "--explain", "--limit", "3", env=env)
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"1. {CARD}") and "fts #" in out and "vector #" in out
    code, _, err = await sdrctl("kb", "search", "oi", "--method", "semantic", env=env)
    assert code == 2 and "--method 'semantic'" in err
