"""Group commit and big values: concurrent 4 MiB kv puts through real processes.

Concurrent writes are group-committed into one change record; the record is capped by bytes
(`node.MAX_BATCH_BYTES`), so five 4 MiB values (20 MiB together, more than one 16 MiB bus
frame) become several records that each fit a frame, and the backup applies every one.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

from runtime_harness import Cloud, wait_until

from euca_runtime.services.kv import MAX_VALUE


def _value(i: int) -> bytes:
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (MAX_VALUE // len(seed) + 1))[:MAX_VALUE]


def test_concurrent_max_size_puts_replicate_and_survive_a_switchover(ha_cloud: Cloud) -> None:
    wait_until(
        lambda: ha_cloud.enabled("kv") == "node-a.kv" and ha_cloud.service("node-b.kv")["in_sync"],
        what="node-a.kv ENABLED with node-b.kv in sync",
    )
    n = 6
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: ha_cloud.put("node-a", f"big{i}", _value(i), timeout=30), range(n)))
    assert len({r["seq"] for r in results}) >= 2  # not one record: 24 MiB do not fit a bus frame
    wait_until(
        lambda: (
            (s := ha_cloud.service("node-b.kv", via="node-a"))["state"] == "DISABLED"
            and s["in_sync"]
            and s["lag"] == 0
        ),
        timeout=60.0,
        what="node-b.kv in sync with lag 0 after the big writes",
    )
    # Prove the backup has every value: make it the primary and read them back.
    proc = ha_cloud.ctl("switchover", "kv", "--to", "node-b.kv")
    assert proc.returncode == 0, proc.stderr
    for i in range(n):
        assert ha_cloud.get("node-b", f"big{i}") == _value(i)
