"""Turns a lead's photo or voice note into what the turn can use: a bill reading, a
transcript, or a reason it could not.

- The bytes come from the webhook (`base64`, when the instance sends it) or from the
  Evolution API, never from WhatsApp's encrypted CDN `url`.
- Size is checked from the base64 length before anything is decoded.
- Decoding, resizing and hashing run in a bounded pool of worker processes; OCR and ffmpeg run in
  subprocesses: nothing CPU-heavy runs on the event loop.
- Results are cached by the content's sha256, so the same photo sent again (or by
  another daemon) is analysed once.
- `analyse` never raises (except cancellation): every failure becomes a result the agent
  can answer gracefully."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import httpx

from daemon.cache import TwoTierCache
from daemon.config import Config, Media
from daemon.errors import MediaUnavailable
from daemon.evolution import EvolutionClient
from daemon.media import audio, bill, images
from daemon.media.refusal import MediaRefused
from daemon.media.result import MediaResult
from daemon.metrics import Metrics
from daemon.models import PendingMessage

log = logging.getLogger("sdr.media")
T = TypeVar("T")


class MediaProcessor:
    def __init__(
        self, config: Config, sender: EvolutionClient | None, cache: TwoTierCache[dict[str, Any]], metrics: Metrics
    ) -> None:
        self.config = config
        self.media = config.profile.media
        self.timeouts = config.profile.timeouts
        self.sender = sender
        self.cache = cache
        self.metrics = metrics
        # Worker processes, not threads: decoding and resizing hold the GIL in stretches
        # that, from threads, stalled the event loop for 60-140 ms (measured). Spawned, not
        # forked: a fork of a process with running threads and an event loop is unsafe.
        # Each worker warms Pillow up (its lazy plugin imports) when it starts.
        self.pool = ProcessPoolExecutor(
            max_workers=self.media.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_start,
            initargs=(self.media,),
        )
        # OCR and ffmpeg subprocesses, as many at once as worker threads: more would only
        # fight for the same cores (and the event loop's).
        self.subprocesses = asyncio.Semaphore(self.media.workers)
        self.transcriber = audio.make_transcriber(config)
        self.ocr = self.media.ocr and bill.tesseract_available()
        if self.media.ocr and not self.ocr:
            log.warning(
                "tesseract (with Portuguese) is not installed: bills are not read; the agent asks for the value"
            )
        if not audio.ffmpeg_available():
            log.warning("ffmpeg is not installed: voice notes are not converted; the agent asks the lead to type")

    async def close(self) -> None:
        # Waits for the workers to exit (in a thread: never block the loop); work not
        # started is dropped, as the turns that wanted it are being cancelled too.
        await asyncio.to_thread(self.pool.shutdown, wait=True, cancel_futures=True)
        if self.transcriber is not None:
            await self.transcriber.close()

    async def _cpu(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # --- entry point --------------------------------------------------------------------

    async def analyse(self, msg: PendingMessage) -> MediaResult:
        kind = msg.kind
        try:
            result = await self._analyse(msg)
        except MediaRefused as exc:
            log.info("%s refused: %s", kind, exc)
            result = MediaResult(msg.id, kind, "refused", exc.reason)
        except TimeoutError as exc:
            log.warning("%s timed out: %s", kind, exc or "over its time budget")
            result = MediaResult(msg.id, kind, "timeout", "timeout")
        except (MediaUnavailable, audio.TranscriptionError, httpx.HTTPError, RuntimeError, OSError) as exc:
            log.warning("%s failed: %s: %s", kind, exc.__class__.__name__, exc)
            result = MediaResult(msg.id, kind, "failed", exc.__class__.__name__)
        self.metrics.media.labels(kind, result.outcome).inc()
        return result

    async def _analyse(self, msg: PendingMessage) -> MediaResult:
        meta = msg.media or {}
        b64 = meta.get("base64")
        if not isinstance(b64, str) or not b64:
            b64 = await self._fetch(meta)
        limit = self.media.max_image_bytes if msg.kind == "image" else self.config.webhook.max_body_bytes
        data, digest = await self._cpu(_decode_and_hash, b64, limit)
        jpeg: list[bytes] = []  # the prepared photo, when this call prepared it
        ran: list[bool] = []

        async def load() -> dict[str, Any]:
            # Refusals are cached (the same bytes are refused again); timeouts and
            # failures raise, so they are not.
            ran.append(True)
            try:
                if msg.kind == "image":
                    return await self._image(data, jpeg)
                return await self._audio(data)
            except MediaRefused as exc:
                return _doc(msg.kind, "refused", exc.reason)

        doc = await self.cache.get_or_load(digest, load)
        return MediaResult(message_id=msg.id, cached=not ran, jpeg=jpeg[0] if jpeg else None, **doc)

    async def _fetch(self, meta: dict[str, Any]) -> str:
        key = meta.get("key")
        if self.sender is None or not isinstance(key, dict):
            raise MediaUnavailable("the event carried no base64 and no Evolution API is configured")
        return await self.sender.get_media(key, meta.get("instance"), self.timeouts.evolution_read)

    # --- images -------------------------------------------------------------------------

    async def _image(self, data: bytes, jpeg_out: list[bytes]) -> dict[str, Any]:
        limit = self.timeouts.image_processing or None  # 0 = no limit (legacy)
        async with asyncio.timeout(limit):
            prepared = await self._cpu(images.prepare, data, self.media)
        jpeg_out.append(prepared.jpeg)
        doc = _doc("image", "ok")
        if not self.ocr:
            return _doc("image", "unavailable", "no_ocr")
        async with self.subprocesses:
            reading = await bill.read_bill(prepared.jpeg, self.timeouts.image_processing)
        if reading.found():
            doc["bill"] = {
                "amount": str(reading.amount) if reading.amount is not None else None,
                "kwh": reading.kwh,
                "distributor": reading.distributor,
                "due_date": reading.due_date.isoformat() if reading.due_date else None,
            }
        return doc

    # --- voice notes --------------------------------------------------------------------

    async def _audio(self, data: bytes) -> dict[str, Any]:
        t = self.timeouts.audio_processing
        doc = _doc("audio", "ok")
        if not audio.ffmpeg_available():
            return _doc("audio", "unavailable", "no_ffmpeg")
        async with self.subprocesses:
            seconds = await audio.probe_seconds(data, t)
        doc["seconds"] = seconds
        try:
            audio.check_duration(seconds, self.media.max_audio_seconds)
        except MediaRefused as exc:
            return {**doc, "outcome": "refused", "reason": exc.reason}
        if self.transcriber is None:
            return {**doc, "outcome": "unavailable", "reason": "no_transcription"}
        async with self.subprocesses:
            wav = await audio.to_wav(data, t)
        doc["transcript"] = await self.transcriber.transcribe(wav)
        return doc


def _worker_start(media: Media) -> None:
    """In each worker: Ctrl-C or a service manager's SIGTERM reaches the whole process
    group, but only the daemon decides when workers stop (it shuts the pool down; a worker
    whose daemon died exits when its pipe closes). Then Pillow's lazy imports, paid now."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    images.warm_up(media)


def _decode_and_hash(b64: str, limit: int) -> tuple[bytes, str]:
    data = images.decode(b64, limit)  # refuses oversize input before decoding
    return data, hashlib.sha256(data).hexdigest()


def _doc(kind: str, outcome: str, reason: str | None = None) -> dict[str, Any]:
    """What is cached of a result, by content hash: not the photo, not the message id."""
    return {"kind": kind, "outcome": outcome, "reason": reason, "bill": None, "transcript": None, "seconds": None}
