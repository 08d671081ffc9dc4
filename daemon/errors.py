"""Our small exception tree. Library errors are converted at the boundary into these,
so callers (and the CLI) can tell a user's mistake from an outage."""

from __future__ import annotations


class SdrError(Exception):
    """Base of every error sdrctl raises on purpose; the message is one sentence for a user."""


class ConfigError(SdrError):
    """The configuration or a profile is invalid: names the file, the key and what is allowed."""


class UnavailableError(SdrError):
    """A dependency (Postgres, Redis, Evolution API) cannot be reached right now; retry later."""


class MigrationError(SdrError):
    """A migration cannot be applied, or migrations are pending where they must not be."""


class EmbeddedError(SdrError):
    """The embedded PostgreSQL or Redis could not be started."""


class AgentError(SdrError):
    """The agent backend failed to produce a reply (HTTP error, bad answer)."""


class NotFoundError(SdrError):
    """What a command names (a follow-up, a lead) is not in the database."""
