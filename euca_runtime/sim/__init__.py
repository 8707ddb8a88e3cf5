"""Seeded deterministic simulation of the lease, membership and replication protocol.

`run_schedule(seed, SimConfig(...))` builds a group of simulated processes (voters, data
nodes, arbitrator witnesses) around the pure protocol core (`euca_runtime.lease`,
`euca_runtime.replication`), drives it through a random but reproducible schedule of network
and process faults with clients writing, and checks the invariants after every step.
Replay one seed with ``python -m euca_runtime.sim --seed N [--variant V] [--trace]``.
"""

from euca_runtime.sim.checkers import SafetyChecker, Violation
from euca_runtime.sim.network import NetworkParams, SimNetwork
from euca_runtime.sim.node import ClientWrite, Factories, NodeTiming, SimNode
from euca_runtime.sim.variants import VARIANTS
from euca_runtime.sim.world import TOPOLOGIES, ScheduleResult, SimConfig, World, run_schedule

__all__ = [
    "TOPOLOGIES",
    "VARIANTS",
    "ClientWrite",
    "Factories",
    "NetworkParams",
    "NodeTiming",
    "SafetyChecker",
    "ScheduleResult",
    "SimConfig",
    "SimNetwork",
    "SimNode",
    "Violation",
    "World",
    "run_schedule",
]
