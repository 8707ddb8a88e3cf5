"""The replicated state of the SC: the ``sc`` store component (Alembic branch ``sc``) and its files.

Tables:

- ``sc_volume`` (volume_id, size_gib, snapshot_id, create_time, and the attachment:
  attach_instance, attach_device, attach_status, attach_time; all four NULL when detached);
- ``sc_snapshot`` (snapshot_id, volume_id, size_gib, start_time).

The bytes are sparse files under the instance's data dir (`VolumeFiles`):
``<data_dir>/sc/<instance>/volumes/<volume_id>`` and ``.../snapshots/<snapshot_id>``. Every replica
makes and removes its own files **when it applies the op** (the same op on every replica gives
the same files), so nothing but metadata travels on the replication stream:

- ``sc_volume create`` {volume_id, size_gib, snapshot_id, create_time}: a new row and a new file,
  sparse of ``size_gib`` GiB, or a (sparse) copy of the snapshot's file grown to ``size_gib``;
  refused (``InvalidVolume.Duplicate``) when the id exists, (``InvalidSnapshot.NotFound``) when the
  source snapshot does not;
- ``sc_volume attach`` {volume_id, instance_id, device, status, attach_time}: sets the attachment
  (``status`` ``attaching``/``attached``/``detaching``), ``detach`` {volume_id}: clears it;
- ``sc_volume delete`` {volume_id}: refused (``VolumeInUse``) while attached; the file is unlinked
  after the record commits;
- ``sc_snapshot create`` {snapshot_id, volume_id, size_gib, start_time}: a new row and a copy of
  the volume's file (reflink when the file system can, else a sparse copy: holes stay holes);
  ``delete`` {snapshot_id}.

Undo ops (to discard a divergent suffix) are ordinary ops: ``drop`` removes a row and its file
without checks. A file made inside a transaction that then rolls back is an orphan that
`VolumeFiles.reconcile` removes (at start-up and after a snapshot install); a file a row refers
to but the disk lacks (a state transfer brought the row) is re-made by the same reconcile.

Limitation (documented in docs/sc.md): the volume bytes are not replicated. The ``process``
hypervisor driver never writes into volumes, so every replica's files are equal (all holes);
a real block-device path would need block replication (DRBD-like), which is outside this subset.

Appliers refuse with `StoreError("<EC2 code>: message")`; the primary's write then fails with
a `RequestError` whose message carries it (`refusal`). The appliers find the instance's
`VolumeFiles` through `register_files` (keyed by the store's database URL, as walrus does).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Float, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from euca_runtime.component import RequestError
from euca_runtime.log import get_logger
from euca_runtime.store import ApplyContext, ComponentSpec, StoreError, register_component

log = get_logger("sc")

GIB = 1 << 30
MAX_SIZE_GIB = 1024
VOLUME_ID_RE = re.compile(r"vol-[0-9a-f]{8,17}")
SNAPSHOT_ID_RE = re.compile(r"snap-[0-9a-f]{8,17}")
ATTACH_STATES = ("attaching", "attached", "detaching")
_FICLONE = 0x40049409  # ioctl: share the source's extents (btrfs, xfs with reflink)


class ScBase(DeclarativeBase):
    """Declarative base of the sc component (Alembic branch `sc`)."""


class Volume(ScBase):
    __tablename__ = "sc_volume"

    volume_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    size_gib: Mapped[int] = mapped_column(Integer, nullable=False)
    snapshot_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    create_time: Mapped[float] = mapped_column(Float, nullable=False)
    attach_instance: Mapped[str | None] = mapped_column(String(32), nullable=True)
    attach_device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attach_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    attach_time: Mapped[float | None] = mapped_column(Float, nullable=True)


class Snapshot(ScBase):
    __tablename__ = "sc_snapshot"

    snapshot_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    volume_id: Mapped[str] = mapped_column(String(32), nullable=False)
    size_gib: Mapped[int] = mapped_column(Integer, nullable=False)
    start_time: Mapped[float] = mapped_column(Float, nullable=False)


SC = register_component(ComponentSpec("sc", ScBase.metadata))

_VOLUME_COLS = (
    "volume_id",
    "size_gib",
    "snapshot_id",
    "create_time",
    "attach_instance",
    "attach_device",
    "attach_status",
    "attach_time",
)
_SNAPSHOT_COLS = ("snapshot_id", "volume_id", "size_gib", "start_time")


def refused(code: str, message: str) -> StoreError:
    """An applier's refusal carrying an EC2 error code."""
    return StoreError(f"{code}: {message}")


_CODE_RE = re.compile(r"([A-Za-z]+(?:\.[A-Za-z]+)?): (.*)", re.S)


