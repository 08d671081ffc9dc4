"""The knowledge base as files a sales team edits, and back.

Markdown, one entry per file: TOML front matter between `+++` lines (as Hugo writes it),
then the text the agent may use::

    +++
    key = "quanto-custa"            # optional: a slug of the title by default
    title = "Quanto custa um sistema solar?"
    category = "precos"             # optional: "geral" by default
    tags = ["preço", "valor"]       # optional: single words, full-text weight B
    questions = ["Qual o valor?"]   # optional: how leads ask it
    +++

    O preço depende do consumo...

CSV, one entry per row: a header naming some of `key,title,category,tags,questions,content`
(title and content required), tags and questions separated by `|`.

A folder is read recursively, `*.md` and `*.csv` in sorted order; other files (the
search's eval.jsonl, images, a README.txt) and hidden files and folders are skipped. Any
mistake is a ConfigError of one line, `path:line: what is wrong; what is allowed`, and
nothing of the source is returned. `write_markdown` writes one file per entry,
`<category>/<key>.md`, so that reading it back gives the same entries."""

from __future__ import annotations

import csv
import io
import re
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import tomli_w

from daemon.errors import ConfigError
from daemon.knowledge.entry import Entry, slug

FENCE = "+++"
SUFFIXES = (".md", ".csv")
DEFAULT_CATEGORY = "geral"
FRONT_KEYS = ("key", "title", "category", "tags", "questions")
CSV_COLUMNS = ("key", "title", "category", "tags", "questions", "content")
CSV_SEP = "|"
KEY = re.compile(r"^[a-z0-9][a-z0-9-]{0,79}$")
KEY_MAX = 80
CATEGORY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
MAX_CONTENT = 4000  # characters: one answer, not a manual (the agent gets a few per turn)
MAX_TITLE = 200
MAX_QUESTION = 300
MAX_TAG = 60

KEY_RULE = "lowercase letters, digits and '-', starting with a letter or digit, at most 80 characters"
CATEGORY_RULE = "lowercase letters, digits, '_' and '-', at most 40 characters (it names the export's folder)"
_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


# --- reading ----------------------------------------------------------------------------


def read_source(path: Path) -> list[Entry]:
    """The entries of a Markdown or CSV file, or of every such file under a folder. Keys
    are unique across the whole source; an empty source is refused (a `--prune` of it
    would empty the knowledge base)."""
    if path.is_dir():
        files = source_files(path)
        if not files:
            raise ConfigError(f"{path}: no .md or .csv file in this folder (nor below it)")
    elif path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise ConfigError(f"{path}: not a knowledge-base file; give a .md or .csv file, or a folder of them")
        files = [path]
    else:
        raise ConfigError(f"{path}: no such file or folder")
    entries: list[Entry] = []
    for file in files:
        text = _read_text(file)
        entries += parse_csv(text, str(file)) if file.suffix.lower() == ".csv" else [parse_markdown(text, str(file))]
    check_unique(entries)
    if not entries:
        raise ConfigError(f"{path}: no entries (the CSV files hold a header and no rows)")
    return entries


def source_files(folder: Path) -> list[Path]:
    """The .md and .csv files under `folder`, hidden ones (and those in hidden folders) left out."""
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.is_file() and p.suffix.lower() in SUFFIXES and not any(part.startswith(".") for part in rel.parts):
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _read_text(file: Path) -> str:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read it: {exc.strerror or exc.__class__.__name__}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a BOM (some Windows editors write one)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{file}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def check_unique(entries: Iterable[Entry]) -> None:
    seen: dict[str, Entry] = {}
    for e in entries:
        first = seen.setdefault(e.key, e)
        if first is not e:
            raise ConfigError(
                f"{e.source}: key {e.key!r} is used twice (also at {first.source}); every entry needs its own "
                'key: set key = "..." in one of them'
            )


