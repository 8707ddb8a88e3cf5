"""Object bytes on local disk: one file per blob, written through a staging file.

Layout under the instance's blob root (``<data_dir>/walrus/<instance>``)::

    staging/<blob_id>      bytes being received (primary: from the client; backup: from the
                           primary), fsynced when complete
    blobs/<ab>/<blob_id>   installed blobs (``ab`` = the first two hex digits of the id)

A blob id is 32 lower-case hex digits, chosen by the primary. A blob is written once and
never changed; objects and multipart parts refer to blobs (the replicated ``blobs`` table
counts the references). The bytes travel before the metadata: the primary streams them to
its own staging file and to every backup's, both fsync them, and only then does it commit
the metadata op; applying that op (on every replica, in log order) verifies the staged
blob's size and SHA-256 and renames it into place (`install`). A replica that applies an
op whose blob it lacks records the blob as *missing*; it does not acknowledge replication
until it fetched the blob from the primary (see `euca_runtime.services.walrus`).

Deleted blobs are unlinked after the metadata commit. Reads keep a small cache of open
file descriptors, so a reader that started on a blob keeps reading it even if a newer write
replaced the object and unlinked the file (POSIX keeps an open file alive).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from euca_runtime.log import get_logger

log = get_logger("walrus")

BLOB_ID_RE = re.compile(r"[0-9a-f]{32}")
OPEN_FDS = 64
"""Open read descriptors kept per blob store."""
FD_IDLE = 60.0
"""Seconds an unused read descriptor stays open."""


class BlobError(Exception):
    """A blob operation that cannot be done (bad id, wrong offset, missing file)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def check_id(blob_id: Any) -> str:
    """`blob_id` if it is a well-formed blob id, else BlobError."""
    if not isinstance(blob_id, str) or not BLOB_ID_RE.fullmatch(blob_id):
        raise BlobError("InvalidBlobId", f"not a blob id: {blob_id!r}")
    return blob_id


@dataclass
class Digests:
    """What a finished writer measured."""

    size: int
    sha256: str
    md5: str | None = None
    crc32: int | None = None


@dataclass
class Writer:
    """One blob being received into its staging file (sequential writes only)."""

    blob_id: str
    path: Path
    md5: bool
    fh: Any
    size: int = 0
    _sha: Any = field(default_factory=hashlib.sha256)
    _md5: Any = None
    _crc: int = 0
    touched: float = field(default_factory=time.monotonic)
    done: Digests | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, offset: int, data: bytes) -> int:
        """Append `data`, which must start at `offset` (= bytes written so far). Blocking."""
        with self.lock:
            if self.done is not None or self.fh is None:
                raise BlobError("BlobClosed", f"blob {self.blob_id} is no longer being written")
            if offset != self.size:
                raise BlobError("BadOffset", f"blob {self.blob_id}: offset {offset}, expected {self.size}")
            self.fh.write(data)
            self._sha.update(data)
            if self._md5 is not None:
                self._md5.update(data)
            self._crc = zlib.crc32(data, self._crc)
            self.size += len(data)
            self.touched = time.monotonic()
            return self.size

    def finish(self) -> Digests:
        """Flush and fsync the staging file; returns the digests (idempotent). Blocking."""
        with self.lock:
            if self.done is not None:
                return self.done
            if self.fh is None:
                raise BlobError("BlobClosed", f"blob {self.blob_id} was aborted")
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self.fh = None
            self.done = Digests(
                self.size,
                self._sha.hexdigest(),
                self._md5.hexdigest() if self._md5 is not None else None,
                self._crc & 0xFFFFFFFF,
            )
            return self.done

    def close(self) -> None:
        with self.lock:
            if self.fh is not None:
                with contextlib.suppress(OSError):
                    self.fh.close()
                self.fh = None


