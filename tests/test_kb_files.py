"""The knowledge base's files and their import (daemon/knowledge/files.py, sync.py,
sql/0014): Markdown and CSV read with every mistake named by file and line, written back
so that export -> import changes nothing, the shipped knowledge/ folder equal to what
sql/0002 seeded (same hash in SQL and Python, same full-text vectors), plan/apply/prune on
a database of their own, the first start's import, and the word to the daemons' caches."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from daemon import migrations
from daemon.cache import ALL, CHANNEL, SEP
from daemon.config import shipped_path
from daemon.embedded import Endpoints
from daemon.errors import ConfigError, SdrError
from daemon.knowledge import sync
from daemon.knowledge.entry import Entry, slug
from daemon.knowledge.files import MAX_CONTENT, parse_csv, parse_markdown, read_source, to_markdown, write_markdown
from tests.helpers import REPO

SHIPPED = REPO / "knowledge"

GOOD = """+++
key = "quanto-custa"
title = "Quanto custa um sistema solar?"
category = "precos"
tags = ["preço", "valor", "custa"]
questions = [
    "Qual o valor de um sistema?",
    "quanto sai pra instalar",
]
+++

O preço depende do seu consumo.

Mandamos a proposta em 24 h.
"""


def md(title: str = "Uma pergunta", body: str = "Uma resposta.", **front: str) -> str:
    lines = [f'title = "{title}"'] + [f"{k} = {v}" for k, v in front.items()]
    return "+++\n" + "\n".join(lines) + "\n+++\n\n" + body + "\n"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        read_source(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- parsing ----------------------------------------------------------------------------


def test_a_markdown_entry_with_every_field() -> None:
    e = parse_markdown(GOOD, "kb/precos/x.md")
    assert e == Entry(
        "quanto-custa",
        "Quanto custa um sistema solar?",
        "O preço depende do seu consumo.\n\nMandamos a proposta em 24 h.",
        "precos",
        ("preço", "valor", "custa"),
        ("Qual o valor de um sistema?", "quanto sai pra instalar"),
    )
    assert e.source == "kb/precos/x.md:2"  # the key's line: what a duplicate names


def test_defaults_key_from_the_title_and_category_geral() -> None:
    e = parse_markdown(md("Diferença entre on-grid e off-grid?", "  texto  \n\n"), "a.md")
    assert (e.key, e.category, e.tags, e.questions, e.content) == (
        "diferenca-entre-on-grid-e-off-grid",
        "geral",
        (),
        (),
        "texto",
    )
    assert e.key == slug(e.title)
    assert parse_markdown(md("x" * 100), "a.md").key == "x" * 80


def test_windows_line_endings_and_a_bom_are_read(tmp_path: Path) -> None:
    path = tmp_path / "a.md"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.replace("\n", "\r\n").encode())
    assert read_source(path) == [parse_markdown(GOOD, "x")]


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("title = 'x'\n+++\n", 1, "starts with a +++ line"),
        ("+++\ntitle = 'x'\n\ntexto\n", 1, "never closed"),
        ("+++\ntitle = 'x'\ntags = [\"a\",\n+++\ntexto\n", 4, "not valid TOML"),
        ('+++\ntitle = "x"\ncategory "geral"\n+++\ntexto\n', 3, "not valid TOML: Expected '=' after a key"),
        ('+++\ntitle = "x"\n\nautor = "Ana"\n+++\ntexto\n', 4, "unknown front-matter key 'autor'; allowed: key, title"),
        ('+++\ntitle = "x"\n[extra]\na = 1\n+++\ntexto\n', 3, "unknown front-matter key 'extra'"),
        ('+++\nkey = "x"\n+++\ntexto\n', 1, "no title"),
        ('+++\ntitle = "  "\n+++\ntexto\n', 2, "the title is empty"),
        ("+++\ntitle = 3\n+++\ntexto\n", 2, "title must be text in quotes, not a number"),
        ('+++\ntitle = "x"\ntags = "preço"\n+++\ntexto\n', 3, "tags must be a list of texts"),
        ('+++\ntitle = "x"\ntags = ["a", 1]\n+++\ntexto\n', 3, "tags must be a list of texts"),
        ('+++\ntitle = "x"\ntags = ["energia solar"]\n+++\ntexto\n', 3, "a tag is one word"),
        ('+++\ntitle = "x"\nquestions = ["ok?", " "]\n+++\ntexto\n', 3, "a question is empty"),
        ('+++\ntitle = "x"\nkey = "Quanto_Custa"\n+++\ntexto\n', 3, "key 'Quanto_Custa' is not allowed; lowercase"),
        ('+++\ntitle = "x"\ncategory = "Preços"\n+++\ntexto\n', 3, "category 'Preços' is not allowed"),
        ('+++\ntitle = "x"\n+++\n\n   \n', 4, "no text"),
        ('+++\ntitle = "!!!"\n+++\ntexto\n', 2, "the title gives no key"),
        ('+++\ntitle = "x"\n+++\n\n' + "a" * (MAX_CONTENT + 1) + "\n", 5, f"at most {MAX_CONTENT}"),
    ],
)
def test_a_bad_markdown_file_is_refused_with_its_line(tmp_path: Path, text: str, line: int, what: str) -> None:
    path = write(tmp_path, "kb/faq/entrada.md", text)
    message = refused(tmp_path / "kb")
    assert message.startswith(f"{path}:{line}: "), message
    assert what in message


def test_a_file_that_is_not_utf8_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "a.md"
    path.write_bytes(b'+++\ntitle = "x"\n+++\nPre\xe7o\n')
    assert refused(path) == f"{path}:4: not UTF-8 text (byte 0xe7); save the file as UTF-8"


def test_a_key_used_twice_names_both_places(tmp_path: Path) -> None:
    write(tmp_path, "a/um.md", md("Quanto custa?"))
    write(tmp_path, "b/dois.md", md("Preço", key='"quanto-custa"'))
    message = refused(tmp_path)
    assert message.startswith(f"{tmp_path / 'b/dois.md'}:3: key 'quanto-custa' is used twice (also at ")
    assert f"also at {tmp_path / 'a/um.md'}:2)" in message


def test_a_folder_reads_md_and_csv_recursively_in_order_and_skips_the_rest(tmp_path: Path) -> None:
    write(tmp_path, "b/dois.md", md("Dois"))
    write(tmp_path, "a/um.md", md("Um"))
    write(tmp_path, "c.csv", "title,content\nTrês,texto três\n")
    write(tmp_path, "eval.jsonl", '{"question": "x", "expected": ["um"]}\n')
    write(tmp_path, "README.txt", "not an entry")
    write(tmp_path, ".git/x.md", "not an entry")
    write(tmp_path, "a/.rascunho.md", "not an entry")
    assert [e.key for e in read_source(tmp_path)] == ["um", "dois", "tres"]


def test_an_empty_source_or_a_wrong_file_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "notes.txt", "x")
    assert refused(tmp_path) == f"{tmp_path}: no .md or .csv file in this folder (nor below it)"
    assert "not a knowledge-base file" in refused(tmp_path / "notes.txt")
    assert refused(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such file or folder"


def test_csv_rows_with_defaults_lists_and_multiline_text() -> None:
    text = (
        "key,title,category,tags,questions,content\n"
        'pix,Aceitam PIX?,pagamento,pix|pagamento,Posso pagar com PIX? | aceita pix,"Sim, aceitamos.\nNa hora."\n'
        "\n"
        ",Visita técnica,,,,É gratuita.\n"
    )
    assert parse_csv(text, "x.csv") == [
        Entry(
            "pix",
            "Aceitam PIX?",
            "Sim, aceitamos.\nNa hora.",
            "pagamento",
            ("pix", "pagamento"),
            ("Posso pagar com PIX?", "aceita pix"),
        ),
        Entry("visita-tecnica", "Visita técnica", "É gratuita."),
    ]
    assert parse_csv("content,title\ntexto,Título\n", "x.csv")[0].source == "x.csv:2"


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        (
            "title,content,autor\nx,y,z\n",
            1,
            "unknown column 'autor'; columns: key,title,category,tags,questions,content",
        ),
        ("title,tags\nx,y\n", 1, "no content column"),
        ("title,content\nUm,texto\nDois,texto,demais\n", 3, "this row has 3 field(s), the header 2"),
        ('title,content\nUm,"texto\nem duas linhas"\nDois,\n', 4, "no text"),
        ("key,title,content\nUm Dois,x,y\n", 2, "key 'Um Dois' is not allowed"),
        ('title,content\nUm,"sem fim\n', 2, "not valid CSV"),
        ("", 1, "an empty CSV file"),
    ],
)
def test_a_bad_csv_file_is_refused_with_its_line(tmp_path: Path, text: str, line: int, what: str) -> None:
    path = write(tmp_path, "faq.csv", text)
    message = refused(path)
    assert message.startswith(f"{path}:{line}: "), message
    assert what in message


# --- writing: the export's files read back as the same entries --------------------------------


def test_markdown_is_written_deterministically_and_reads_back_the_same(tmp_path: Path) -> None:
    entries = [
        parse_markdown(GOOD, "x"),
        Entry("aspas", 'Diz "oi" \\ tchau', "Linha 1\n+++\nLinha 3 com ''' e \"\"\"", "geral", ("a",), ("é? [x]",)),
    ]
    paths = write_markdown(tmp_path, entries)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["precos/quanto-custa.md", "geral/aspas.md"]
    assert paths[0].read_text(encoding="utf-8") == GOOD == to_markdown(entries[0])
    assert sorted(read_source(tmp_path), key=lambda e: e.key) == sorted(entries, key=lambda e: e.key)


def test_the_shipped_files_are_in_the_export_format() -> None:
    entries = read_source(SHIPPED)
    assert len(entries) == 61
    for e in entries:
        path = SHIPPED / e.category / f"{e.key}.md"
        assert path.read_text(encoding="utf-8") == to_markdown(e), path
        assert e.key == slug(e.title)


# --- the database ------------------------------------------------------------------------------


@asynccontextmanager
async def fresh_database(endpoints: Endpoints, to: int | None = None) -> AsyncIterator[str]:
    """A database of its own on the suite's PostgreSQL, migrated (up to `to`): the suite's
    shared knowledge base is never touched. Its URL."""
    name = f"kb_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(endpoints.database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    url = endpoints.database_url.replace("/sdr?", f"/{name}?")
    try:
        conn = await asyncpg.connect(url)
        try:
            await migrations.migrate(conn, to=to)
        finally:
            await conn.close()
        yield url
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture
async def db(endpoints: Endpoints) -> AsyncIterator[asyncpg.Connection]:
    async with fresh_database(endpoints) as url:
        conn = await asyncpg.connect(url)
        try:
            yield conn
        finally:
            await conn.close()


async def test_the_shipped_files_are_the_seeded_rows_with_the_same_hash(db: asyncpg.Connection) -> None:
    rows = await db.fetch("SELECT key, title, content, category, keywords, questions, content_hash FROM knowledge_base")
    files = {e.key: e for e in read_source(shipped_path("knowledge"))}
    assert len(rows) == len(files) == 61
    for r in rows:
        e = files[r["key"]]
        assert (r["title"], r["content"], r["category"], r["questions"]) == (e.title, e.content, e.category, [])
        assert r["keywords"] == " ".join(e.tags)
        assert r["content_hash"] == e.content_hash  # sql/0014's SQL == entry.py's Python
    assert await sync.export_entries(db) == sorted(files.values(), key=lambda e: (e.category, e.key))


async def test_0014_keeps_the_seeded_full_text_vectors_and_keys_rows_it_does_not_know(endpoints: Endpoints) -> None:
    async with fresh_database(endpoints, to=13) as url:
        conn = await asyncpg.connect(url)
        try:
            before = dict(await conn.fetch("SELECT title, tsv::text FROM knowledge_base"))
            await conn.execute("UPDATE knowledge_base SET title = 'Editado à mão' WHERE id = 5")
            await conn.execute(
                "INSERT INTO knowledge_base (category, title, content) VALUES ('geral', 'Novo', 'texto')"
            )
            await migrations.migrate(conn)
            after = dict(await conn.fetch("SELECT title, tsv::text FROM knowledge_base"))
            keys = dict(await conn.fetch("SELECT id, key FROM knowledge_base WHERE key LIKE 'entry-%'"))
            index = await conn.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = 'knowledge_base_tsv_idx'")
        finally:
            await conn.close()
    assert {t: v for t, v in after.items() if t in before} == {t: v for t, v in before.items() if t in after}
    assert keys == {5: "entry-5", 62: "entry-62"}
    assert "USING gin (tsv)" in index


async def test_questions_are_hashed_as_in_python_and_searched_at_weight_b(db: asyncpg.Connection) -> None:
    e = Entry("pix", "Aceitam PIX?", "Sim.", "pagamento", ("pix",), ("Posso parcelar no boleto?", "e no cartão?"))
    diff = await sync.plan(db, [e], prune=False)
    await sync.apply(db, diff, "test")
    row = await db.fetchrow(
        "SELECT content_hash, tsv @@ to_tsquery('portuguese', 'boleto') AS found FROM knowledge_base WHERE key = 'pix'"
    )
    assert row["content_hash"] == e.content_hash and row["found"]
    # An edit made in SQL changes the hash too (the entry is embedded again).
    await db.execute("UPDATE knowledge_base SET questions = '{}' WHERE key = 'pix'")
    hashed = await db.fetchval("SELECT content_hash FROM knowledge_base WHERE key = 'pix'")
    assert hashed == Entry("pix", "Aceitam PIX?", "Sim.").content_hash


async def test_plan_apply_and_prune(db: asyncpg.Connection) -> None:
    shipped = read_source(SHIPPED)
    diff = await sync.plan(db, shipped, prune=True)
    assert diff.empty and len(diff.unchanged) == 61 and diff.kept == ()

    first, second, *rest = shipped
    edited = Entry(first.key, first.title, first.content + " Editado.", "outra", first.tags, ("nova?",))
    new = Entry("nova-entrada", "Nova entrada", "Texto novo.")
    source = [edited, new, *rest]  # `second` left the source
    kept = await sync.plan(db, source, prune=False)
    assert [e.key for e in kept.added] == ["nova-entrada"]
    assert [(c.key, c.fields) for c in kept.changed] == [(first.key, ("content", "category", "questions"))]
    assert kept.removed == () and kept.kept == (second.key,)

    before = {r["key"]: r["updated_at"] for r in await db.fetch("SELECT key, updated_at FROM knowledge_base")}
    pruned = await sync.plan(db, source, prune=True)
    assert pruned.removed == (second.key,) and pruned.kept == ()
    await sync.apply(db, pruned, "/kb")
    after = {r["key"]: r["updated_at"] for r in await db.fetch("SELECT key, updated_at FROM knowledge_base")}
    assert set(after) == set(before) - {second.key} | {"nova-entrada"}
    assert after[first.key] > before[first.key]
    assert all(after[e.key] == before[e.key] for e in rest)  # untouched
    log = await db.fetchrow("SELECT source, added, changed, removed FROM kb_imports")
    assert tuple(log) == ("/kb", 1, 1, 1)
    assert (await sync.plan(db, source, prune=True)).empty


async def test_apply_refuses_a_plan_the_table_moved_away_from(db: asyncpg.Connection) -> None:
    diff = await sync.plan(db, [Entry("nova", "Nova", "Texto.")], prune=True)
    await db.execute("UPDATE knowledge_base SET content = content || '!' WHERE id = 1")
    with pytest.raises(SdrError, match="changed while this import was being planned"):
        await sync.apply(db, diff, "x")
    assert await db.fetchval("SELECT count(*) FROM knowledge_base") == 61
    assert await db.fetchval("SELECT count(*) FROM kb_imports") == 0


async def test_the_first_start_imports_the_shipped_folder_once(endpoints: Endpoints, tmp_path: Path) -> None:
    async with fresh_database(endpoints) as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            first = await sync.import_shipped(pool)
            # Every later start asks the database only: the folder is not even read.
            again = await sync.import_shipped(pool, folder=tmp_path / "not-there")
            assert first is not None and first.empty and len(first.unchanged) == 61
            assert again is None
            assert await pool.fetchval("SELECT count(*) FROM kb_imports WHERE source LIKE 'shipped:%'") == 1

            # An older install whose entries were edited in SQL: they are kept; what is
            # missing is added.
            await pool.execute("TRUNCATE kb_imports")
            await pool.execute("UPDATE knowledge_base SET content = 'nosso texto' WHERE key = 'preciso-de-bateria'")
            await pool.execute("DELETE FROM knowledge_base WHERE key = 'seguro-do-sistema'")
            diff = await sync.import_shipped(pool)
            assert diff is not None
            assert [e.key for e in diff.added] == ["seguro-do-sistema"] and diff.kept == ("preciso-de-bateria",)
            assert await pool.fetchval("SELECT content FROM knowledge_base WHERE key = 'preciso-de-bateria'") == (
                "nosso texto"
            )
            assert await pool.fetchval("SELECT count(*) FROM knowledge_base") == 61
        finally:
            await pool.close()


async def test_announce_drops_the_knowledge_cache_in_redis_and_tells_every_daemon(clean: Endpoints) -> None:
    redis = aioredis.Redis.from_url(clean.redis_url)
    listener = redis.pubsub()
    try:
        await redis.set("sdr:cache:knowledge:{placa solar}", b"[]")
        await redis.set("sdr:cache:lead:{5511999990000}", b"{}")
        await listener.subscribe(CHANNEL)
        await listener.get_message(timeout=1)  # the subscription's confirmation
        await sync.announce(redis)
        message = await listener.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None and message["data"] == f"knowledge{SEP}{ALL}".encode()
        assert await redis.keys("sdr:cache:knowledge:*") == []
        assert await redis.exists("sdr:cache:lead:{5511999990000}") == 1
    finally:
        await listener.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()
