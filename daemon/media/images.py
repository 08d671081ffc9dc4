"""Lead photos (mostly electricity bills) turned into one small, upright RGB JPEG.

Pure, synchronous CPU work: the caller runs it in the media worker pool under
`Timeouts.image_processing`. Every limit is checked as early and as cheaply as possible:
the byte size from the base64 length before decoding it, the pixel count from the image
header before decoding the pixels."""

from __future__ import annotations

import binascii
import hashlib
import io
import threading
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.config import Media
from daemon.media.refusal import MediaRefused

try:  # iPhone photos (HEIC), only when the optional plugin is installed
    import pillow_heif

    pillow_heif.register_heif_opener()
    _HEIF: tuple[str, ...] = ("HEIF",)
except ImportError:
    _HEIF = ()

# MPO is how Pillow names a JPEG carrying several pictures (many Android phones).
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", *_HEIF)
_ALLOWED_TEXT = ", ".join(["JPEG", "PNG", "WEBP", *_HEIF])
_MB = 1024 * 1024

# warnings.catch_warnings swaps process-wide state, so the (header-only) open that
# needs it is serialized; decoding, the expensive part, runs in parallel.
_OPEN_LOCK = threading.Lock()


@dataclass(frozen=True)
class PreparedImage:
    jpeg: bytes
    width: int
    height: int
    source_format: str
    source_width: int
    source_height: int
    sha256: str  # of the bytes received: the key of the cached analysis


def _payload_start(b64: str) -> int:
    """Where the base64 starts: after a `data:image/...;base64,` prefix, if any."""
    if b64.startswith("data:"):
        comma = b64.find(",", 0, 256)
        if comma != -1:
            return comma + 1
    return 0


def estimated_size(b64: str) -> int:
    """Decoded size in bytes, from the length alone (nothing is decoded or copied)."""
    length = len(b64) - _payload_start(b64)
    length -= b64.count("\n") + b64.count("\r")  # MIME line breaks carry no data
    tail = b64[-8:].rstrip()
    padding = len(tail) - len(tail.rstrip("="))
    return max(0, length * 3 // 4 - padding)


def decode(b64: str, max_bytes: int) -> bytes:
    size = estimated_size(b64)
    if size > max_bytes:
        raise MediaRefused("too_large", f"image of {size / _MB:.1f} MB, the limit is {max_bytes / _MB:.1f} MB")
    payload = "".join(b64[_payload_start(b64) :].split())  # tolerate whitespace/newlines
    try:
        data = binascii.a2b_base64(payload, strict_mode=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII characters
        raise MediaRefused("corrupt", f"the image's base64 is invalid: {exc}") from None
    if not data:
        raise MediaRefused("corrupt", "the image is empty")
    return data


def prepare(data: bytes, media: Media) -> PreparedImage:
    """Raises MediaRefused for anything that is not a sane JPEG/PNG/WEBP within limits."""
    img, bomb_warning = _open(data)
    with img:
        source_format = "JPEG" if img.format == "MPO" else str(img.format)
        if img.format not in ALLOWED_FORMATS:
            message = f"{img.format} images are not accepted; allowed: {_ALLOWED_TEXT}"
            raise MediaRefused("unsupported_format", message)
        width, height = img.size
        if width * height > media.max_pixels:
            raise MediaRefused(
                "too_many_pixels",
                f"image of {width}x{height} = {width * height / 1e6:.0f} MP, "
                f"the limit is {media.max_pixels / 1e6:.0f} MP",
            )
        if bomb_warning:  # within our limit but above Pillow's: its guard still holds
            raise MediaRefused("decompression_bomb", f"refused by Pillow: {bomb_warning}")
        try:
            out = _to_rgb_within(img, media.max_dimension)
        except Image.DecompressionBombError as exc:
            raise MediaRefused("decompression_bomb", f"refused by Pillow: {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or broken data
            message = f"the {source_format} image cannot be decoded: {exc}"
            raise MediaRefused("corrupt", message) from None
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=media.jpeg_quality, optimize=False)  # no EXIF: no GPS kept
    return PreparedImage(
        jpeg=buf.getvalue(),
        width=out.width,
        height=out.height,
        source_format=source_format,
        source_width=width,
        source_height=height,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _open(data: bytes) -> tuple[Image.Image, str | None]:
    """Reads only the header. Pillow's own bomb guard (a warning above
    Image.MAX_IMAGE_PIXELS, an error above twice that) becomes a refusal; its warning is
    recorded and returned rather than raised, so our more precise pixel check goes first."""
    with _OPEN_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise MediaRefused("decompression_bomb", f"refused by Pillow: {exc}") from None
        except UnidentifiedImageError:
            raise MediaRefused(
                "not_an_image", f"the file is not an image we can read; allowed: {_ALLOWED_TEXT}"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise MediaRefused("corrupt", f"the image header is broken: {exc}") from None
    bomb = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    for w in caught:  # not ours to swallow
        if w not in bomb:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return img, str(bomb[0].message) if bomb else None


def _to_rgb_within(img: Image.Image, max_dimension: int) -> Image.Image:
    """Upright RGB fitting max_dimension x max_dimension (never enlarged); alpha on white."""
    if img.format in ("JPEG", "MPO"):
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: faster and a fraction of the memory.
        img.draft("RGB", _fit(img.size, max_dimension))
    # Phones store the sensor's rotation in EXIF. In place: no copy of an upright image.
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode.startswith("I"):  # 16-bit greyscale (scanners): scale to 8 bits, don't clip
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    img = img.convert("RGBA" if has_alpha else "RGB")
    img.thumbnail((max_dimension, max_dimension), Image.Resampling.LANCZOS)
    if has_alpha:
        page = Image.new("RGB", img.size, "white")
        page.paste(img, mask=img.getchannel("A"))
        img = page
    return img


def _fit(size: tuple[int, int], box: int) -> tuple[int, int]:
    scale = min(1.0, box / max(size))
    return max(1, int(size[0] * scale)), max(1, int(size[1] * scale))


def warm_up(media: Media) -> None:
    """Runs `prepare` once on a tiny JPEG, so Pillow's lazy imports (plugins, encoders)
    happen now, not on the event loop's time while the first real photos are prepared."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, "JPEG")
    prepare(buf.getvalue(), media)