class BlobStore:
    """The blobs of one walrus instance (thread-safe)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging = self.root / "staging"
        self.blobs = self.root / "blobs"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._mu = threading.Lock()
        self._writers: dict[str, Writer] = {}
        self._finished: dict[str, Digests] = {}
        self._fds: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()
        self.missing: set[str] = set()
        """Blobs the metadata refers to but this replica does not hold (to fetch)."""
        self._removals: dict[int, list[str]] = {}

    # ------------------------------------------------------------------ paths

    def staging_path(self, blob_id: str) -> Path:
        return self.staging / check_id(blob_id)

    def final_path(self, blob_id: str) -> Path:
        check_id(blob_id)
        return self.blobs / blob_id[:2] / blob_id

    def has(self, blob_id: str) -> bool:
        return self.final_path(blob_id).exists()

    # ------------------------------------------------------------------ writing

    def begin(self, blob_id: str, *, md5: bool = False) -> Writer:
        """Start receiving `blob_id` (a new staging file; replaces an unfinished one)."""
        path = self.staging_path(blob_id)
        with self._mu:
            old = self._writers.pop(blob_id, None)
            self._finished.pop(blob_id, None)
        if old is not None:
            old.close()
        fh = open(path, "wb")
        w = Writer(blob_id, path, md5, fh, _md5=hashlib.md5() if md5 else None)
        with self._mu:
            self._writers[blob_id] = w
        return w

    def writer(self, blob_id: str) -> Writer:
        with self._mu:
            w = self._writers.get(blob_id)
        if w is None:
            raise BlobError("NoSuchBlobWriter", f"blob {blob_id} is not being received here")
        return w

    def finish(self, blob_id: str) -> Digests:
        """Fsync a writer's staging file and remember its digests for `install`. Blocking."""
        w = self.writer(blob_id)
        d = w.finish()
        with self._mu:
            self._writers.pop(blob_id, None)
            self._finished[blob_id] = d
        return d

    def write_whole(self, blob_id: str, data: bytes, *, md5: bool = False) -> Digests:
        """`begin`, one write and `finish` in one blocking call (a small blob: one thread hop)."""
        w = self.begin(blob_id, md5=md5)
        w.write(0, data)
        return self.finish(blob_id)

    def abort(self, blob_id: str) -> None:
        """Forget a blob being received and remove its staging file."""
        with self._mu:
            w = self._writers.pop(blob_id, None)
            self._finished.pop(blob_id, None)
        if w is not None:
            w.close()
        with contextlib.suppress(FileNotFoundError):
            self.staging_path(blob_id).unlink()

    def expire_writers(self, idle: float) -> list[str]:
        """Abort writers untouched for `idle` seconds (a sender that went away)."""
        now = time.monotonic()
        with self._mu:
            stale = [b for b, w in self._writers.items() if now - w.touched > idle]
        for b in stale:
            self.abort(b)
        return stale

    def install(self, blob_id: str, size: int, sha256: str) -> bool:
        """Make `blob_id` a durable blob: True if it is (now) in place, False if missing.

        Called while applying the metadata op. A staged blob is moved into place only if
        the writer finished with exactly this size and SHA-256; an already installed blob
        is accepted when its size matches (a re-applied op).
        """
        final = self.final_path(blob_id)
        with contextlib.suppress(FileNotFoundError):
            if final.stat().st_size == size:
                self._found(blob_id)
                return True
        with self._mu:
            d = self._finished.pop(blob_id, None)
        staged = self.staging_path(blob_id)
        if d is None or d.size != size or d.sha256 != sha256 or not staged.exists():
            if d is not None:
                log.warning(
                    "staged blob does not match its metadata",
                    extra={"blob": blob_id, "size": d.size, "want_size": size},
                )
            with self._mu:
                self.missing.add(blob_id)
            return False
        final.parent.mkdir(exist_ok=True)
        os.replace(staged, final)
        _fsync_dir(final.parent)
        self._found(blob_id)
        return True

    def install_file(self, blob_id: str, path: Path) -> None:
        """Move a verified file (a fetched blob) into place."""
        final = self.final_path(blob_id)
        final.parent.mkdir(exist_ok=True)
        os.replace(path, final)
        _fsync_dir(final.parent)
        self._found(blob_id)

    def _found(self, blob_id: str) -> None:
        with self._mu:
            self.missing.discard(blob_id)

    # ------------------------------------------------------------------ removal

    def schedule_removal(self, seq: int, blob_id: str) -> None:
        """Unlink `blob_id` once the record `seq` that dropped its last reference commits."""
        with self._mu:
            self._removals.setdefault(seq, []).append(blob_id)
            self.missing.discard(blob_id)

    def committed(self, seq: int) -> None:
        """The store committed up to `seq`: do the removals scheduled by those records."""
        with self._mu:
            due = [s for s in self._removals if s <= seq]
            blobs = [b for s in due for b in self._removals.pop(s)]
        for b in blobs:
            self.remove(b)

    def forget_removals(self) -> None:
        """Drop scheduled removals (the state was replaced; `sweep` decides instead)."""
        with self._mu:
            self._removals.clear()

    def remove(self, blob_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.final_path(blob_id).unlink()
        with contextlib.suppress(FileNotFoundError):
            self.staging_path(blob_id).unlink()

    # ------------------------------------------------------------------ reconciliation

    def installed(self) -> set[str]:
        """Every installed blob id (a directory scan)."""
        out: set[str] = set()
        for sub in self.blobs.iterdir():
            if sub.is_dir():
                out.update(p.name for p in sub.iterdir() if BLOB_ID_RE.fullmatch(p.name))
        return out

    def reconcile(self, referenced: Iterable[str], *, clear_staging: bool) -> tuple[int, int]:
        """Align the disk with the metadata: unlink unreferenced blobs, note missing ones.

        With `clear_staging` (at startup, when nothing is being received) every staging file
        goes too. Returns (removed, missing).
        """
        wanted = set(referenced)
        present = self.installed()
        removed = 0
        for b in present - wanted:
            self.remove(b)
            removed += 1
        if clear_staging:
            with self._mu:
                self._writers.clear()
                self._finished.clear()
            for p in self.staging.iterdir():
                with contextlib.suppress(OSError):
                    p.unlink()
        with self._mu:
            self.missing = wanted - present
            n_missing = len(self.missing)
        return removed, n_missing

    def missing_now(self) -> list[str]:
        with self._mu:
            return sorted(self.missing)

    # ------------------------------------------------------------------ reading

    def read(self, blob_id: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer at the end of the blob). Blocking."""
        if offset < 0 or length < 0:
            raise BlobError("InvalidRange", "offset and length must be >= 0")
        fd = self._fd(blob_id)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def _fd(self, blob_id: str) -> int:
        """A private duplicate of the cached descriptor of `blob_id` (the caller closes it)."""
        now = time.monotonic()
        with self._mu:
            entry = self._fds.pop(blob_id, None)
            if entry is not None:
                self._fds[blob_id] = (entry[0], now)
                return os.dup(entry[0])
        try:
            fd = os.open(self.final_path(blob_id), os.O_RDONLY)
        except FileNotFoundError:
            raise BlobError("NoSuchBlob", f"blob {blob_id} is not here") from None
        close: list[int] = []
        with self._mu:
            other = self._fds.pop(blob_id, None)
            if other is not None:
                close.append(other[0])
            self._fds[blob_id] = (fd, now)
            while len(self._fds) > OPEN_FDS:
                close.append(self._fds.popitem(last=False)[1][0])
            for b, (f, t) in list(self._fds.items()):
                if now - t > FD_IDLE and b != blob_id:
                    close.append(f)
                    del self._fds[b]
            mine = os.dup(fd)
        for f in close:
            with contextlib.suppress(OSError):
                os.close(f)
        return mine

    def close(self) -> None:
        with self._mu:
            fds = [f for f, _ in self._fds.values()]
            self._fds.clear()
            writers = list(self._writers.values())
            self._writers.clear()
        for f in fds:
            with contextlib.suppress(OSError):
                os.close(f)
        for w in writers:
            w.close()

    def file_digest(self, path: Path) -> tuple[int, str]:
        """(size, sha256) of a file, read in 1 MiB blocks. Blocking."""
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
                size += len(block)
        return size, h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
