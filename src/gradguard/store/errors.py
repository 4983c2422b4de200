"""What the run store raises and warns."""

from __future__ import annotations


class StoreError(OSError):
    """Writing the run store failed (disk full, read-only folder, a writer already closed)."""


class RunLockedError(StoreError):
    """Another live writer holds this run folder (for this rank); the message names it."""


class RunNotFoundError(FileNotFoundError):
    """The path is missing or is not a run folder (no meta.json, shards or events)."""


class RunStoreWarning(UserWarning):
    """A run folder was read with something skipped or repaired: a damaged or foreign shard,
    an unreadable meta.json, a bad events line, rows written twice. The message names the
    file; ``Run.notes`` lists the same."""
