"""Our small exception tree: every error sdrctl raises on purpose is an `SdrError`.
Library errors are converted at the boundary into these (the store's driver errors in
`daemon.connections.pg_boundary`), so callers and the CLI can tell a user's mistake from
an outage, and a retry from a give-up."""

from __future__ import annotations


class SdrError(Exception):
    """Base of every error sdrctl raises on purpose; the message is one sentence for a user."""


class ConfigError(SdrError):
    """The configuration or a profile is invalid: names the file, the key and what is allowed."""


class UnavailableError(SdrError):
    """A dependency (Postgres, Redis, Evolution API) cannot be reached right now; retry later."""


class DatabaseError(UnavailableError):
    """PostgreSQL failed a query or cannot be reached (the driver's error, converted)."""


class DatabaseTimeout(DatabaseError, TimeoutError):
    """A query ran past its `[timeouts] database`; a TimeoutError too, so a turn's stage
    that waited on it is recorded as timed out, as before the conversion."""


class MigrationError(SdrError):
    """A migration cannot be applied, or migrations are pending where they must not be."""


class EmbeddedError(SdrError):
    """The embedded PostgreSQL or Redis could not be started."""


class AgentError(SdrError):
    """The agent backend failed to produce a reply (HTTP error, bad answer)."""


class NotFoundError(SdrError):
    """What a command names (a follow-up, a lead) is not in the database."""


class BadPayload(SdrError):
    """A webhook body is not a valid event: `status` 400 (not JSON) or 422 (wrong shape)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TooLarge(SdrError):
    """A webhook body is over `[limits] max_body_bytes`: answered 413."""


class StageFailed(SdrError):
    """A turn's stage timed out or raised; already recorded on the turn and counted."""


class SendFailed(SdrError):
    """A send that did not certainly arrive, by what a later try can do about it:
    - `transient`: certainly not delivered (no connection, or Evolution's 400 wrapping a
      WhatsApp reconnect, a time-out or a rate limit): try again;
    - `uncertain`: the request was written and no answer came (a timeout, a dropped
      connection, a 5xx): it may have been delivered, so look before sending again;
    - `unreachable`: Evolution answered `exists: false`: no try can reach this number;
    - `refused`: any other 4xx (a bad request, a wrong key or instance): final."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def retryable(self) -> bool:
        return self.kind == "transient"

    @property
    def uncertain(self) -> bool:
        return self.kind == "uncertain"

    @property
    def final(self) -> bool:
        return self.kind in ("unreachable", "refused")


class MediaUnavailable(SdrError):
    """The Evolution API could not give us a media file."""


class LeaseLapsed(SdrError):
    """The lead's lock a send was made under lapsed (the process was frozen past its TTL):
    not sent; whoever holds the lead now (re-delivery, under its own lock) sends it."""
