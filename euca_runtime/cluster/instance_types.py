"""The instance types every cluster component agrees on (docs/cluster-api.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceType:
    name: str
    cores: int
    memory_mib: int
    disk_gib: int


INSTANCE_TYPES: dict[str, InstanceType] = {
    t.name: t
    for t in (
        InstanceType("t1.micro", 1, 256, 5),
        InstanceType("m1.small", 1, 512, 10),
        InstanceType("m1.medium", 1, 1024, 10),
        InstanceType("c1.medium", 2, 1024, 10),
        InstanceType("m1.large", 2, 2048, 20),
    )
}

INSTANCE_STATES = ("pending", "running", "shutting-down", "terminated", "lost")


def instance_type(name: str) -> InstanceType:
    """The named type; KeyError names the valid ones."""
    try:
        return INSTANCE_TYPES[name]
    except KeyError:
        raise KeyError(f"unknown instance type {name!r} (known: {', '.join(INSTANCE_TYPES)})") from None
