"""`sdrctl kb` run as a user would, on a database of its own (the suite's shared knowledge
base is never touched): the dry run writes nothing, --apply writes and tells the daemons'
caches, import -> export -> import is a no-op, --prune deletes only what left the source,
a bad file among good ones is refused with its path and line and nothing is written, CSV,
list, show, and export's refusal of a folder that holds entries already."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from daemon.cache import ALL, CHANNEL, SEP
from daemon.embedded import Endpoints
from daemon.knowledge.entry import Entry
from daemon.knowledge.files import read_source, to_markdown
from tests.helpers import REPO, sdrctl
from tests.test_kb_files import fresh_database, md, write

SHIPPED = REPO / "knowledge"


class Kb:
    """A migrated database of its own, and `sdrctl kb` against it."""

    def __init__(self, url: str, endpoints: Endpoints) -> None:
        self.url = url
        self.endpoints = endpoints  # the suite's servers
        self.redis_url = endpoints.redis_url

    async def run(self, *args: str | Path) -> tuple[int, str, str]:
        env = {"SDR_DATABASE_URL": self.url, "SDR_REDIS_URL": self.redis_url, "COLUMNS": "200"}
        return await sdrctl("kb", *map(str, args), env=env)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def state(self) -> dict[str, tuple[Any, ...]]:
        """Every row as the table holds it (updated_at included), and the import log's length."""
        rows = await self.fetch(
            "SELECT key, id, title, content, category, keywords, questions, content_hash, updated_at FROM knowledge_base"
        )
        imports = await self.fetch("SELECT count(*) FROM kb_imports")
        return {r["key"]: tuple(r) for r in rows} | {"(imports)": (imports[0][0],)}


@pytest.fixture
async def kb(clean: Endpoints) -> AsyncIterator[Kb]:
    async with fresh_database(clean) as url:
        yield Kb(url, clean)


def team_folder(root: Path) -> Path:
    """A team's own knowledge base: two Markdown entries and a CSV of two."""
    folder = root / "equipe"
    write(folder, "precos/quanto-custa.md", md("Quanto custa?", "Depende do consumo.", tags='["preço", "valor"]'))
    write(
        folder,
        "pagamento/pix.md",
        md("Aceitam PIX?", "Sim, aceitamos PIX.", key='"pix"', category='"pagamento"', questions='["tem pix?"]'),
    )
    write(
        folder,
        "faq.csv",
        "key,title,category,tags,questions,content\n"
        "visita,Visita técnica,atendimento,visita|gratuita,Vocês vêm aqui?|Fazem visita?,A visita é gratuita.\n"
        'horario,Horário de atendimento,atendimento,,,"Segunda a sexta, das 8h às 18h."\n',
    )
    return folder


async def test_a_dry_run_prints_the_diff_and_writes_nothing(kb: Kb, tmp_path: Path) -> None:
    before = await kb.state()
    code, out, err = await kb.run("import", team_folder(tmp_path), "--prune")
    assert code == 0, err
    lines = out.splitlines()
    assert {"+ quanto-custa", "+ pix", "+ visita", "+ horario"} <= set(lines)
    assert sum(line.startswith("- ") for line in lines) == 61  # every shipped entry, with --prune
    assert "4 to add, 0 to change, 61 to delete, 0 unchanged" in out
    assert "dry run: nothing was written; --apply writes it" in out
    assert await kb.state() == before


async def test_apply_writes_in_one_go_and_tells_the_daemons_caches(kb: Kb, tmp_path: Path) -> None:
    redis = aioredis.Redis.from_url(kb.redis_url)
    listener = redis.pubsub()
    try:
        await redis.set("sdr:cache:knowledge:{quanto custa}", b"[]")
        await listener.subscribe(CHANNEL)
        await listener.get_message(timeout=1)
        code, out, err = await kb.run("import", team_folder(tmp_path), "--apply")
        assert code == 0, err
        message = await listener.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None and message["data"] == f"knowledge{SEP}{ALL}".encode()
        assert await redis.keys("sdr:cache:knowledge:*") == []
    finally:
        await listener.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()
    assert "4 to add, 0 to change, 0 to delete, 61 unchanged" not in out  # the shipped ones are not in the source
    assert "4 to add, 0 to change, 0 to delete, 0 unchanged" in out
    assert "61 entries in the database but not in the source: kept (--prune deletes them)" in out
    assert "written in one transaction" in out
    [pix] = await kb.fetch("SELECT title, category, keywords, questions FROM knowledge_base WHERE key = 'pix'")
    assert tuple(pix) == ("Aceitam PIX?", "pagamento", "", ["tem pix?"])
    [visita] = await kb.fetch("SELECT keywords, questions, content FROM knowledge_base WHERE key = 'visita'")
    assert tuple(visita) == ("visita gratuita", ["Vocês vêm aqui?", "Fazem visita?"], "A visita é gratuita.")
    [log] = await kb.fetch("SELECT source, added, changed, removed FROM kb_imports")
    assert tuple(log) == (str(tmp_path / "equipe"), 4, 0, 0)


