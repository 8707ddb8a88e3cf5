"""The walrus store component with its blob store: appliers, reference counts, installs,
missing bytes, removals after commit, refusals with S3 codes, snapshots."""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from euca_runtime.store import Store, StoreError, sqlite_url
from euca_runtime.walrus.blobs import BlobError, BlobStore
from euca_runtime.walrus.model import (
    blob_put_op,
    object_put_op,
    register_blobstore,
    unregister_blobstore,
)


class Replica:
    """One walrus replica: its store and blob store, applying records like the node does."""

    def __init__(self, root: Path, name: str) -> None:
        self.store = Store.open(sqlite_url(root / f"{name}.db"), component="walrus", group="walrus")
        self.blobs = BlobStore(root / name)
        register_blobstore(self.store.engine.url, self.blobs)
        self.store.add_listener(lambda ch: self.blobs.committed(ch.position.seq))
        self.seq = 0

    def apply(self, *ops: dict) -> None:
        self.seq += 1
        self.store.apply(1, self.seq, list(ops))

    def stage(self, blob_id: str, data: bytes) -> None:
        w = self.blobs.begin(blob_id, md5=True)
        w.write(0, data)
        self.blobs.finish(blob_id)

    def close(self) -> None:
        unregister_blobstore(self.store.engine.url)
        self.blobs.close()
        self.store.close()


@pytest.fixture
def rep(tmp_path: Path) -> Iterator[Replica]:
    r = Replica(tmp_path, "a")
    try:
        yield r
    finally:
        r.close()


def _bid(n: int) -> str:
    return f"{n:032x}"


def _obj(bucket: str, key: str, blobs: list[tuple[str, int]], etag: str = "e") -> dict:
    return object_put_op(
        bucket,
        key,
        size=sum(n for _, n in blobs),
        etag=etag,
        last_modified=1.0,
        content_type=None,
        meta="{}",
        headers="{}",
        segments=json.dumps([[b, n] for b, n in blobs]),
    )


def _blob(data: bytes, n: int) -> dict:
    return blob_put_op(_bid(n), len(data), hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())


def test_put_installs_the_staged_blob_and_overwrite_removes_the_old_one(rep: Replica) -> None:
    rep.apply({"op": "put", "table": "buckets", "name": "bkt", "owner": "acct", "created": 1.0})
    rep.stage(_bid(1), b"first")
    rep.apply(_blob(b"first", 1), _obj("bkt", "k", [(_bid(1), 5)]))
    assert rep.blobs.read(_bid(1), 0, 100) == b"first"
    assert not list(rep.blobs.staging.iterdir())
    rep.stage(_bid(2), b"second!")
    rep.apply(_blob(b"second!", 2), _obj("bkt", "k", [(_bid(2), 7)]))
    assert not rep.blobs.final_path(_bid(1)).exists()  # unlinked after the commit
    assert rep.store.get_row("blobs", _bid(1)) is None
    assert rep.store.get_row("blobs", _bid(2))["refs"] == 1


def test_shared_blobs_live_until_the_last_reference_goes(rep: Replica) -> None:
    rep.apply({"op": "put", "table": "buckets", "name": "bkt", "owner": "acct", "created": 1.0})
    rep.stage(_bid(1), b"data")
    rep.apply(_blob(b"data", 1), _obj("bkt", "src", [(_bid(1), 4)]))
    rep.apply(_obj("bkt", "copy", [(_bid(1), 4)]))  # CopyObject shares the blob
    assert rep.store.get_row("blobs", _bid(1))["refs"] == 2
    rep.apply({"op": "delete", "table": "objects", "bucket": "bkt", "key": "src"})
    assert rep.blobs.read(_bid(1), 0, 10) == b"data"
    rep.apply({"op": "delete", "table": "objects", "bucket": "bkt", "key": "copy"})
    assert not rep.blobs.final_path(_bid(1)).exists()


