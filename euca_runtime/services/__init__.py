"""The component types the runtime hosts. Importing this package registers them.

- `kv`: an internal replicated key-value service (tests and benchmarks), with an HTTP API.
- `clc`: the cloud controller: service registry, IAM and the EC2 API.
- `arbitrator`: a witness voter host that probes user routes (docs/arbitrator.md).
- `sc`: a cluster's storage controller (volumes and snapshots).
- `cc`, `nc`: the cluster side (`euca_runtime.cluster`): the CC proxy and the node controller.
"""

from euca_runtime.cluster import cc_proxy, nc
from euca_runtime.services import arbitrator, clc, kv, sc, walrus

__all__ = ["arbitrator", "cc_proxy", "clc", "kv", "nc", "sc", "walrus"]
