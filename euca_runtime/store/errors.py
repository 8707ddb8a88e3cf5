"""Errors raised by the per-instance store.

Every error the replication core has to react to has its own class so that it can be
mapped to a protocol answer without parsing messages.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error raised by `euca_runtime.store`."""


class StaleEpoch(StoreError):
    """A record (or snapshot) carries an epoch lower than the fence: a deposed writer."""

    def __init__(self, epoch: int, fence: int) -> None:
        super().__init__(f"epoch {epoch} is below the fence {fence}")
        self.epoch = epoch
        self.fence = fence


class GapError(StoreError):
    """A record arrived out of order: `seq` is beyond the next expected one."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"expected seq {expected}, got {got}")
        self.expected = expected
        self.got = got


class Divergence(StoreError):
    """The local log holds a different record at `seq` (another epoch wrote it).

    The local suffix from `seq` on is divergent: find the common prefix with
    `common_prefix()` and discard the rest with `Store.truncate_after()` first.
    """

    def __init__(self, seq: int, local_epoch: int | None, epoch: int) -> None:
        super().__init__(f"seq {seq}: local record has epoch {local_epoch}, incoming has epoch {epoch}")
        self.seq = seq
        self.local_epoch = local_epoch
        self.epoch = epoch


class LogTruncated(StoreError):
    """The records needed are no longer in the change log: a snapshot transfer is needed."""

    def __init__(self, wanted: int, first_available: int) -> None:
        super().__init__(f"seq {wanted} is no longer in the change log (first available: {first_available})")
        self.wanted = wanted
        self.first_available = first_available


class UnknownOp(StoreError):
    """No applier is registered for an op's (table, op) pair in this component."""


class SnapshotError(StoreError):
    """A snapshot stream is malformed, incomplete, corrupted or of another schema."""


class WrongGroup(StoreError):
    """The database belongs to another service group than the one it was opened for."""