def test_refusals_carry_s3_codes_and_change_nothing(rep: Replica) -> None:
    with pytest.raises(StoreError, match="NoSuchBucket"):
        rep.apply(_obj("nope", "k", []))
    rep.seq -= 1
    rep.apply({"op": "put", "table": "buckets", "name": "bkt", "owner": "acct", "created": 1.0})
    with pytest.raises(StoreError, match="BucketAlreadyOwnedByYou"):
        rep.apply({"op": "put", "table": "buckets", "name": "bkt", "owner": "acct", "created": 2.0})
    rep.seq -= 1
    with pytest.raises(StoreError, match="BucketAlreadyExists"):
        rep.apply({"op": "put", "table": "buckets", "name": "bkt", "owner": "other", "created": 2.0})
    rep.seq -= 1
    rep.stage(_bid(3), b"x")
    rep.apply(_blob(b"x", 3), _obj("bkt", "k", [(_bid(3), 1)]))
    with pytest.raises(StoreError, match="BucketNotEmpty"):
        rep.apply({"op": "delete", "table": "buckets", "name": "bkt"})
    rep.seq -= 1
    with pytest.raises(StoreError, match="NoSuchUpload"):
        rep.apply(
            {
                "op": "put",
                "table": "parts",
                "upload_id": "u",
                "part_number": 1,
                "blob_id": _bid(3),
                "size": 1,
                "etag": "e",
                "last_modified": 1.0,
            }
        )
    rep.seq -= 1
    assert rep.store.position().seq == rep.seq


def test_multipart_parts_become_the_object(rep: Replica) -> None:
    rep.apply({"op": "put", "table": "buckets", "name": "bkt", "owner": "acct", "created": 1.0})
    rep.apply(
        {
            "op": "put",
            "table": "uploads",
            "upload_id": "u1",
            "bucket": "bkt",
            "key": "k",
            "initiated": 1.0,
            "owner": "acct",
            "content_type": None,
            "meta": "{}",
            "headers": "{}",
        }
    )
    for n, data in ((1, b"part-one"), (2, b"two")):
        rep.stage(_bid(10 + n), data)
        rep.apply(
            _blob(data, 10 + n),
            {
                "op": "put",
                "table": "parts",
                "upload_id": "u1",
                "part_number": n,
                "blob_id": _bid(10 + n),
                "size": len(data),
                "etag": "e",
                "last_modified": 1.0,
            },
        )
    rep.apply(
        _obj("bkt", "k", [(_bid(11), 8), (_bid(12), 3)]),
        {"op": "delete", "table": "uploads", "upload_id": "u1"},
    )
    assert rep.store.scan("parts") == [] and rep.store.scan("uploads") == []
    assert [r["refs"] for r in rep.store.scan("blobs")] == [1, 1]
    # An aborted upload's parts go with it.
    rep.apply(
        {
            "op": "put",
            "table": "uploads",
            "upload_id": "u2",
            "bucket": "bkt",
            "key": "k2",
            "initiated": 1.0,
            "owner": "acct",
            "content_type": None,
            "meta": "{}",
            "headers": "{}",
        }
    )
    rep.stage(_bid(20), b"z")
    rep.apply(
        _blob(b"z", 20),
        {
            "op": "put",
            "table": "parts",
            "upload_id": "u2",
            "part_number": 1,
            "blob_id": _bid(20),
            "size": 1,
            "etag": "e",
            "last_modified": 1.0,
        },
    )
    rep.apply({"op": "delete", "table": "uploads", "upload_id": "u2"})
    assert not rep.blobs.final_path(_bid(20)).exists()


def test_a_replica_without_the_bytes_records_them_missing(tmp_path: Path) -> None:
    primary, backup = Replica(tmp_path, "p"), Replica(tmp_path, "b")
    try:
        for r in (primary, backup):
            r.apply({"op": "put", "table": "buckets", "name": "bkt", "owner": "acct", "created": 1.0})
        primary.stage(_bid(5), b"bytes")
        backup.stage(_bid(6), b"other")  # staged something else: wrong digest for blob 6
        ops = (_blob(b"bytes", 5), _obj("bkt", "k", [(_bid(5), 5)]))
        primary.apply(*ops)
        backup.apply(*ops)
        assert primary.blobs.missing_now() == []
        assert backup.blobs.missing_now() == [_bid(5)]
        # A fetched copy is verified by the caller and installed; then nothing is missing.
        tmp = backup.blobs.staging / "fetch"
        tmp.write_bytes(primary.blobs.read(_bid(5), 0, 100))
        backup.blobs.install_file(_bid(5), tmp)
        assert backup.blobs.missing_now() == []
        # Removing the object forgets a missing blob too.
        backup.blobs.missing.add(_bid(5))
        backup.apply({"op": "delete", "table": "objects", "bucket": "bkt", "key": "k"})
        assert backup.blobs.missing_now() == []
    finally:
        primary.close()
        backup.close()


