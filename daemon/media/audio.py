"""Voice notes: their duration and a 16 kHz mono WAV (ffmpeg in subprocesses, never on the
event loop), then the text (an OpenAI-compatible `/audio/transcriptions` API).

ffmpeg reads a private temporary file, not a pipe: from a pipe ffprobe reports no duration
for ogg, mp3 or wav, and an m4a whose index (`moov`) comes last cannot be decoded at all."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import httpx

from daemon.config import Config
from daemon.errors import SdrError
from daemon.media.refusal import MediaRefused
from daemon.openai_http import error_text, one_line

log = logging.getLogger("sdr.media")

QUIET = ("-hide_banner", "-v", "error")
# Only demuxers a voice note may use (WhatsApp's ogg/opus, mp3, m4a = mov, wav and common
# recorder formats), only the file we wrote: playlists, concat scripts and images are
# refused before they are parsed, so a crafted note cannot make ffmpeg open anything else.
INPUT = ("-format_whitelist", "ogg,mp3,mov,wav,matroska,aac,flac,amr", "-protocol_whitelist", "file")
PROBE = ("-select_streams", "a:0", "-show_entries", "stream=codec_type:format=duration", "-of", "json")
# Demuxing only (-c copy), with machine-readable progress: the last out_time is the length.
STREAM_TIME = ("-map", "0:a:0", "-c", "copy", "-f", "null", "-", "-nostats", "-progress", "pipe:1")
WAV_OUT = (
    "-map",
    "0:a:0",
    "-ac",
    "1",
    "-ar",
    "16000",
    "-c:a",
    "pcm_s16le",
    "-map_metadata",
    "-1",
    "-fflags",
    "+bitexact",
    "-f",
    "wav",
    "pipe:1",
)


class TranscriptionError(SdrError):
    """The transcription API failed or answered no usable text; the lead is asked to type."""


@functools.cache
def ffmpeg_available() -> bool:
    return shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


async def probe_seconds(data: bytes, timeout: float) -> float:
    """The note's length, read from its container (ffprobe); raises TimeoutError at
    `timeout` and MediaRefused("not_audio") for anything that is not playable audio."""
    _refuse_empty(data)
    async with asyncio.timeout(timeout):
        with _spooled(data) as src:
            out = _checked("ffprobe", await _run("ffprobe", *QUIET, *INPUT, "-i", src, *PROBE), src)
            info: Any = json.loads(out or b"{}")
            if not info.get("streams"):
                raise MediaRefused("not_audio", "the file has no audio stream")
            seconds = _number(info.get("format", {}).get("duration"))
            if seconds is None:  # e.g. webm from a browser recorder: no duration in the header
                log.debug("no duration in the container: reading the whole stream")
                seconds = await _streamed_seconds(src)
    return seconds


async def _streamed_seconds(src: str) -> float:
    """The last packet's time, demuxing without decoding (-c copy): fast even for long notes."""
    out = _checked("ffmpeg", await _run("ffmpeg", *QUIET, *INPUT, "-i", src, *STREAM_TIME), src)
    lines = out.decode(errors="replace").splitlines()
    times = [line.removeprefix("out_time_us=") for line in lines if line.startswith("out_time_us=")]
    last = _number(times[-1]) if times else None
    if last is None:
        raise MediaRefused("not_audio", "no audio could be read from the file")
    return last / 1e6


def check_duration(seconds: float, limit: float) -> None:
    if seconds > limit:
        shown = f"{seconds:.0f}"
        if float(shown) <= limit:  # 120.3 s must not read "120 s, the limit is 120 s"
            shown = f"{seconds:.1f}"
        raise MediaRefused("too_long", f"voice note of {shown} s, the limit is {limit:g} s")


async def to_wav(data: bytes, timeout: float) -> bytes:
    """16 kHz mono 16-bit PCM WAV, what speech-to-text models expect. Raises TimeoutError at
    `timeout` (ffmpeg killed), MediaRefused("not_audio") for input ffmpeg cannot decode and
    RuntimeError when ffmpeg itself dies."""
    _refuse_empty(data)
    async with asyncio.timeout(timeout):
        with _spooled(data) as src:
            out = _checked("ffmpeg", await _run("ffmpeg", *QUIET, *INPUT, "-i", src, *WAV_OUT), src)
    wav, samples = _with_sizes(out)
    if not samples:
        raise MediaRefused("not_audio", "no audio could be decoded from the file")
    return wav


