"""Reading an electricity bill (conta de luz) offline: Tesseract's Portuguese model, then
regexes for what the sales agent sizes a solar system from: the amount due, the month's
consumption, the distributor and the due date."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import subprocess
import unicodedata
from collections import Counter
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

INSTALL_HINT = "apt-get install tesseract-ocr tesseract-ocr-por"
# Page segmentation 6 (one uniform block) keeps each label on the line of its value and
# rows in reading order; 3 and 4 split bill tables into columns and were slower.
PSM = "6"
AMOUNT_RANGE = (Decimal(10), Decimal(100_000))  # R$: anything else is a misread
KWH_RANGE = (10, 100_000)


@dataclass(frozen=True)
class BillReading:
    amount: Decimal | None = None  # R$ due
    kwh: int | None = None  # the month's consumption
    distributor: str | None = None
    due_date: date | None = None

    def found(self) -> bool:
        """Whether this looks like a bill: an amount or a consumption was read."""
        return self.amount is not None or self.kwh is not None


@functools.cache
def tesseract_available() -> bool:
    """Tesseract with Portuguese data is installed. Blocks briefly once: call at startup."""
    exe = shutil.which("tesseract")
    if exe is None:
        return False
    try:
        out = subprocess.run([exe, "--list-langs"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return "por" in (out.stdout + out.stderr).split()  # older versions list on stderr


async def ocr(jpeg: bytes, timeout: float) -> str:
    """The text Tesseract reads in the image; timeout <= 0 means no limit. Raises
    TimeoutError (the process is killed) or RuntimeError (Tesseract failed)."""
    if not jpeg.startswith(b"\xff\xd8"):
        # Tesseract reads non-image stdin as a list of file paths to open: never let it.
        raise ValueError("ocr() takes a JPEG (the output of images.prepare)")
    try:
        proc = await asyncio.create_subprocess_exec(
            "tesseract",
            "stdin",
            "stdout",
            "-l",
            "por",
            "--psm",
            PSM,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # OpenMP threads would fight the event loop and the image workers for the cores.
            env={**os.environ, "OMP_THREAD_LIMIT": "1"},
        )
    except FileNotFoundError:
        raise RuntimeError(f"tesseract is not installed: {INSTALL_HINT}") from None
    try:
        async with asyncio.timeout(timeout if timeout > 0 else None):
            out, err = await proc.communicate(jpeg)
    except TimeoutError:
        await _kill(proc)
        raise TimeoutError(f"OCR took longer than {timeout:g} s") from None
    except BaseException:  # cancelled: never leave a tesseract behind
        await _kill(proc)
        raise
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines() or ["no message"]
        raise RuntimeError(f"tesseract exited with {proc.returncode}: {lines[-1]}")
    return out.decode(errors="replace")


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()  # reaped: no zombie


async def read_bill(jpeg: bytes, timeout: float) -> BillReading:
    return parse_bill(await ocr(jpeg, timeout))


# --- parsing OCR'd text ---------------------------------------------------------------

_H = r"[^\S\n]*"  # spaces within a line: a label's value is on its line or just below
_CONFUSABLE = {"o": "[o0]", "i": "[il1|]", "l": "[l1i|]", "s": "[s5]", " ": r"\s*"}


def _label(words: str) -> str:
    """A regex for a label that tolerates OCR's usual swaps (0 for o, 1 or | for l...)."""
    return "".join(_CONFUSABLE.get(c, re.escape(c)) for c in words)


# Amounts: 1.234,56 / 1234,56 / 487, 35 / 487.35 (OCR reads commas as dots); no dates.
_MONEY = re.compile(r"(?<![\d.,])(\d{1,3}(?:\.\s?\d{3})+|\d{1,6})\s?[,.]\s?(\d{2})(?!\d|[./-]\d)")
_R_MONEY = re.compile(r"r\s?[$s5]\s?(?=\d)")  # R$ (or RS, R5): marks a value as money
_AMOUNT_LABELS = [  # strongest first: the nearest amount after the best label wins
    re.compile("|".join(_label(x) for x in labels))
    for labels in (
        ("total a pagar", "valor a pagar", "total da fatura", "total da conta"),
        ("valor total", "total geral", "valor do documento", "valor cobrado"),
    )
]
_AMOUNT_WINDOW = 120  # chars after a label: covers a value printed in the row below

_NUM = r"(?<![\d.,])(\d{1,3}(?:\.\d{3})+|\d{1,6})(?![\d]|[.,]\d)"
_KWH = r"k\s?w{1,2}\s?h"  # kWh, KWH, kwh, KWwH...
_KWH_LABELED = (
    re.compile(rf"(consumo[^\n\d]{{0,40}}?){_NUM}{_H}{_KWH}"),  # CONSUMO DO MES 352 kWh
    re.compile(rf"(consumo{_H}(?:\(?{_H}{_KWH}{_H}\)?)){_H}[:=]?{_H}{_NUM}"),  # Consumo (kWh) 352
)
_KWH_ANY = re.compile(rf"([^\n]{{0,20}}){_NUM}{_H}{_KWH}")
_NOT_THIS_MONTH = re.compile(r"medi|hist|anterior")  # averages and past months

