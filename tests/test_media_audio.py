"""Voice notes with the real ffmpeg (duration, refusals, WAV conversion, timeouts that leave
no process behind) and the Transcriber against the fake OpenAI API over real HTTP."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import struct
import tempfile
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.embedded import Endpoints
from daemon.media import audio
from daemon.media.refusal import MediaRefused
from daemon.testing.fake_openai import FakeOpenAI, run_fake_openai
from tests.helpers import make_config
from tests.voice import NOT_AUDIO, require_ffmpeg, voice_note

UNUSED = Endpoints("postgresql://unused", "unix:///unused")  # no database or Redis needed
KEY = "sk-test-0123456789"


@pytest.fixture(autouse=True)
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ffmpeg is required (no skips), and temporary files go where the test can see them."""
    require_ffmpeg()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def ffmpeg_children() -> list[str]:
    """ffmpeg/ffprobe processes whose parent is this test process, zombies included."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if int(rest[1]) == os.getpid() and comm.startswith("ff"):
            found.append(f"{stat.parent.name} {comm} state {rest[0]}")
    return found


# --- duration ---------------------------------------------------------------------------


async def test_a_three_minute_note_is_refused_as_too_long() -> None:
    seconds = await audio.probe_seconds(voice_note(180), timeout=5)
    assert seconds == pytest.approx(180, abs=0.1)
    with pytest.raises(MediaRefused) as refused:
        audio.check_duration(seconds, 120)
    assert refused.value.reason == "too_long"
    assert str(refused.value) == "voice note of 180 s, the limit is 120 s"


def test_check_duration_accepts_notes_up_to_the_limit_and_names_a_near_miss() -> None:
    audio.check_duration(119.9, 120)
    audio.check_duration(120, 120)
    with pytest.raises(MediaRefused, match=r"of 120\.3 s, the limit is 120 s"):
        audio.check_duration(120.3, 120)


@pytest.mark.parametrize("fmt", ["ogg", "mp3", "wav", "webm"])
async def test_formats_are_probed_including_a_webm_without_a_duration(fmt: str) -> None:
    # webm written to a pipe has no duration in its header: the stream is read instead.
    assert await audio.probe_seconds(voice_note(10, fmt), timeout=5) == pytest.approx(10, abs=0.15)


@pytest.mark.parametrize(
    "data", [NOT_AUDIO, b"", "Oi, tudo bem? Segue o áudio".encode()], ids=["blob", "empty", "text"]
)
async def test_not_audio_is_refused(data: bytes, private_tmp: Path) -> None:
    with pytest.raises(MediaRefused) as probed:
        await audio.probe_seconds(data, timeout=5)
    with pytest.raises(MediaRefused) as converted:
        await audio.to_wav(data, timeout=5)
    assert probed.value.reason == converted.value.reason == "not_audio"
    assert str(private_tmp) not in str(converted.value)  # the temporary path is not leaked
    assert list(private_tmp.iterdir()) == []


# --- conversion -------------------------------------------------------------------------


async def test_a_ten_second_note_is_probed_and_converted_to_16k_mono_wav(private_tmp: Path) -> None:
    note = voice_note(10)
    assert await audio.probe_seconds(note, timeout=5) == pytest.approx(10, abs=0.1)
    wav = await audio.to_wav(note, timeout=5)

    riff, riff_size, wave_id = struct.unpack_from("<4sI4s", wav)
    fmt_id, _, pcm, channels, rate, byte_rate, align, bits = struct.unpack_from("<4sIHHIIHH", wav, 12)
    assert (riff, wave_id, fmt_id) == (b"RIFF", b"WAVE", b"fmt ")
    assert (pcm, channels, rate, bits) == (1, 1, 16000, 16)
    assert (byte_rate, align) == (32000, 2)
    assert riff_size == len(wav) - 8  # the sizes ffmpeg cannot write to a pipe are filled in
    with wave.open(io.BytesIO(wav)) as reader:  # a strict reader agrees
        assert reader.getnframes() == pytest.approx(160_000, rel=0.01)
    assert list(private_tmp.iterdir()) == []  # the temporary copy is gone


async def test_a_conversion_past_its_timeout_is_killed_and_reaped(
    private_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    note = voice_note(10)  # made first: only the conversion is under the timeout
    started: list[asyncio.subprocess.Process] = []
    real_exec = asyncio.create_subprocess_exec

    async def at_playback_speed(program: str, *args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        # -re: ffmpeg reads the note at its own pace, so converting it takes 10 s on any
        # machine, idle or loaded, and the 1 s timeout always comes first.
        started.append(await real_exec(program, "-re", *args, **kwargs))
        return started[-1]

    monkeypatch.setattr(asyncio, "create_subprocess_exec", at_playback_speed)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(30):  # only a guard: unkilled, ffmpeg would block on its full pipe
            await audio.to_wav(note, timeout=1)
    # Killed and reaped at the timeout (unkilled, it would never exit: nobody reads its pipe).
    assert [p.returncode for p in started] == [-signal.SIGKILL]
    assert ffmpeg_children() == []
    assert list(private_tmp.iterdir()) == []


async def test_a_probe_past_its_timeout_is_killed_and_reaped() -> None:
    with pytest.raises(TimeoutError):
        await audio.probe_seconds(voice_note(180), timeout=0.01)
    assert ffmpeg_children() == []


def test_ffmpeg_is_available() -> None:
    assert audio.ffmpeg_available()


# --- transcription ----------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with run_fake_openai() as server:
        yield server


@pytest.fixture
async def transcriber(fake: FakeOpenAI) -> AsyncIterator[audio.Transcriber]:
    t = audio.Transcriber(fake.url, "whisper-test", KEY, timeout=5, max_connections=4)
    yield t
    await t.close()


async def test_transcriber_posts_the_wav_as_multipart_and_returns_the_text(
    fake: FakeOpenAI, transcriber: audio.Transcriber
) -> None:
    fake.transcript = "  Oi, minha conta de luz vem uns 400 reais por mês\n"
    wav = await audio.to_wav(voice_note(3), timeout=5)
    assert await transcriber.transcribe(wav) == "Oi, minha conta de luz vem uns 400 reais por mês"
    [sent] = fake.transcriptions
    assert sent["file_bytes"] == wav
    assert (sent["filename"], sent["content_type"]) == ("voice.wav", "audio/wav")
    assert (sent["model"], sent["language"], sent["response_format"]) == ("whisper-test", "pt", "json")
    assert sent["authorization"] == f"Bearer {KEY}"


async def test_transcriber_without_key_sends_no_authorization(fake: FakeOpenAI) -> None:
    t = audio.Transcriber(fake.url, "whisper-test", None, timeout=5, max_connections=4)
    try:
        await t.transcribe(b"RIFF")
    finally:
        await t.close()
    assert fake.transcriptions[0]["authorization"] is None


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
async def test_error_statuses_raise_transcription_error(
    fake: FakeOpenAI, transcriber: audio.Transcriber, status: int
) -> None:
    fake.status = status
    with pytest.raises(audio.TranscriptionError, match=f"HTTP {status}: fake failure"):
        await transcriber.transcribe(b"RIFF")


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("<html>oops</html>", "not JSON"),
        ('{"txt": "Oi"}', "no `text`"),
        ('["Oi"]', "no `text`"),
        ('{"text": "  "}', "empty"),
        ('{"text": null}', "empty"),
    ],
)
async def test_malformed_answers_raise_transcription_error(
    fake: FakeOpenAI, transcriber: audio.Transcriber, raw: str, why: str
) -> None:
    fake.raw = raw
    with pytest.raises(audio.TranscriptionError, match=why):
        await transcriber.transcribe(b"RIFF")


async def test_a_slow_api_raises_transcription_error_at_the_timeout(fake: FakeOpenAI) -> None:
    fake.delay = 2
    t = audio.Transcriber(fake.url, "whisper-test", KEY, timeout=0.05, max_connections=4)
    try:
        with pytest.raises(audio.TranscriptionError, match="no answer within 0.05s"):
            await t.transcribe(b"RIFF")
    finally:
        await t.close()


async def test_make_transcriber_follows_the_config(fake: FakeOpenAI) -> None:
    assert audio.make_transcriber(make_config(UNUSED)) is None  # no transcription_url
    config = make_config(UNUSED, SDR_AGENT_TRANSCRIPTION_URL=fake.url, OPENAI_API_KEY=KEY)
    t = audio.make_transcriber(config)
    assert t is not None
    try:
        assert await t.transcribe(b"RIFF") == fake.transcript
    finally:
        await t.close()
    assert fake.transcriptions[0]["model"] == config.agent.transcription_model
    assert fake.transcriptions[0]["authorization"] == f"Bearer {KEY}"