def _refuse_empty(data: bytes) -> None:
    if not data:
        raise MediaRefused("not_audio", "the voice note is empty")


@contextlib.contextmanager
def _spooled(data: bytes) -> Iterator[str]:
    """The note in a file of a fresh private (0700) folder, removed afterwards whatever happens.
    A note is a few hundred KB: writing it to the page cache blocks the loop well under 1 ms."""
    folder = tempfile.mkdtemp(prefix="sdr-audio-")
    try:
        path = os.path.join(folder, "note")
        with open(path, "wb") as fh:
            fh.write(data)
        yield f"file:{path}"  # "file:" so a ':' in TMPDIR is not read as a protocol
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _run(*args: str) -> tuple[int, bytes, bytes]:
    """Runs a tool to completion; on timeout or cancellation it is killed and reaped before
    the error propagates, so no ffmpeg outlives the turn that started it."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except FileNotFoundError:
        raise RuntimeError(f"{args[0]} is not installed: apt-get install ffmpeg") from None
    try:
        out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


def _checked(tool: str, result: tuple[int, bytes, bytes], src: str) -> bytes:
    """stdout of a run that succeeded. An error exit means ffmpeg could not make sense of
    the input (a refusal); death by a signal is a crash of ours (a failure)."""
    code, out, err = result
    if code < 0:
        raise RuntimeError(f"{tool} was killed by signal {-code}")
    if code:
        lines = err.decode(errors="replace").replace(src, "input").strip().splitlines()
        detail = lines[-1][:200] if lines else f"exit status {code}"
        raise MediaRefused("not_audio", f"not a playable voice note: {detail}")
    return out


def _with_sizes(wav: bytes) -> tuple[bytes, int]:
    """Writing to a pipe, ffmpeg cannot seek back to fill in the RIFF and data sizes (it
    leaves 0xFFFFFFFF); strict readers want the real ones. Returns the WAV and its samples."""
    buf = bytearray(wav)
    if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        raise RuntimeError("ffmpeg wrote no WAV header")
    struct.pack_into("<I", buf, 4, len(buf) - 8)
    pos = 12
    while pos + 8 <= len(buf):
        chunk, size = bytes(buf[pos : pos + 4]), struct.unpack_from("<I", buf, pos + 4)[0]
        if chunk == b"data":
            size = len(buf) - pos - 8
            struct.pack_into("<I", buf, pos + 4, size)
            return bytes(buf), size // 2
        pos += 8 + size + (size & 1)
    raise RuntimeError("ffmpeg wrote a WAV without a data chunk")


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # ffprobe's "N/A", a missing field
        return None


# --- transcription ----------------------------------------------------------------------


class Transcriber:
    """An OpenAI-compatible `/audio/transcriptions` API (Whisper and the like) through one
    pooled httpx client."""

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float, max_connections: int) -> None:
        self.model = model
        self.timeout = timeout
        self._key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def transcribe(self, wav: bytes) -> str:
        files = {"file": ("voice.wav", wav, "audio/wav")}
        fields = {"model": self.model, "language": "pt", "response_format": "json"}
        try:
            resp = await self.http.post("/audio/transcriptions", files=files, data=fields)
        except httpx.TimeoutException:
            raise TranscriptionError(f"transcription: no answer within {self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise TranscriptionError(f"transcription: request failed: {self._one_line(exc)}") from None
        if not resp.is_success:
            detail = self._one_line(error_text(resp))
            raise TranscriptionError(f"transcription: HTTP {resp.status_code}: {detail}")
        try:
            text = resp.json()["text"]
        except ValueError:  # not JSON, or not even UTF-8
            raise TranscriptionError("transcription: the answer is not JSON") from None
        except (KeyError, TypeError):
            raise TranscriptionError("transcription: the answer has no `text`") from None
        if not isinstance(text, str) or not text.strip():
            raise TranscriptionError("transcription: the text is empty (a silent note?)")
        return text.strip()

    def _one_line(self, what: object) -> str:
        return one_line(what, self._key)


def make_transcriber(config: Config) -> Transcriber | None:
    """None when no transcription API is configured (the agent asks the lead to type)."""
    agent, profile = config.agent, config.profile
    if not agent.transcription_url:
        return None
    return Transcriber(
        agent.transcription_url,
        agent.transcription_model,
        config.agent_api_key,
        profile.timeouts.audio_processing,
        profile.pools.http_max_connections,
    )
