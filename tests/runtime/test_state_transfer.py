"""Chunked, streamed state transfer (DESIGN.md section 7) over the SQL store and between real
runtime processes: bounded chunks and memory, atomic install, fencing, restart after a crash
mid-transfer, and a backup rebuilt from nothing under write load that fails over losing nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_harness import Cloud, Writer, run_cli, wait_until

from euca_runtime.component import SqlReplicaStore
from euca_runtime.replication import (
    CatchUpRequest,
    Replicate,
    ReplicateAck,
    ReplicationBackup,
    ReplicationConfig,
    ReplicationPrimary,
    Send,
    SnapshotChunk,
    SnapshotPull,
)
from euca_runtime.services.kv import MAX_VALUE
from euca_runtime.store import Store, put_op, sqlite_url

MiB = 1024 * 1024
G = "kv"
LOG_KEEP = 10_000
"""`Store.open`'s default `log_keep`: change records a primary retains for catch-up."""


# --------------------------------------------------------------------------- SQL store level


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    a = Store.open(sqlite_url(tmp_path / "a.db"), component="kv", group=G)
    b = Store.open(sqlite_url(tmp_path / "b.db"), component="kv", group=G)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _fill(store: Store, values: dict[str, bytes], epoch: int = 1) -> None:
    seq = store.position().seq
    for key, value in values.items():
        seq += 1
        store.apply(epoch, seq, [put_op(key, value)])


def _rows(store: Store) -> dict[str, bytes]:
    return {r["key"]: r["value"] for r in store.scan("kv")}


