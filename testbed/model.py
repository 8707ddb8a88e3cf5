"""The testbed's data model: names, addresses and the state file. Pure: no I/O but JSON.

A *bed* is a set of hosts on one bridge. Each bed owns one /24 inside 10.231.0.0/16:
the controller (this machine) is .1 on the bridge, the upstream namespace that stands for
the users is .254, and host i is .(10 + i). Everything a bed makes is named after it, so
`down` can find all of it from the name alone, even after a half-made `up`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_ROOT = Path("/var/lib/euca-testbed")
NETWORK = ipaddress.IPv4Network("10.231.0.0/16")
FIRST_HOST_OCTET = 11
MAX_HOSTS = 200  # .11 .. .210, below the upstream's .254
MAX_BEDS = 250
_BED_NAME = re.compile(r"^[a-z][a-z0-9]{0,6}$")


class TestbedError(Exception):
    """A problem the operator can fix; the CLI prints it as one line."""

    __test__ = False  # not a pytest test class, despite the name


def check_bed_name(name: str) -> str:
    # Interface names are at most 15 bytes: "vb-" + "<bed>-h<NNN>" must fit.
    if not _BED_NAME.match(name):
        raise TestbedError(
            f"bed name {name!r} is not valid: use 1-7 lowercase letters or digits, starting with a letter"
        )
    return name


def check_host_count(count: int) -> int:
    if count < 1 or count > MAX_HOSTS:
        raise TestbedError(
            f"--hosts {count}: a bed holds 1 to {MAX_HOSTS} hosts (one /24 per bed, .11 to .210)"
        )
    return count


def bed_subnet(index: int) -> ipaddress.IPv4Network:
    if not 0 <= index < MAX_BEDS:
        raise TestbedError(f"bed index {index} out of range 0..{MAX_BEDS - 1}")
    return ipaddress.IPv4Network(f"10.231.{index}.0/24")


def host_name(i: int) -> str:
    return f"h{i}"


@dataclass
class Host:
    name: str
    address: str
    machine: str  # systemd-nspawn machine name: "<bed>-<host>"
    leader: int | None = None  # pid of the container's init in our pid namespace
    nspawn: int | None = None  # pid of the systemd-nspawn process that runs it
    paused: list[int] = field(default_factory=list)

    @property
    def veth(self) -> str:
        # systemd-nspawn names the host side of --network-bridge "vb-<machine>".
        return f"vb-{self.machine}"


@dataclass
class Fault:
    kind: str  # partition | isolate | degrade | cut-upstream
    args: dict[str, Any]


@dataclass
class Bed:
    name: str
    index: int
    hosts: list[Host]
    faults: list[Fault] = field(default_factory=list)
    binds: list[str] = field(default_factory=list)
    """Controller directories every host sees read-only at the same path (``--bind-ro``): e.g.
    a checkout and its venv, which the host's own /tmp (a tmpfs) or overlay might hide."""

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return bed_subnet(self.index)

    @property
    def bridge(self) -> str:
        return f"eucatb-{self.name}"

    @property
    def controller_address(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def upstream_address(self) -> str:
        return str(self.subnet.network_address + 254)

    @property
    def upstream_netns(self) -> str:
        return f"eucatb-{self.name}-up"

    @property
    def upstream_veth(self) -> str:
        return f"tu-{self.name}"

    @property
    def nft_table(self) -> str:
        return f"eucatb_{self.name}"

    @property
    def dir(self) -> Path:
        return STATE_ROOT / self.name

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts) or "none"
        raise TestbedError(f"no host {name!r} in bed {self.name!r} (hosts: {known})")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Bed:
        raw = json.loads(text)
        return cls(
            name=raw["name"],
            index=raw["index"],
            hosts=[Host(**h) for h in raw["hosts"]],
            faults=[Fault(**f) for f in raw.get("faults", [])],
            binds=[str(b) for b in raw.get("binds", [])],
        )


def new_bed(name: str, count: int, used_indexes: set[int]) -> Bed:
    check_bed_name(name)
    check_host_count(count)
    free = [i for i in range(MAX_BEDS) if i not in used_indexes]
    if not free:
        raise TestbedError(f"all {MAX_BEDS} bed address ranges are in use: bring a bed down first")
    index = free[0]
    subnet = bed_subnet(index)
    hosts = [
        Host(
            name=host_name(i),
            address=str(subnet.network_address + FIRST_HOST_OCTET - 1 + i),
            machine=f"{name}-{host_name(i)}",
        )
        for i in range(1, count + 1)
    ]
    return Bed(name=name, index=index, hosts=hosts)