async def test_import_export_import_is_a_no_op(kb: Kb, tmp_path: Path) -> None:
    code, _, err = await kb.run("import", team_folder(tmp_path), "--apply", "--prune")
    assert code == 0, err
    state = await kb.state()
    code, out, err = await kb.run("export", tmp_path / "exportado")
    assert code == 0, err
    assert "exported 4 entries in 3 categories" in out
    assert sorted(p.relative_to(tmp_path / "exportado").as_posix() for p in (tmp_path / "exportado").rglob("*.md")) == [
        "atendimento/horario.md",
        "atendimento/visita.md",
        "geral/quanto-custa.md",
        "pagamento/pix.md",
    ]
    code, out, err = await kb.run("import", tmp_path / "exportado", "--prune", "--apply")
    assert code == 0, err
    assert "0 to add, 0 to change, 0 to delete, 4 unchanged" in out
    assert not any(line[:2] in ("+ ", "~ ", "- ") for line in out.splitlines())
    after = await kb.state()
    assert {k: v for k, v in after.items() if k != "(imports)"} == {k: v for k, v in state.items() if k != "(imports)"}
    # The shipped folder exported from a fresh database is the shipped folder, file for file.
    fresh = tmp_path / "fresh"
    async with fresh_database(kb.endpoints) as url:
        code, _, err = await sdrctl(
            "kb", "export", str(fresh), env={"SDR_DATABASE_URL": url, "SDR_REDIS_URL": kb.redis_url}
        )
    assert code == 0, err
    shipped = {p.relative_to(SHIPPED): p.read_bytes() for p in SHIPPED.rglob("*.md")}
    assert {p.relative_to(fresh): p.read_bytes() for p in fresh.rglob("*.md")} == shipped


async def test_prune_deletes_only_what_left_the_source(kb: Kb, tmp_path: Path) -> None:
    source = tmp_path / "kb"
    shutil.copytree(SHIPPED, source, ignore=shutil.ignore_patterns("*.jsonl"))
    before = await kb.state()
    (source / "baterias" / "preciso-de-bateria.md").unlink()
    (source / "garantia" / "seguro-do-sistema.md").unlink()
    code, out, err = await kb.run("import", source, "--prune", "--apply")
    assert code == 0, err
    assert [line for line in out.splitlines() if line[:2] in ("+ ", "~ ", "- ")] == [
        "- preciso-de-bateria",
        "- seguro-do-sistema",
    ]
    assert "0 to add, 0 to change, 2 to delete, 59 unchanged" in out
    after = await kb.state()
    gone = {"preciso-de-bateria", "seguro-do-sistema"}
    assert set(before) - set(after) == gone
    assert all(after[k] == before[k] for k in after if k != "(imports)")  # the rest untouched
    # Without --prune an entry that left the source stays.
    (source / "como_funciona" / "o-que-e-o-inversor.md").unlink()
    code, out, err = await kb.run("import", source, "--apply")
    assert code == 0, err
    assert "1 entry in the database but not in the source: kept" in out
    assert "o-que-e-o-inversor" in (await kb.state())


