"""Synthetic test images made with Pillow: photos of Brazilian electricity bills (contas de
luz) for the OCR tests, and hostile or oversized files for the refusal tests."""

from __future__ import annotations

import io
import random
import struct
import zlib
from decimal import Decimal
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")  # Debian's fonts-dejavu-core
BRAND_COLOURS = {
    "CEMIG": (0, 122, 80),
    "ENEL": (0, 84, 166),
    "CPFL": (0, 94, 170),
    "LIGHT": (230, 90, 0),
    "COPEL": (0, 98, 65),
    "CELESC": (0, 120, 60),
    "COELBA": (0, 140, 70),
    "EQUATORIAL": (0, 70, 140),
    "ENERGISA": (0, 110, 180),
    "EDP": (220, 30, 40),
}
MONTHS = ("JAN", "FEV", "MAR", "ABR", "MAI", "JUN", "JUL", "AGO", "SET", "OUT", "NOV", "DEZ")


@cache
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    path = FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    if path.is_file():
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)  # scalable since Pillow 10.1


def brl(value: Decimal) -> str:
    """1234.5 -> '1.234,50'."""
    return f"{value:,.2f}".replace(",", "_").replace(".", ",").replace("_", ".")


def bill_image(
    amount: str = "487,35",
    kwh: int = 352,
    distributor: str = "CEMIG",
    due: str = "15/12/2026",
    *,
    size: tuple[int, int] = (1240, 1754),
    noise: bool = True,
    rotate: float = 0.0,
    fmt: str = "JPEG",
    exif_orientation: int | None = None,
    layout: str | None = None,
) -> bytes:
    """A bill page (A4 at 150 dpi by default) as photographed: `amount` is pt-BR text
    ("1.234,56"); with `exif_orientation` the pixels are stored turned so that a viewer
    applying the EXIF tag shows the page upright. `layout` picks how the total, due date
    and consumption are printed (LAYOUTS; by default chosen from the other arguments)."""
    page = _draw_page(amount, kwh, distributor, due, size, layout)
    if noise or rotate:
        page = _photograph(page, rotate, noise, seed=kwh)
    if exif_orientation in _STORE:
        page = page.transpose(_STORE[exif_orientation])
    buf = io.BytesIO()
    kwargs: dict[str, object] = {"quality": 88} if fmt in ("JPEG", "WEBP") else {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    page.save(buf, fmt, **kwargs)
    return buf.getvalue()


# The transpose that, undone by ImageOps.exif_transpose, gives back the upright page.
_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


LAYOUTS = ("box", "lines", "table")


def _draw_page(
    amount: str, kwh: int, distributor: str, due: str, size: tuple[int, int], layout: str | None
) -> Image.Image:
    rng = random.Random(f"{distributor}{amount}{kwh}")
    layout = layout or rng.choice(LAYOUTS)
    w = size[0]
    s = w / 1240  # every coordinate below is for a 1240 px wide page
    page = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(page)

    def text(x: float, y: float, value: str, pt: int = 22, bold: bool = False, fill: object = "black") -> None:
        d.text((x * s, y * s), value, font=font(max(8, round(pt * s)), bold), fill=fill)

    def box(x0: float, y0: float, x1: float, y1: float, width: int = 2) -> None:
        d.rectangle((x0 * s, y0 * s, x1 * s, y1 * s), outline="black", width=max(1, round(width * s)))

    # Header band: the distributor's brand, white on its colour. OCR often loses it (on a
    # light band such as LIGHT's orange or EDP's red, always).
    colour = BRAND_COLOURS.get(distributor, (20, 60, 120))
    d.rectangle((0, 0, w, 130 * s), fill=colour)
    text(60, 25, distributor, 64, bold=True, fill="white")
    text(780, 35, "CONTA DE ENERGIA ELÉTRICA", 24, bold=True, fill="white")
    text(780, 75, "NOTA FISCAL / FATURA Nº 000.123.456", 18, fill="white")
    # The issuer, in dark print: a bill is a nota fiscal, which names its issuer and CNPJ.
    text(60, 142, f"{distributor} Distribuição S.A.  CNPJ 06.981.180/0001-16", 20)

    # Customer block.
    name = rng.choice(("MARIA DA SILVA SANTOS", "JOÃO PEREIRA LIMA", "ANA COSTA OLIVEIRA"))
    street = rng.choice(("RUA DAS FLORES", "AV BRASIL", "RUA SETE DE SETEMBRO"))
    box(50, 180, 1190, 370)
    text(70, 195, name, 26, bold=True)
    text(70, 240, f"{street}, {rng.randint(10, 2000)} - CENTRO")
    text(70, 275, f"CEP {rng.randint(10000, 99999)}-{rng.randint(100, 999)}  BELO HORIZONTE - MG")
    text(70, 320, f"Nº DA INSTALAÇÃO {rng.randint(3000000000, 3999999999)}", 22, bold=True)
    text(700, 320, "Classe: Residencial Bifásico", 20)

    # Meter readings; the "table" layout prints the consumption only here and in the items.
    previous = rng.randint(10000, 60000)
    y = 400
    text(60, y, "LEITURAS", 24, bold=True)
    box(50, y + 40, 1190, y + 150, 1)
    last = "Consumo kWh" if layout == "table" else "Constante"
    for x, label in ((70, "Medidor"), (280, "Leitura anterior"), (560, "Leitura atual"), (840, last)):
        text(x, y + 55, label, 20, bold=True)
    text(70, y + 100, f"{rng.randint(100000, 999999)}", 22)
    text(280, y + 100, f"{previous}", 22)
    text(560, y + 100, f"{previous + kwh}", 22)
    text(840, y + 100, str(kwh) if layout == "table" else "1", 22)

    # Consumption line, then the billed items that add up to the total.
    total = Decimal(amount.replace(".", "").replace(",", "."))
    y = 590
    if layout == "box":
        text(60, y, f"CONSUMO DO MÊS  {kwh} kWh", 28, bold=True)
    elif layout == "lines":
        text(60, y, f"Consumo (kWh)  {kwh}", 28, bold=True)
    unit = "KWH" if layout == "table" else "kWh"
    cip = Decimal(rng.choice(("18,40", "25,10", "31,75")).replace(",", "."))
    tusd = (total - cip) * Decimal("0.52")
    te = total - cip - tusd
    items = (
        ("Consumo Uso Sistema (TUSD)", f"{kwh} {unit}", brl(tusd)),
        ("Consumo Energia (TE)", f"{kwh} {unit}", brl(te)),
        ("Bandeira tarifária verde", "-", "0,00"),
        ("Contrib. Ilum. Pública Municipal", "-", brl(cip)),
    )
    y = 660
    box(50, y, 1190, y + 60 + 45 * len(items), 1)
    for x, label in ((70, "Descrição"), (620, "Quantidade"), (960, "Valor (R$)")):
        text(x, y + 15, label, 20, bold=True)
    for i, (label, qty, value) in enumerate(items):
        row = y + 60 + 45 * i
        text(70, row, label, 21)
        text(620, row, qty, 21)
        text(960, row, value, 21)

    # What everyone looks for: the due date and the total, printed three common ways.
    y = 960
    box(50, y, 1190, y + 150, 4)
    if layout == "box":
        text(80, y + 20, "VENCIMENTO", 26, bold=True)
        text(600, y + 20, "TOTAL A PAGAR", 26, bold=True)
        text(80, y + 70, due, 44, bold=True)
        text(600, y + 70, f"R$ {amount}", 44, bold=True)
    elif layout == "lines":
        text(80, y + 20, f"Vencimento: {due}", 32, bold=True)
        text(80, y + 80, f"Total a pagar (R$)  {amount}", 36, bold=True)
        text(780, y + 30, f"Fatura anterior: R$ {brl(total * Decimal('0.9'))}", 20)
    else:
        month = f"{int(due[3:5]) - 1 or 12:02d}/{due[6:]}"
        for x, label in ((80, "Mês/Ano"), (380, "Vencimento"), (720, "Valor a pagar (R$)")):
            text(x, y + 20, label, 26, bold=True)
        text(80, y + 75, month, 36)
        text(380, y + 75, due, 36, bold=True)
        text(720, y + 75, amount, 40, bold=True)

    # Consumption history: numbers an OCR parser must not confuse with this month's.
    y = 1150
    history = [max(10, kwh + rng.randint(-80, 80)) for _ in MONTHS]
    text(60, y, "HISTÓRICO DE CONSUMO", 22, bold=True)
    text(700, y, f"Média 12 meses: {sum(history) // 12} kWh", 20)
    for i, past in enumerate(history):
        x = 70 + i * 92
        bar = past * 120 // (kwh + 100)
        d.rectangle((x * s, (y + 170 - bar) * s, (x + 40) * s, (y + 170) * s), fill=(150, 150, 150))
        text(x - 5, y + 180, MONTHS[i], 16)
        text(x - 5, y + 205, str(past), 16)

    # Barcode and its digits.
    y = 1450
    x = 60.0
    while x < 1180:
        bar = rng.choice((2, 2, 4, 6))
        d.rectangle((x * s, y * s, (x + bar) * s, (y + 110) * s), fill="black")
        x += bar + rng.choice((2, 4, 6))
    digits = " ".join(f"{rng.randint(10**10, 10**11 - 1)}-{rng.randint(0, 9)}" for _ in range(4))
    text(60, y + 125, digits, 22)
    if layout != "lines":  # the payment slip names the payee; some bills print it nowhere else
        text(700, y - 40, f"Beneficiário: {distributor} Distribuição S.A.", 18)

    # Small print.
    text(60, 1640, "Reclamações e informações: 0800 721 0116. Ouvidoria ANEEL 167.", 15)
    text(60, 1665, "Tributos: ICMS e PIS/COFINS incluídos na tarifa conforme Lei 12.741/2012.", 15)
    return page


def _photograph(page: Image.Image, angle: float, noise: bool, seed: int) -> Image.Image:
    """What a phone makes of the page: turned and in perspective on a grey table, warm
    uneven light, a little out of focus, sensor noise."""
    table = (110, 105, 100)
    if angle:
        page = page.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=table)
    if not noise:
        return page
    rng = random.Random(seed)
    w, h = page.size
    # Keystone: the output rectangle samples a slightly skewed quad of the page.
    j = [rng.uniform(-0.02, 0.02) * w for _ in range(8)]
    quad = (j[0], j[1], j[2], h + j[3], w + j[4], h + j[5], w + j[6], j[7])
    page = page.transform((w, h), Image.Transform.QUAD, quad, Image.Resampling.BICUBIC, fillcolor=table)
    shade = Image.linear_gradient("L").resize((w, h)).point(lambda v: 255 - v // 4)  # darker below
    page = Image.composite(page, Image.new("RGB", (w, h), (60, 50, 40)), shade)
    page = page.filter(ImageFilter.GaussianBlur(rng.uniform(0.7, 1.2)))
    # Sensor grain around 128, from the seed (Pillow's effect_noise is unseeded: the same
    # bill would OCR differently from run to run). Two uniform draws make a triangle.
    a, b = rng.randbytes(w * h), rng.randbytes(w * h)
    grain = Image.blend(Image.frombytes("L", (w, h), a), Image.frombytes("L", (w, h), b), 0.5)
    grain = grain.point(lambda v: 128 + (v - 128) * 24 // 40).convert("RGB")
    page = Image.blend(page, grain, 0.18)
    return page.point(lambda v: min(255, v * 125 // 100))  # the camera's auto exposure


def big_photo(megabytes: float = 5) -> bytes:
    """A 4000x3000 high-entropy JPEG of at least `megabytes` (a phone photo's worth)."""
    w, h = 4000, 3000
    sigma = 30.0
    while True:
        channels = [Image.effect_noise((w, h), sigma) for _ in range(3)]
        photo = Image.merge("RGB", channels)
        buf = io.BytesIO()
        photo.save(buf, "JPEG", quality=95)
        if buf.tell() >= megabytes * 1024 * 1024:
            return buf.getvalue()
        sigma *= 1.5


def png_of_size(w: int, h: int, colour: int = 200) -> bytes:
    """A real, complete w x h greyscale PNG of one colour: huge on decoding, small on disk.
    Written by hand, so building it never needs w*h bytes of memory."""
    row = b"\x00" + bytes([colour]) * w  # filter type 0, then the pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return _png(w, h, idat)


def png_bomb(w: int = 50_000, h: int = 50_000) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb's calling card)."""
    return _png(w, h, zlib.compress(b"\x00" * 1024))


def _png(w: int, h: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