def parse_markdown(text: str, where: str) -> Entry:
    """One entry from a Markdown file's text; `where` names it in errors."""
    lines = text.split("\n")
    if lines[0].strip() != FENCE:
        raise ConfigError(
            f"{where}:1: a knowledge-base Markdown file starts with a {FENCE} line, then its front matter "
            f'(title = "..."; optional key, category, tags, questions), a closing {FENCE} line, then the text'
        )
    close = next((i for i in range(1, len(lines)) if lines[i].strip() == FENCE), None)
    if close is None:
        raise ConfigError(f"{where}:1: the front matter opened here is never closed: end it with a {FENCE} line")
    front = lines[1:close]
    try:
        data = tomllib.loads("\n".join(front))
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_POSITION.search(message)
        line, column = close + 1, None  # "end of document": the closing fence
        if match and match[1]:
            line, column = int(match[1]) + 1, int(match[2])
        what = message[: match.start()] if match else message
        where_col = f" (column {column})" if column else ""
        raise ConfigError(
            f"{where}:{line}: the front matter is not valid TOML: {what}{where_col}; write key = value lines, "
            'text in double quotes, lists as ["a", "b"]'
        ) from None

    def line_of(name: str) -> int:
        pattern = re.compile(
            rf"""^\s*(?:\[+\s*)?(?:{re.escape(name)}|"{re.escape(name)}"|'{re.escape(name)}')\s*[=.\]]"""
        )
        return next((i + 2 for i, ln in enumerate(front) if pattern.match(ln)), 1)

    for name in data:
        if name not in FRONT_KEYS:
            raise ConfigError(
                f"{where}:{line_of(name)}: unknown front-matter key {name!r}; allowed: {', '.join(FRONT_KEYS)}"
            )
    body_line = close + 2
    content = "\n".join(lines[close + 1 :]).strip()
    if content:  # where the text starts, for errors about it
        body_line = next(i + 1 for i in range(close + 1, len(lines)) if lines[i].strip())
    return _entry({**data, "content": content}, where, lambda name: body_line if name == "content" else line_of(name))


