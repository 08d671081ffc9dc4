"""The one exception media code raises for input it will not process."""

from __future__ import annotations

from daemon.errors import SdrError


class MediaRefused(SdrError):
    """Input we refuse on purpose: too big, not an image, a voice note too long...
    `reason` is a short code (metrics labels, the turn record); the message says what is
    wrong and what is allowed, for logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[MediaRefused], tuple[str, str]]:
        # Raised in worker processes: must survive pickling back to the daemon.
        return (MediaRefused, (self.reason, str(self)))
