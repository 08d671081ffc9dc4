"""Real voice notes for the tests, made by ffmpeg from a sine tone (cached per session)."""

from __future__ import annotations

import functools
import shutil
import subprocess

from tests.helpers import child_env

# An Opus voice note as WhatsApp sends it (ogg), plus the formats leads attach from phones.
# 16 kHz, 8 kbit/s, fastest settings: a 3-minute note takes ~0.3 s to make.
CODECS = {
    "ogg": ("-c:a", "libopus", "-b:a", "8k", "-compression_level", "0", "-frame_duration", "60", "-f", "ogg"),
    "mp3": ("-c:a", "libmp3lame", "-b:a", "32k", "-f", "mp3"),
    "wav": ("-c:a", "pcm_s16le", "-f", "wav"),
    # A browser recording: a webm written to a pipe carries no duration in its header.
    "webm": ("-c:a", "libopus", "-b:a", "8k", "-f", "webm"),
}

# Bytes with no container ffmpeg knows: what a lead's "audio" could be after a broken upload.
NOT_AUDIO = b"%PDF-1.4\n% not a voice note\n" + bytes(range(256)) * 16


def require_ffmpeg() -> None:
    if not (shutil.which("ffmpeg") and shutil.which("ffprobe")):
        raise AssertionError("ffmpeg and ffprobe are needed for these tests: apt-get install ffmpeg")


@functools.cache
def voice_note(seconds: float, fmt: str = "ogg") -> bytes:
    """A `seconds`-long 220 Hz tone in `fmt` (ogg, mp3, wav or webm)."""
    require_ffmpeg()
    source = f"sine=frequency=220:duration={seconds}:sample_rate=16000"
    cmd = ["ffmpeg", "-hide_banner", "-v", "error", "-f", "lavfi", "-i", source, *CODECS[fmt], "pipe:1"]
    return subprocess.run(cmd, capture_output=True, check=True, timeout=30, env=child_env()).stdout
