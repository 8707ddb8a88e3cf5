"""Per-instance persistence: SQLAlchemy 2 ORM, Alembic schema, epoch fencing, change log,
snapshots for state transfer and the write-through object cache.

Typical wiring (one component instance)::

    store = Store.open(sqlite_url(DIR / "kv.db"), component="kv", group="kv")
    cache = ObjectCache(store, warm=True)
    store.apply(epoch, seq, [put_op("k", b"v")])   # replication applies every record
    cache.get("kv", "k")                           # reads come from memory

and one core-only store per process for local state (voter promises, service targets)::

    local = Store.open(sqlite_url(DIR / "node.db"))
"""

from euca_runtime.store import kv
from euca_runtime.store.cache import CacheStats, ObjectCache
from euca_runtime.store.component import (
    ApplyContext,
    ComponentSpec,
    Op,
    OpApplier,
    get_component,
    register_component,
    registered_components,
)
from euca_runtime.store.db import (
    SERVICE_STATES,
    ApplyResult,
    ChangeListener,
    Changes,
    EpochRange,
    LogRecord,
    Position,
    ServiceTarget,
    SnapshotImport,
    Store,
    alembic_config,
    common_prefix,
    make_engine,
    migrate,
    schema_heads,
    sqlite_url,
)
from euca_runtime.store.errors import (
    Divergence,
    GapError,
    LogTruncated,
    SnapshotError,
    StaleEpoch,
    StoreError,
    UnknownOp,
    WrongGroup,
)
from euca_runtime.store.kv import KV, KvBase, KvEntry, delete_op, put_op

__all__ = [
    "KV",
    "SERVICE_STATES",
    "ApplyContext",
    "ApplyResult",
    "CacheStats",
    "ChangeListener",
    "Changes",
    "ComponentSpec",
    "Divergence",
    "EpochRange",
    "GapError",
    "KvBase",
    "KvEntry",
    "LogRecord",
    "LogTruncated",
    "ObjectCache",
    "Op",
    "OpApplier",
    "Position",
    "ServiceTarget",
    "SnapshotError",
    "SnapshotImport",
    "StaleEpoch",
    "Store",
    "StoreError",
    "UnknownOp",
    "WrongGroup",
    "alembic_config",
    "common_prefix",
    "delete_op",
    "get_component",
    "kv",
    "make_engine",
    "migrate",
    "put_op",
    "register_component",
    "registered_components",
    "schema_heads",
    "sqlite_url",
]