async def test_a_changed_entry_shows_which_fields_changed(kb: Kb, tmp_path: Path) -> None:
    source = tmp_path / "kb"
    shutil.copytree(SHIPPED, source)
    path = source / "economia" / "taxa-minima-a-conta-zera.md"
    [old] = read_source(path)
    edited = Entry(old.key, old.title, "Nova resposta.", old.category, old.tags, ("a conta zera?",))
    path.write_text(to_markdown(edited), encoding="utf-8")
    code, out, err = await kb.run("import", source, "--apply")
    assert code == 0, err
    assert "~ taxa-minima-a-conta-zera (content, questions)" in out.splitlines()
    [row] = await kb.fetch(
        "SELECT content, questions, updated_at > created_at AS touched FROM knowledge_base WHERE key = $1",
        "taxa-minima-a-conta-zera",
    )
    assert tuple(row) == ("Nova resposta.", ["a conta zera?"], True)
    [hashed] = await kb.fetch("SELECT content_hash FROM knowledge_base WHERE key = 'taxa-minima-a-conta-zera'")
    assert hashed[0] == edited.content_hash


async def test_a_bad_file_among_good_ones_is_refused_and_nothing_is_written(kb: Kb, tmp_path: Path) -> None:
    source = team_folder(tmp_path)
    bad = write(source, "zz/ruim.md", '+++\ntitle = "Ruim"\ntags = "preço"\n+++\ntexto\n')
    before = await kb.state()
    code, out, err = await kb.run("import", source, "--apply", "--prune")
    assert code == 2
    assert err.strip() == f'error: {bad}:3: tags must be a list of texts in quotes, e.g. tags = ["preço", "valor"]'
    assert out == "" and "Traceback" not in err
    assert await kb.state() == before
    # A front matter that is not TOML: the file's own line, not the front matter's.
    bad.write_text('+++\ntitle = "Ruim"\n\ncategory = geral\n+++\ntexto\n', encoding="utf-8")
    code, _, err = await kb.run("import", source, "--apply")
    assert code == 2 and err.startswith(
        f"error: {bad}:4: the front matter is not valid TOML: Invalid value (column 12)"
    )
    assert len(err.strip().splitlines()) == 1
    assert await kb.state() == before


async def test_a_csv_file_alone(kb: Kb, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "faq.csv",
        'title,content,questions\nAceitam cartão?,"Sim, em até 12x.",parcela no cartão?|aceita crédito?\n',
    )
    code, out, err = await kb.run("import", path, "--apply")
    assert code == 0, err
    assert "+ aceitam-cartao" in out.splitlines()
    code, out, err = await kb.run("show", "aceitam-cartao")
    assert code == 0, err
    assert out == (
        '+++\nkey = "aceitam-cartao"\ntitle = "Aceitam cartão?"\ncategory = "geral"\n'
        'questions = [\n    "parcela no cartão?",\n    "aceita crédito?",\n]\n+++\n\nSim, em até 12x.\n'
    )
    # A duplicate key between two rows names both.
    path.write_text("key,title,content\na,Um,x\nb,Dois,y\na,Três,z\n", encoding="utf-8")
    code, _, err = await kb.run("import", path)
    assert code == 2 and f"{path}:4: key 'a' is used twice (also at {path}:2)" in err


async def test_list_show_and_export_refusals(kb: Kb, tmp_path: Path) -> None:
    code, out, err = await kb.run("list", "--category", "baterias", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [d["key"] for d in doc] == [
        "custo-da-bateria-e-do-sistema-hibrido",
        "preciso-de-bateria",
        "sistema-hibrido-com-backup",
    ]
    assert set(doc[0]) >= {"title", "tags", "questions", "content", "content_hash", "updated_at"}
    code, out, err = await kb.run("list")
    assert code == 0 and "61 entries" in out and "funciona-em-dia-nublado" in out
    code, out, err = await kb.run("show", "nao-existe")
    assert code == 2 and "no knowledge-base entry with key 'nao-existe'" in err
    code, out, err = await kb.run("show", "funciona-em-dia-nublado", "--json")
    assert code == 0 and json.loads(out)["category"] == "como_funciona"
    # export refuses a folder that holds entries already (they would be imported back).
    code, _, err = await kb.run("export", SHIPPED)
    assert code == 2 and "already holds 61 .md or .csv file(s)" in err


async def test_an_old_schema_is_told_to_migrate(clean: Endpoints, tmp_path: Path) -> None:
    async with fresh_database(clean, to=13) as url:
        code, _, err = await sdrctl("kb", "list", env={"SDR_DATABASE_URL": url, "SDR_REDIS_URL": clean.redis_url})
    assert code == 1 and "run `sdrctl migrate` first" in err and "Traceback" not in err
