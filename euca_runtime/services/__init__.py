"""The component types the runtime hosts. Importing this package registers them.

- `kv`: an internal replicated key-value service (tests and benchmarks), with an HTTP API.
- `clc`: the cloud controller; for now only the service registry (IAM/EC2 come later).
- `arbitrator`: a witness voter host; route probing comes later.
- `cc`, `nc`: the cluster side (`euca_runtime.cluster`): the CC proxy and the node controller.
"""

from euca_runtime.cluster import cc_proxy, nc
from euca_runtime.services import arbitrator, clc, kv, walrus

__all__ = ["arbitrator", "cc_proxy", "clc", "kv", "nc", "walrus"]
