"""The component types the runtime hosts. Importing this package registers them.

- `kv`: an internal replicated key-value service (tests and benchmarks), with an HTTP API.
- `clc`: the cloud controller; for now only the service registry (IAM/EC2 come later).
- `arbitrator`: a witness voter host that probes user routes (docs/arbitrator.md).
"""

from euca_runtime.services import arbitrator, clc, kv, walrus

__all__ = ["arbitrator", "clc", "kv", "walrus"]