def _values(n_big: int, n_small: int, seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    out = {f"big{i:03d}": rng.randbytes(rng.randint(MiB // 4, MAX_VALUE)) for i in range(n_big)}
    out.update({f"small{i:05d}": rng.randbytes(rng.randint(1, 300)) for i in range(n_small)})
    return out


def _pump(p: ReplicationPrimary, b: ReplicationBackup, sends: list[Send], now: float) -> list[SnapshotChunk]:
    """Deliver messages between the two until quiet; returns the chunks that went by."""
    chunks = []
    queue = list(sends)
    while queue:
        s = queue.pop(0)
        if s.to == b.name:
            if isinstance(s.msg, SnapshotChunk):
                chunks.append(s.msg)
            queue += b.handle(s.msg, now)
        elif isinstance(s.msg, SnapshotPull):
            queue += p.on_pull(s.msg, now)
        elif isinstance(s.msg, ReplicateAck):
            queue += p.on_ack(s.msg, now)
        elif isinstance(s.msg, CatchUpRequest):
            queue += p.on_catch_up(s.msg, now)
    return chunks


def _primary(store: Store, config: ReplicationConfig) -> ReplicationPrimary:
    store.trim_log(keep=1)  # the log no longer covers an empty backup: it needs a snapshot
    p = ReplicationPrimary("a", G, 1, SqlReplicaStore(store), ["a", "b"], config, now=0.0)
    p.next_in_sync_proposal(0.0)
    p.on_in_sync_recorded({"a"})
    return p


def test_sql_transfer_chunks_are_bounded_and_the_install_is_exact(stores: tuple[Store, Store]) -> None:
    a, b = stores
    values = _values(n_big=6, n_small=3000)
    _fill(a, values)
    config = ReplicationConfig(chunk_bytes=256 * 1024)
    p = _primary(a, config)
    backup = ReplicationBackup("b", G, SqlReplicaStore(b), config)
    last = a.position()
    sends = backup.handle(Replicate(G, "a", 1, (), last.seq, last.epoch, last.seq), 0.0)
    chunks = _pump(p, backup, sends, 0.0)
    assert _rows(b) == values and b.position() == last
    assert b.snapshot_digest() == a.snapshot_digest()
    assert [c.index for c in chunks] == list(range(len(chunks))) and chunks[-1].last
    for c in chunks:
        rows = [row for part in c.data if part["type"] == "rows" for row in part["rows"]]
        size = sum(len(v) for _, v, *_ in rows)
        # About chunk_bytes each, or a single bigger row alone.
        assert size <= config.chunk_bytes or len(rows) == 1, (c.index, len(rows), size)
    assert len(chunks) > 6
    assert p.transfers == {}  # closed once the backup acknowledged the snapshot's seq


def test_sql_transfer_memory_stays_bounded_by_a_few_chunks(stores: tuple[Store, Store]) -> None:
    a, b = stores
    values = {f"v{i:03d}": os.urandom(MiB) for i in range(24)}  # 24 MiB of state
    _fill(a, values)
    config = ReplicationConfig(chunk_bytes=MiB)
    p = _primary(a, config)
    backup = ReplicationBackup("b", G, SqlReplicaStore(b), config)
    del values
    last = a.position()
    tracemalloc.start()
    try:
        sends = backup.handle(Replicate(G, "a", 1, (), last.seq, last.epoch, last.seq), 0.0)
        queue = list(sends)
        while queue:  # like _pump, without keeping the chunks
            s = queue.pop(0)
            if s.to == "b":
                queue += backup.handle(s.msg, 0.0)
            elif isinstance(s.msg, SnapshotPull):
                queue += p.on_pull(s.msg, 0.0)
            elif isinstance(s.msg, ReplicateAck):
                queue += p.on_ack(s.msg, 0.0)
            elif isinstance(s.msg, CatchUpRequest):
                queue += p.on_catch_up(s.msg, 0.0)
            del s
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert b.position() == last and len(_rows(b)) == 24
    assert peak < 12 * MiB, f"peak Python allocations {peak / MiB:.1f} MiB for a 24 MiB state"


def test_sql_install_is_invisible_until_the_last_chunk_and_a_crash_leaves_the_old_state(
    stores: tuple[Store, Store], tmp_path: Path
) -> None:
    a, b = stores
    _fill(a, _values(n_big=3, n_small=500, seed=2))
    _fill(b, {"old": b"state"}, epoch=1)
    before = b.snapshot_digest()
    config = ReplicationConfig(chunk_bytes=128 * 1024)
    p = _primary(a, config)
    rs = SqlReplicaStore(b)
    backup = ReplicationBackup("b", G, rs, config)
    last = a.position()
    (ask,) = [s.msg for s in backup.handle(Replicate(G, "a", 1, (), last.seq, 1, last.seq), 0.0)]
    queue = p.on_catch_up(ask, 0.0)
    for _ in range(3):  # a few chunks staged, then the process "dies"
        (pull,) = backup.handle(queue[0].msg, 0.0)
        queue = p.on_pull(pull.msg, 0.0)
    assert backup.transfer is not None and backup.transfer[0] == 3
    # Another connection (another process) sees the old state; so does the store's own reader.
    with contextlib.closing(sqlite3.connect(tmp_path / "b.db")) as conn:
        assert conn.execute("select key from kv").fetchall() == [("old",)]
    assert b.position().seq == 1
    # A newer epoch (failover) aborts the staged install: nothing of it remains.
    backup.handle(Replicate(G, "c", 2, (), 1, 1, 1), 0.1)
    assert backup.transfer is None and b.snapshot_digest() == before and rs.fence_epoch == 2
    p.close()


def test_sql_fence_raised_while_installing_aborts_the_install(stores: tuple[Store, Store]) -> None:
    a, b = stores
    _fill(a, _values(n_big=2, n_small=10, seed=3))
    config = ReplicationConfig(chunk_bytes=64 * 1024)
    p = _primary(a, config)
    rs = SqlReplicaStore(b)
    backup = ReplicationBackup("b", G, rs, config)
    last = a.position()
    (ask,) = [s.msg for s in backup.handle(Replicate(G, "a", 1, (), last.seq, 1, last.seq), 0.0)]
    (chunk,) = [s.msg for s in p.on_catch_up(ask, 0.0)]
    backup.handle(chunk, 0.0)
    rs.raise_fence(5)  # e.g. this instance became primary: the install must not block it
    assert b.fence() == 5 and _rows(b) == {} and backup.transfer is not None
    # The backup notices at its next message and starts again (here: fenced, the primary is old).
    p.close()


def test_log_catch_up_of_big_records_is_split_into_bounded_messages(stores: tuple[Store, Store]) -> None:
    a, b = stores
    values = {f"r{i}": os.urandom(700 * 1024) for i in range(6)}
    _fill(a, values)
    rs = SqlReplicaStore(a)
    recs = rs.records_after(0, 64, max_bytes=MiB)
    assert recs is not None and [r.seq for r in recs] == [1]  # a second one would exceed 1 MiB
    assert [r.seq for r in rs.records_after(0, 64, max_bytes=2 * MiB) or []] == [1, 2]
    config = ReplicationConfig(chunk_bytes=MiB)
    p = ReplicationPrimary("a", G, 1, rs, ["a", "b"], config, now=0.0)
    p.next_in_sync_proposal(0.0)
    p.on_in_sync_recorded({"a"})
    backup = ReplicationBackup("b", G, SqlReplicaStore(b), config)
    sent: list[int] = []
    queue = backup.handle(Replicate(G, "a", 1, (), 6, 1, 6), 0.0)
    while queue:
        s = queue.pop(0)
        if s.to == "b":
            if isinstance(s.msg, Replicate):
                sent.append(len(s.msg.records))
            queue += backup.handle(s.msg, 0.0)
        elif isinstance(s.msg, CatchUpRequest):
            queue += p.on_catch_up(s.msg, 0.0)
        elif isinstance(s.msg, ReplicateAck):
            queue += p.on_ack(s.msg, 0.0)
    assert _rows(b) == values and max(sent) == 1


# --------------------------------------------------------------------------- real processes


def _settled(cloud: Cloud) -> bool:
    rows = {s["name"]: s for s in cloud.services(via="node-a")}
    return (
        rows["node-a.kv"]["state"] == "ENABLED"
        and rows["node-b.kv"]["state"] == "DISABLED"
        and rows["node-b.kv"]["in_sync"]
        and rows["node-b.kv"].get("lag") == 0
    )


def _kv_db(cloud: Cloud, node: str) -> Path:
    return cloud.layout.data_dir(node) / f"{node}.kv.db"


def _db_rows(path: Path) -> dict[str, str]:
    """key -> sha256 of the value, read straight from an instance's SQLite file."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {k: hashlib.sha256(v).hexdigest() for k, v in conn.execute("select key, value from kv")}


def _db_position(path: Path) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        row = conn.execute("select applied_seq, applied_epoch from fence").fetchone()
        return int(row[0]), int(row[1])


class RssSampler:
    """Samples VmRSS of some pids every 50 ms in a thread (a measurement, never asserted)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self.start: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss(pid: int) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError):
                    self.peak[name] = max(self.peak[name], self.rss(pid))

    def __enter__(self) -> RssSampler:
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                self.start[name] = self.rss(pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _load(cloud: Cloud, prefix: str, total: int, seed: int) -> dict[str, str]:
    """Put random values (up to kv's MAX_VALUE) until `total` bytes; returns key -> sha256."""
    rng = random.Random(seed)
    loaded: dict[str, str] = {}
    size = 0
    i = 0
    while size < total:
        value = rng.randbytes(rng.choice([rng.randint(1, 2000), rng.randint(MiB, MAX_VALUE)]))
        key = f"{prefix}{i:05d}"
        cloud.put("node-a", key, value, timeout=30)
        loaded[key] = hashlib.sha256(value).hexdigest()
        size += len(value)
        i += 1
    return loaded


def _transfer_log(cloud: Cloud, node: str) -> list[str]:
    return [
        line for line in (cloud.root / f"{node}.log").read_text().splitlines() if "state transfer" in line
    ]


def _kill_when_receiving(cloud: Cloud, killed: threading.Event) -> None:
    """kill -9 node-b as soon as its log says a state transfer started (tailing the log)."""
    path = cloud.root / "node-b.log"
    offset = path.stat().st_size if path.exists() else 0
    deadline = time.monotonic() + 100
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with path.open("rb") as f:
                f.seek(offset)
                if b"state transfer receiving" in f.read():
                    os.kill(cloud.pid("node-b"), signal.SIGKILL)
                    killed.set()
                    return
        time.sleep(0.005)  # polling period of the log tail


def test_big_store_restarted_and_rebuilt_backups_under_load_then_failover(ha_cloud: Cloud) -> None:
    cloud = ha_cloud
    wait_until(lambda: _settled(cloud), timeout=30, what="HA settled")
    expected = _load(cloud, "big", 40 * MiB, seed=7)
    wait_until(lambda: _settled(cloud), timeout=60, what="node-b in sync after the load")

    # 1. A restarted backup catches up (log records, or a transfer if the log moved on).
    run_cli("down", "--dir", str(cloud.root), "--node", "node-b")
    wait_until(
        lambda: cloud.service("node-b.kv", via="node-a")["state"] == "NOTREADY", what="node-b seen down"
    )
    expected.update(_load(cloud, "more", 8 * MiB, seed=8))
    with Writer(cloud, ["node-a"], "w1", per_thread_rate=50) as w1:
        wait_until(lambda: w1.count() >= 10, what="writes flowing")
        run_cli("up", "--dir", str(cloud.root), "--node", "node-b")
        wait_until(lambda: _settled(cloud), timeout=120, what="restarted node-b DISABLED, in sync")
        n = w1.count()
        wait_until(lambda: w1.count() >= n + 10, what="writes while node-b is in sync")
    assert w1.errors == []

    # 2. A backup rebuilt from nothing (its database wiped), crashing once mid-transfer.
    run_cli("down", "--dir", str(cloud.root), "--node", "node-b")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{_kv_db(cloud, 'node-b')}{suffix}").unlink()
    # The primary keeps the last 10 000 change records: push its log past an empty store's
    # position so that catching up needs a state transfer, not a replay of the whole log.
    seq = int(cloud.service("node-a.kv", via="node-a")["seq"])
    for i in range(max(0, LOG_KEEP + 100 - seq)):
        key = f"fill{i:05d}"
        cloud.put("node-a", key, key.encode())
        expected[key] = hashlib.sha256(key.encode()).hexdigest()
    killed = threading.Event()
    killer = threading.Thread(target=_kill_when_receiving, args=(cloud, killed), daemon=True)
    killer.start()
    run_cli("up", "--dir", str(cloud.root), "--node", "node-b", check=False)  # may see the kill
    killer.join(timeout=120)
    assert killed.is_set(), "node-b never logged that it was receiving a state transfer"
    wait_until(lambda: not os.path.exists(f"/proc/{cloud.pid('node-b')}"), what="node-b dead")
    # All or nothing: either none of the snapshot was committed (the usual case: the wiped
    # store is still empty), or all of it (the last chunk won the race with the kill).
    position, rows = _db_position(_kv_db(cloud, "node-b")), _db_rows(_kv_db(cloud, "node-b"))
    if position == (0, 0):
        assert rows == {}
        print("killed mid-transfer: nothing of the snapshot was committed")
    else:
        assert all(rows.get(k) == d for k, d in expected.items()), "a partly installed snapshot"
        print(f"the install committed before the kill (position {position})")
    assert cloud.service("node-b.kv", via="node-a")["state"] != "DISABLED"

    with Writer(cloud, ["node-a"], "w2", per_thread_rate=50) as w2:
        wait_until(lambda: w2.count() >= 10, what="writes flowing")
        run_cli("up", "--dir", str(cloud.root), "--node", "node-b")
        pids = {"node-a": cloud.pid("node-a"), "node-b": cloud.pid("node-b")}
        t0 = time.monotonic()
        with RssSampler(pids) as rss:
            wait_until(lambda: _settled(cloud), timeout=180, what="rebuilt node-b DISABLED, in sync")
        took = time.monotonic() - t0
        n = w2.count()
        wait_until(lambda: w2.count() >= n + 10, what="writes while node-b is in sync")
    assert w2.errors == []
    installed = [line for line in _transfer_log(cloud, "node-b") if "installed" in line]
    print(
        f"state transfer of {len(expected)} keys (~48 MiB) + writer keys: "
        f"{took:.1f} s from start to DISABLED; RSS node-a {rss.start.get('node-a', 0) / MiB:.0f} -> "
        f"peak {rss.peak['node-a'] / MiB:.0f} MiB, node-b peak {rss.peak['node-b'] / MiB:.0f} MiB; "
        f"{installed[-1] if installed else 'no install line'}"
    )

    # Every key identical on both replicas, read straight from their databases.
    a_rows, b_rows = _db_rows(_kv_db(cloud, "node-a")), _db_rows(_kv_db(cloud, "node-b"))
    assert a_rows == b_rows
    for key, digest in expected.items():
        assert a_rows[key] == digest, key

    # 3. A failover to the rebuilt backup loses nothing.
    os.kill(cloud.pid("node-a"), signal.SIGKILL)
    wait_until(lambda: cloud.enabled("kv", via="node-b") == "node-b.kv", timeout=30, what="node-b.kv ENABLED")
    for key, digest in expected.items():
        value = cloud.get("node-b", key)
        assert value is not None and hashlib.sha256(value).hexdigest() == digest, key
    assert w1.missing(via="node-b") == [] and w2.missing(via="node-b") == []