def parse_csv(text: str, where: str) -> list[Entry]:
    """The entries of a CSV file's text: a header, then one row per entry."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    entries = []
    try:
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            if header is None:
                header = _csv_header(row, where, start)
                continue
            if len(row) != len(header):
                raise ConfigError(
                    f"{where}:{start}: this row has {len(row)} field(s), the header {len(header)}; quote a field "
                    'that holds a comma or a line break: "a, b"'
                )
            values: dict[str, Any] = dict(zip(header, row, strict=True))
            for name in ("tags", "questions"):
                if name in values:
                    values[name] = [part.strip() for part in values[name].split(CSV_SEP) if part.strip()]
            for name in ("key", "category"):
                if name in values and not values[name].strip():
                    del values[name]  # empty: the default
            entries.append(_entry(values, where, _always(start)))
    except csv.Error as exc:
        hint = "; a field that opens a double quote must close it" if "end of data" in str(exc) else ""
        raise ConfigError(f"{where}:{reader.line_num}: not valid CSV: {exc}{hint}") from None
    if header is None:
        raise ConfigError(f"{where}:1: an empty CSV file; the first line names the columns: {','.join(CSV_COLUMNS)}")
    return entries


def _always(line: int) -> Callable[[str], int]:
    return lambda _name: line


def _csv_header(row: list[str], where: str, line: int) -> list[str]:
    names = [cell.strip().lower() for cell in row]
    allowed = f"columns: {','.join(CSV_COLUMNS)} (title and content required, in any order)"
    for name in names:
        if name not in CSV_COLUMNS:
            raise ConfigError(f"{where}:{line}: unknown column {name!r}; {allowed}")
        if names.count(name) > 1:
            raise ConfigError(f"{where}:{line}: column {name!r} is named twice; {allowed}")
    for name in ("title", "content"):
        if name not in names:
            raise ConfigError(f"{where}:{line}: no {name} column; {allowed}")
    return names


def _entry(values: dict[str, Any], where: str, line_of: Callable[[str], int]) -> Entry:
    """An Entry from parsed values (TOML or CSV), every field checked."""

    def bad(name: str, what: str) -> ConfigError:
        return ConfigError(f"{where}:{line_of(name)}: {what}")

    title = values.get("title")
    if title is None:
        raise bad("title", 'no title; every entry needs one: title = "..."')
    if not isinstance(title, str):
        raise bad("title", f'title must be text in quotes, not {_kind(title)}: title = "..."')
    title = title.strip()
    if not title:
        raise bad("title", "the title is empty; write what the entry answers, in a few words")
    if "\n" in title:
        raise bad("title", "the title must be one line")
    if len(title) > MAX_TITLE:
        raise bad("title", f"the title is {len(title)} characters; at most {MAX_TITLE}")

    key = values.get("key")
    if key is None:
        key = slug(title)[:KEY_MAX].rstrip("-")
        if not key:
            raise bad("title", f'the title gives no key (no letters or digits): set key = "..." ({KEY_RULE})')
    elif not isinstance(key, str):
        raise bad("key", f"key must be text in quotes, not {_kind(key)}; {KEY_RULE}")
    elif not KEY.match(key):
        raise bad("key", f"key {key!r} is not allowed; {KEY_RULE}")

    category = values.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str):
        raise bad("category", f"category must be text in quotes, not {_kind(category)}; {CATEGORY_RULE}")
    if not CATEGORY.match(category):
        raise bad("category", f"category {category!r} is not allowed; {CATEGORY_RULE}")

    tags = _strings(values.get("tags", []), "tags", bad, 'tags = ["preço", "valor"]')
    for tag in tags:
        if not tag or any(ch.isspace() for ch in tag):
            raise bad("tags", f"tag {tag!r}: a tag is one word (no spaces): split it into several tags")
        if len(tag) > MAX_TAG:
            raise bad("tags", f"tag {tag[:20]!r}... is {len(tag)} characters; at most {MAX_TAG}")

    questions = tuple(q.strip() for q in _strings(values.get("questions", []), "questions", bad, 'questions = ["..."]'))
    for q in questions:
        if not q:
            raise bad("questions", "a question is empty; remove it")
        if "\n" in q:
            raise bad("questions", "a question must be one line")
        if len(q) > MAX_QUESTION:
            raise bad("questions", f"a question is {len(q)} characters; at most {MAX_QUESTION}")

    content = values.get("content", "")
    assert isinstance(content, str)
    content = content.strip()
    if not content:
        raise bad(
            "content", "no text: what the agent may tell leads goes after the front matter (or in the content column)"
        )
    if len(content) > MAX_CONTENT:
        raise bad(
            "content", f"the text is {len(content)} characters; at most {MAX_CONTENT}: split it into several entries"
        )
    for name, value in (
        ("title", title),
        ("content", content),
        *(("tags", t) for t in tags),
        *(("questions", q) for q in questions),
    ):
        if "\x00" in value:
            raise bad(name, "a NUL character (\\0) is not allowed in text")
    source_line = line_of("key") if "key" in values else line_of("title")
    return Entry(key, title, content, category, tags, questions, source=f"{where}:{source_line}")


def _strings(value: Any, name: str, bad: Callable[[str, str], ConfigError], example: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(name, f"{name} must be a list of texts in quotes, e.g. {example}")
    return tuple(value)


def _kind(value: Any) -> str:
    return {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "a table"}.get(
        type(value), type(value).__name__
    )


# --- writing ----------------------------------------------------------------------------


def to_markdown(entry: Entry) -> str:
    """The file `write_markdown` writes for an entry: every field explicit (key included,
    so the key stays when someone edits the title), in a fixed order and layout."""
    lines = [FENCE, f"key = {_toml(entry.key)}", f"title = {_toml(entry.title)}", f"category = {_toml(entry.category)}"]
    if entry.tags:
        lines.append(f"tags = [{', '.join(_toml(t) for t in entry.tags)}]")
    if entry.questions:
        lines += ["questions = [", *(f"    {_toml(q)}," for q in entry.questions), "]"]
    return "\n".join([*lines, FENCE, "", entry.content, ""])


def _toml(text: str) -> str:
    """A TOML basic string (tomli-w's escaping)."""
    return tomli_w.dumps({"v": text}).removeprefix("v = ").rstrip("\n")


def entry_path(entry: Entry) -> Path:
    return Path(entry.category) / f"{entry.key}.md"


def write_markdown(folder: Path, entries: Iterable[Entry]) -> list[Path]:
    """One file per entry, `<folder>/<category>/<key>.md`; returns the paths written."""
    written = []
    for entry in entries:
        path = folder / entry_path(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_markdown(entry), encoding="utf-8", newline="\n")
        written.append(path)
    return written