_DUE = re.compile(r"venc\w*")
# OCR sometimes splits a year ("13/07/202 7"); only a 20xx year, so "05/01/27 12,30" stays 2027.
_DATE = re.compile(r"(?<!\d)(\d{1,2})\s?[/.-]\s?(\d{1,2})\s?[/.-]\s?(2 ?0(?: ?\d){2}|\d{2})(?!\d)")
_DUE_WINDOW = 80

# A distributor named on the bill wins over its group: "Neoenergia Coelba" is COELBA,
# "CEEE Equatorial" is CEEE, "RGE, uma empresa CPFL" is RGE.
DISTRIBUTORS = (
    "AMAZONAS ENERGIA",
    "RORAIMA ENERGIA",
    "CEMIG",
    "COPEL",
    "CELESC",
    "LIGHT",
    "COELBA",
    "CELPE",
    "COSERN",
    "ELEKTRO",
    "CEEE",
    "RGE",
    "ENEL",
    "EDP",
    "ENERGISA",
    "SULGIPE",
    "DMED",
    "ELETROPAULO",
    "COELCE",
    "CELPA",
    "CEMAR",
    "CEPISA",
    "CEAL",
    "CELG",
)
GROUPS = ("NEOENERGIA", "EQUATORIAL", "CPFL")  # only when no subsidiary is named


def _name_pattern(name: str) -> re.Pattern[str]:
    # Big header letters often come out spaced ("E N E L", "C EMI G"); not for 3-letter
    # names (RGE, EDP), which spaced would match stray letters of other words.
    if len(name) <= 3:
        return re.compile(rf"(?<![A-Z]){name}(?![A-Z])")
    spaced = r"\s+".join(" ?".join(word) for word in name.split())
    return re.compile(rf"(?<![A-Z]){spaced}(?![A-Z])")


_DISTRIBUTOR_PATTERNS = [[(n, _name_pattern(n)) for n in names] for names in (DISTRIBUTORS, GROUPS)]


def parse_bill(text: str) -> BillReading:
    plain = _plain(text)
    return BillReading(
        amount=_amount(plain),
        kwh=_kwh(plain),
        distributor=_distributor(plain.upper()),
        due_date=_due_date(plain),
    )


def _plain(text: str) -> str:
    """Lower case without accents ("Mês" -> "mes"), lines kept."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def _money(match: re.Match[str]) -> Decimal:
    return Decimal(re.sub(r"\D", "", match[1]) + "." + match[2])


def _amount(text: str) -> Decimal | None:
    low, high = AMOUNT_RANGE
    for labels in _AMOUNT_LABELS:
        best: tuple[int, Decimal] | None = None
        for label in labels.finditer(text):
            window = text[label.end() : label.end() + _AMOUNT_WINDOW]
            for m in _MONEY.finditer(window):
                value = _money(m)
                if low <= value <= high:
                    if best is None or m.start() < best[0]:
                        best = (m.start(), value)
                    break
        if best is not None:
            return best[1]
    # No label read: a bill's largest R$ value is almost always its total.
    values = [
        _money(found)
        for r in _R_MONEY.finditer(text)
        if (found := _MONEY.match(text, r.end())) and low <= _money(found) <= high
    ]
    return max(values, default=None)


def _kwh(text: str) -> int | None:
    def plausible(values: list[int]) -> int | None:
        values = [v for v in values if KWH_RANGE[0] <= v <= KWH_RANGE[1]]
        return Counter(values).most_common(1)[0][0] if values else None  # ties: first seen

    def read(patterns: tuple[re.Pattern[str], ...]) -> list[int]:
        return [
            int(m[2].replace(".", ""))
            for pattern in patterns
            for m in pattern.finditer(text)
            if not _NOT_THIS_MONTH.search(m[1])  # group 1: the text before the number
        ]

    # "Consumo ... 352 kWh" first; else the value most printed next to a kWh.
    found = plausible(read(_KWH_LABELED))
    return found if found is not None else plausible(read((_KWH_ANY,)))


def _distributor(text: str) -> str | None:
    for patterns in _DISTRIBUTOR_PATTERNS:
        found = [(m.start(), name) for name, p in patterns if (m := p.search(text))]
        if found:
            return min(found)[1]  # the first named: the header comes first
    return None


def _due_date(text: str) -> date | None:
    for label in _DUE.finditer(text):
        window = text[label.end() : label.end() + _DUE_WINDOW]
        for m in _DATE.finditer(window):
            day, month, year = int(m[1]), int(m[2]), int(m[3].replace(" ", ""))
            year += 2000 if year < 100 else 0
            try:
                due = date(year, month, day)
            except ValueError:  # 31/02: a misread
                continue
            if 2000 <= year <= 2100:
                return due
    return None
