"""euca_runtime: the HA fabric that runs on every euca-ha host.

It hosts the cloud's components and provides the service bus, leases and epochs,
the replicated write-through cache, state transfer, the CC proxy and the arbitrator.
"""

__version__ = "0.1.0"
