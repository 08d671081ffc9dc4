"""What the turn learns from one image or voice note."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ok: analysed; refused: input we will not process (too big, too long, not an image...);
# failed: an error on our side or the Evolution API's; timeout: over its time budget;
# unavailable: nothing here can do it (no Tesseract, no transcription service configured).
OUTCOMES = ("ok", "refused", "failed", "timeout", "unavailable")


@dataclass(frozen=True)
class MediaResult:
    message_id: int
    kind: str  # image | audio
    outcome: str
    reason: str | None = None  # the refusal code or the error, for metrics and logs
    bill: dict[str, Any] | None = None  # amount (str, R$), kwh, distributor, due_date (ISO)
    transcript: str | None = None
    seconds: float | None = None  # a voice note's duration
    jpeg: bytes | None = field(default=None, repr=False)  # the prepared photo (vision models)
    cached: bool = False
