"""Every error the service raises on purpose.

Each one is something a user can act on; the CLI prints it as one line, never a traceback.
"""

from __future__ import annotations


class WildrydesError(Exception):
    """Base class: the message is one line saying what is wrong, where, and what to do."""


class ConfigError(WildrydesError):
    """A setting is missing, malformed or out of range."""


class MissingResourceError(WildrydesError):
    """The stream or table the service needs does not exist."""


class LeaseLostError(WildrydesError):
    """Another worker took the lease of a shard: this worker must stop processing it."""

    def __init__(self, shard_id: str) -> None:
        super().__init__(f"lease on shard {shard_id} is held by another worker")
        self.shard_id = shard_id


class EmulatorError(WildrydesError):
    """A local emulator could not be found or started."""


class RecordError(WildrydesError):
    """A Kinesis record cannot be turned into a table item (goes to the dead-letter destination)."""