def test_damaged_staging_is_not_installed(rep: Replica) -> None:
    rep.apply({"op": "put", "table": "buckets", "name": "bkt", "owner": "acct", "created": 1.0})
    rep.stage(_bid(7), b"corrupted")
    good = blob_put_op(_bid(7), 9, hashlib.sha256(b"different").hexdigest(), "m")
    rep.apply(good, _obj("bkt", "k", [(_bid(7), 9)]))
    assert rep.blobs.missing_now() == [_bid(7)]
    assert not rep.blobs.final_path(_bid(7)).exists()


def test_reconcile_removes_orphans_and_finds_missing(rep: Replica) -> None:
    rep.apply({"op": "put", "table": "buckets", "name": "bkt", "owner": "acct", "created": 1.0})
    rep.stage(_bid(1), b"kept")
    rep.apply(_blob(b"kept", 1), _obj("bkt", "k", [(_bid(1), 4)]))
    orphan = rep.blobs.final_path(_bid(99))
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"left by a crash between install and commit")
    (rep.blobs.staging / _bid(50)).write_bytes(b"half received")
    removed, missing = rep.blobs.reconcile([_bid(1), _bid(2)], clear_staging=True)
    assert (removed, missing) == (1, 1) and rep.blobs.missing_now() == [_bid(2)]
    assert not orphan.exists() and not list(rep.blobs.staging.iterdir())


def test_writer_refuses_out_of_order_chunks(tmp_path: Path) -> None:
    bs = BlobStore(tmp_path)
    w = bs.begin(_bid(1))
    w.write(0, b"abc")
    with pytest.raises(BlobError) as e:
        w.write(10, b"x")
    assert e.value.kind == "BadOffset"
    d = bs.finish(_bid(1))
    assert d.size == 3 and d.sha256 == hashlib.sha256(b"abc").hexdigest()
    with pytest.raises(BlobError):
        bs.begin("../../etc/passwd")
    with pytest.raises(BlobError) as e:
        bs.read(_bid(2), 0, 1)
    assert e.value.kind == "NoSuchBlob"


def test_a_reader_keeps_reading_a_blob_removed_meanwhile(rep: Replica) -> None:
    rep.apply({"op": "put", "table": "buckets", "name": "bkt", "owner": "acct", "created": 1.0})
    rep.stage(_bid(1), b"0123456789")
    rep.apply(_blob(b"0123456789", 1), _obj("bkt", "k", [(_bid(1), 10)]))
    assert rep.blobs.read(_bid(1), 0, 5) == b"01234"
    rep.apply({"op": "delete", "table": "objects", "bucket": "bkt", "key": "k"})
    assert not rep.blobs.final_path(_bid(1)).exists()
    assert rep.blobs.read(_bid(1), 5, 5) == b"56789"


def test_write_whole_stages_a_small_blob_in_one_call_and_the_op_installs_it(rep: Replica) -> None:
    data = b"a small object" * 100
    d = rep.blobs.write_whole(_bid(9), data, md5=True)
    assert (d.size, d.sha256, d.md5) == (
        len(data),
        hashlib.sha256(data).hexdigest(),
        hashlib.md5(data).hexdigest(),
    )
    assert d.crc32 == zlib.crc32(data)
    assert rep.blobs.staging_path(_bid(9)).read_bytes() == data
    with pytest.raises(BlobError):  # finished: no longer open for writing
        rep.blobs.writer(_bid(9))
    rep.apply({"op": "put", "table": "buckets", "name": "bkt", "owner": "acct", "created": 1.0})
    rep.apply(_blob(data, 9), _obj("bkt", "k", [(_bid(9), len(data))]))
    assert rep.blobs.read(_bid(9), 0, len(data)) == data
    assert not list(rep.blobs.staging.iterdir())
    # A whole blob whose digest does not match the op stays missing, not installed.
    rep.blobs.write_whole(_bid(10), b"damaged")
    rep.apply(_blob(b"intact!", 10), _obj("bkt", "k2", [(_bid(10), 7)]))
    assert _bid(10) in rep.blobs.missing and not rep.blobs.has(_bid(10))