def refusal(exc: RequestError) -> RequestError:
    """A write refused by an applier ("write refused: VolumeInUse: ...") as its EC2 error."""
    text = exc.message
    if text.startswith("write refused: "):
        text = text[len("write refused: ") :]
    m = _CODE_RE.fullmatch(text)
    if m is None:
        return exc
    return RequestError(m.group(1), m.group(2))


# --------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sparse_copy(src: Path, dst: Path, size: int) -> None:
    """Copy `src` to `dst` (then set its length to `size`), keeping holes: a reflink where the
    file system can, else only the data extents (SEEK_DATA/SEEK_HOLE) are copied. Blocking."""
    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        cloned = False
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            cloned = True
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
                raise
        if not cloned:
            end = os.fstat(fin.fileno()).st_size
            pos = 0
            while pos < end:
                try:
                    data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole is left
                        break
                    raise
                hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
                off = data
                while off < hole:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), min(hole - off, 1 << 26), off, off)
                    if n <= 0:
                        break
                    off += n
                pos = hole
        os.ftruncate(fout.fileno(), size)
        os.fsync(fout.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


class VolumeFiles:
    """The volume and snapshot files of one SC instance (thread-safe)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.volumes = self.root / "volumes"
        self.snapshots = self.root / "snapshots"
        self.volumes.mkdir(parents=True, exist_ok=True)
        self.snapshots.mkdir(parents=True, exist_ok=True)
        self._mu = threading.Lock()
        self._removals: dict[int, list[Path]] = {}

    def volume_path(self, volume_id: str) -> Path:
        if not VOLUME_ID_RE.fullmatch(volume_id):
            raise StoreError(f"bad volume id {volume_id!r}")
        return self.volumes / volume_id

    def snapshot_path(self, snapshot_id: str) -> Path:
        if not SNAPSHOT_ID_RE.fullmatch(snapshot_id):
            raise StoreError(f"bad snapshot id {snapshot_id!r}")
        return self.snapshots / snapshot_id

    def make_volume(self, volume_id: str, size_gib: int, snapshot_id: str | None = None) -> Path:
        """The volume's file: sparse, or a copy of the snapshot's (idempotent). Blocking."""
        path = self.volume_path(volume_id)
        if path.exists():
            return path
        src = self.snapshot_path(snapshot_id) if snapshot_id else None
        if src is not None and src.exists():
            sparse_copy(src, path, size_gib * GIB)
        else:
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as fh:
                os.ftruncate(fh.fileno(), size_gib * GIB)
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        return path

    def make_snapshot(self, snapshot_id: str, volume_id: str, size_gib: int) -> Path:
        """The snapshot's file: a copy of the volume's (sparse if the volume is gone). Blocking."""
        path = self.snapshot_path(snapshot_id)
        if path.exists():
            return path
        src = self.volume_path(volume_id)
        if src.exists():
            sparse_copy(src, path, size_gib * GIB)
        else:
            with open(path, "wb") as fh:
                os.ftruncate(fh.fileno(), size_gib * GIB)
                os.fsync(fh.fileno())
        return path

    def schedule_removal(self, seq: int, path: Path) -> None:
        """Unlink `path` once the record `seq` that deleted its row commits."""
        with self._mu:
            self._removals.setdefault(seq, []).append(path)

    def committed(self, seq: int) -> None:
        with self._mu:
            due = [s for s in self._removals if s <= seq]
            paths = [p for s in due for p in self._removals.pop(s)]
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def forget_removals(self) -> None:
        with self._mu:
            self._removals.clear()

    def reconcile(
        self, volumes: Iterable[Mapping[str, Any]], snapshots: Iterable[Mapping[str, Any]]
    ) -> tuple[int, int]:
        """Align the disk with the rows: remove files no row names (and temporaries), make the
        files rows name but the disk lacks. Returns (removed, made). Blocking."""
        vols = {str(v["volume_id"]): v for v in volumes}
        snaps = {str(s["snapshot_id"]): s for s in snapshots}
        removed = made = 0
        for d, wanted in ((self.volumes, vols), (self.snapshots, snaps)):
            for p in d.iterdir():
                if p.name not in wanted:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                    removed += 1
        for sid, s in snaps.items():
            if not self.snapshot_path(sid).exists():
                self.make_snapshot(sid, str(s["volume_id"]), int(s["size_gib"]))
                made += 1
        for vid, v in vols.items():
            if not self.volume_path(vid).exists():
                self.make_volume(vid, int(v["size_gib"]), v.get("snapshot_id"))
                made += 1
        return removed, made


_FILES: dict[str, VolumeFiles] = {}
_FILES_LOCK = threading.Lock()


def _url_key(url: Any) -> str:
    return url.render_as_string(hide_password=True) if hasattr(url, "render_as_string") else str(url)


def register_files(url: Any, files: VolumeFiles) -> None:
    """Let the appliers of the store at `url` (its engine URL) make and remove files in `files`."""
    with _FILES_LOCK:
        _FILES[_url_key(url)] = files


def unregister_files(url: Any) -> None:
    with _FILES_LOCK:
        _FILES.pop(_url_key(url), None)


def _files(ctx: ApplyContext) -> VolumeFiles | None:
    bind = ctx.session.get_bind()
    with _FILES_LOCK:
        return _FILES.get(_url_key(bind.url))  # type: ignore[union-attr]


# --------------------------------------------------------------------------- ops


def _str(op: Mapping[str, Any], name: str) -> str:
    v = op.get(name)
    if not isinstance(v, str) or not v:
        raise StoreError(f"sc op {op.get('table')}.{op.get('op')} needs a string {name}, got {v!r}")
    return v


def volume_row(v: Volume) -> dict[str, Any]:
    return {c: getattr(v, c) for c in _VOLUME_COLS}


def snapshot_row(s: Snapshot) -> dict[str, Any]:
    return {c: getattr(s, c) for c in _SNAPSHOT_COLS}


def volume_create_op(
    volume_id: str, size_gib: int, snapshot_id: str | None, create_time: float
) -> dict[str, Any]:
    return {
        "op": "create",
        "table": "sc_volume",
        "volume_id": volume_id,
        "size_gib": int(size_gib),
        "snapshot_id": snapshot_id,
        "create_time": float(create_time),
    }


def volume_attach_op(
    volume_id: str, instance_id: str, device: str, status: str, attach_time: float
) -> dict[str, Any]:
    return {
        "op": "attach",
        "table": "sc_volume",
        "volume_id": volume_id,
        "instance_id": instance_id,
        "device": device,
        "status": status,
        "attach_time": float(attach_time),
    }


def volume_detach_op(volume_id: str) -> dict[str, Any]:
    return {"op": "detach", "table": "sc_volume", "volume_id": volume_id}


def volume_delete_op(volume_id: str) -> dict[str, Any]:
    return {"op": "delete", "table": "sc_volume", "volume_id": volume_id}


def snapshot_create_op(snapshot_id: str, volume_id: str, size_gib: int, start_time: float) -> dict[str, Any]:
    return {
        "op": "create",
        "table": "sc_snapshot",
        "snapshot_id": snapshot_id,
        "volume_id": volume_id,
        "size_gib": int(size_gib),
        "start_time": float(start_time),
    }


def snapshot_delete_op(snapshot_id: str) -> dict[str, Any]:
    return {"op": "delete", "table": "sc_snapshot", "snapshot_id": snapshot_id}


def _restore_volume_ops(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Ops that re-create a deleted volume row exactly (file re-made sparse)."""
    ops = [volume_create_op(row["volume_id"], row["size_gib"], row["snapshot_id"], row["create_time"])]
    ops[0]["force"] = True
    if row.get("attach_instance"):
        ops.append(
            volume_attach_op(
                row["volume_id"],
                row["attach_instance"],
                row["attach_device"] or "",
                row["attach_status"] or "attached",
                row["attach_time"] or 0.0,
            )
        )
    return ops


@SC.applier("sc_volume", "create")
def _volume_create(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    vid = _str(op, "volume_id")
    if not VOLUME_ID_RE.fullmatch(vid):
        raise refused("InvalidParameterValue", f"bad volume id {vid!r}")
    size = int(op.get("size_gib") or 0)
    if not 1 <= size <= MAX_SIZE_GIB:
        raise refused("InvalidParameterValue", f"volume size must be 1..{MAX_SIZE_GIB} GiB, got {size}")
    snap = op.get("snapshot_id") or None
    if ctx.session.get(Volume, vid) is not None:
        raise refused("InvalidVolume.Duplicate", f"The volume '{vid}' already exists.")
    if snap is not None and not op.get("force") and ctx.session.get(Snapshot, snap) is None:
        raise refused("InvalidSnapshot.NotFound", f"The snapshot '{snap}' does not exist.")
    ctx.session.add(
        Volume(
            volume_id=vid, size_gib=size, snapshot_id=snap, create_time=float(op.get("create_time") or 0.0)
        )
    )
    files = _files(ctx)
    if files is not None:
        files.make_volume(vid, size, snap)
    return [{"op": "drop", "table": "sc_volume", "volume_id": vid}]


@SC.applier("sc_volume", "attach")
def _volume_attach(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    vid = _str(op, "volume_id")
    row = ctx.session.get(Volume, vid)
    if row is None:
        raise refused("InvalidVolume.NotFound", f"The volume '{vid}' does not exist.")
    status = _str(op, "status")
    if status not in ATTACH_STATES:
        raise StoreError(f"attach status must be one of {ATTACH_STATES}, got {status!r}")
    instance = _str(op, "instance_id")
    if row.attach_instance is not None and row.attach_instance != instance:
        raise refused("VolumeInUse", f"vol {vid} is already attached to an instance ({row.attach_instance})")
    old = volume_row(row)
    row.attach_instance = instance
    row.attach_device = str(op.get("device") or "")
    row.attach_status = status
    row.attach_time = float(op.get("attach_time") or 0.0)
    if old["attach_instance"] is None:
        return [volume_detach_op(vid)]
    return [
        volume_attach_op(
            vid, old["attach_instance"], old["attach_device"], old["attach_status"], old["attach_time"]
        )
    ]


@SC.applier("sc_volume", "detach")
def _volume_detach(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    vid = _str(op, "volume_id")
    row = ctx.session.get(Volume, vid)
    if row is None or row.attach_instance is None:
        return []
    undo = volume_attach_op(
        vid,
        row.attach_instance,
        row.attach_device or "",
        row.attach_status or "attached",
        row.attach_time or 0.0,
    )
    row.attach_instance = row.attach_device = row.attach_status = None
    row.attach_time = None
    return [undo]


def _drop_volume(ctx: ApplyContext, row: Volume) -> list[dict[str, Any]]:
    undo = _restore_volume_ops(volume_row(row))
    ctx.session.delete(row)
    files = _files(ctx)
    if files is not None:
        files.schedule_removal(ctx.seq, files.volume_path(row.volume_id))
    return undo


@SC.applier("sc_volume", "delete")
def _volume_delete(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    vid = _str(op, "volume_id")
    row = ctx.session.get(Volume, vid)
    if row is None:
        raise refused("InvalidVolume.NotFound", f"The volume '{vid}' does not exist.")
    if row.attach_instance is not None:
        raise refused("VolumeInUse", f"Volume {vid} is currently attached to {row.attach_instance}")
    return _drop_volume(ctx, row)


@SC.applier("sc_volume", "drop")
def _volume_drop(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    row = ctx.session.get(Volume, _str(op, "volume_id"))
    return [] if row is None else _drop_volume(ctx, row)


@SC.applier("sc_snapshot", "create")
def _snapshot_create(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    sid = _str(op, "snapshot_id")
    if not SNAPSHOT_ID_RE.fullmatch(sid):
        raise refused("InvalidParameterValue", f"bad snapshot id {sid!r}")
    vid = _str(op, "volume_id")
    if ctx.session.get(Snapshot, sid) is not None:
        raise refused("InvalidSnapshot.Duplicate", f"The snapshot '{sid}' already exists.")
    vol = ctx.session.get(Volume, vid)
    if vol is None and not op.get("force"):
        raise refused("InvalidVolume.NotFound", f"The volume '{vid}' does not exist.")
    size = vol.size_gib if vol is not None else int(op.get("size_gib") or 1)
    ctx.session.add(
        Snapshot(snapshot_id=sid, volume_id=vid, size_gib=size, start_time=float(op["start_time"]))
    )
    files = _files(ctx)
    if files is not None:
        files.make_snapshot(sid, vid, size)
    return [{"op": "drop", "table": "sc_snapshot", "snapshot_id": sid}]


def _drop_snapshot(ctx: ApplyContext, row: Snapshot) -> list[dict[str, Any]]:
    undo = snapshot_create_op(row.snapshot_id, row.volume_id, row.size_gib, row.start_time)
    undo["force"] = True
    ctx.session.delete(row)
    files = _files(ctx)
    if files is not None:
        files.schedule_removal(ctx.seq, files.snapshot_path(row.snapshot_id))
    return [undo]


@SC.applier("sc_snapshot", "delete")
def _snapshot_delete(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    sid = _str(op, "snapshot_id")
    row = ctx.session.get(Snapshot, sid)
    if row is None:
        raise refused("InvalidSnapshot.NotFound", f"The snapshot '{sid}' does not exist.")
    return _drop_snapshot(ctx, row)


@SC.applier("sc_snapshot", "drop")
def _snapshot_drop(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    row = ctx.session.get(Snapshot, _str(op, "snapshot_id"))
    return [] if row is None else _drop_snapshot(ctx, row)


__all__ = [
    "SC",
    "Snapshot",
    "Volume",
    "VolumeFiles",
    "refusal",
    "refused",
    "register_files",
    "snapshot_create_op",
    "snapshot_delete_op",
    "sparse_copy",
    "unregister_files",
    "volume_attach_op",
    "volume_create_op",
    "volume_delete_op",
    "volume_detach_op",
]
