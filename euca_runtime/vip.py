"""Service VIPs: the ENABLED instance's host holds the service's virtual address.

Configured per service group in the runtime config (the deployment renders it from the
inventory's ``euca_vips``)::

    vips:
      - {group: walrus, address: 10.231.5.100/24}             # interface: the listen address's
      - {group: clc, address: 10.231.5.101/24, interface: eth0}

**What happens.** While an instance of the group on this node is ENABLED and its lease (on this
node's own monotonic clock) has more than `guard` seconds left, the node holds the address:
``ip address add ADDR dev IF``, then a gratuitous ARP (an unsolicited ARP request and reply
for the address from the interface's MAC, on a raw ``AF_PACKET`` socket) at once, again
`announce_after` seconds later (0.5, 1, 2 s), and then every `reannounce` seconds for as long as
it holds it, so a neighbour cache that went stale while a partition lasted is corrected within
`reannounce` seconds after it heals. It drops the address (``ip address del``) as soon as the
instance leaves ENABLED (step-down, switchover, stop) or the lease has `guard` seconds or less
left without a renewal, and on a graceful stop before the leases are released.

**Why the old holder is gone before the new one arrives.** The holder measures its lease from
the moment it *sent* the request, minus a drift margin; the voters measure theirs from when they
*received* it (DESIGN.md section 6). So the holder's lease ends, in real time, before any
voter's grant does, and no other instance can be granted the lease before a majority of grants
has expired. Dropping the address at holder-side expiry minus `guard` (which covers one tick of
this loop plus the ``ip`` command) therefore happens before anyone else can hold the lease, and
the next holder adds the address only after it holds the lease. Two cases the process cannot
handle itself: a ``kill -9`` leaves the address on the interface (the systemd unit's
``ExecStopPost=`` runs ``python -m euca_runtime.vip release --config FILE`` as root, which
removes it, before a backup can be granted the lease after the lease's duration); and a frozen
process (``SIGSTOP``) cannot drop it until it resumes, when it drops it before serving anything
(its lease has expired). Neither can cause two writers (I1: fencing); meanwhile the new holder's
announcements win the neighbours' caches.

The decision logic (`VipState`) is pure and takes the clock as an argument; the network side
(`IpCommands`, `send_gratuitous_arp`) is thin. Needs ``CAP_NET_ADMIN`` (address) and
``CAP_NET_RAW`` (ARP) on the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from euca_runtime.log import get_logger

if TYPE_CHECKING:
    from euca_runtime.node import Node

log = get_logger("vip")

ANNOUNCE_AFTER = (0.5, 1.0, 2.0)
"""Seconds after taking the address at which it is announced again."""
REANNOUNCE = 2.0
"""Then every this many seconds while the address is held."""
GUARD = 0.15
"""Drop the address when the lease has this little left on our clock without a renewal."""
TICK = 0.05
"""The manager re-evaluates at least this often."""


class VipConfigError(ValueError):
    """A bad ``vips`` entry; the message names the key."""


@dataclass(frozen=True)
class VipSpec:
    """One service VIP: the group whose ENABLED instance holds it, the address, the interface."""

    group: str
    address: ipaddress.IPv4Interface
    interface: str | None = None

    @property
    def ip(self) -> str:
        return str(self.address.ip)


def parse_vips(value: Any, path: str = "vips") -> tuple[VipSpec, ...]:
    """Validate the config's ``vips`` list (raises `VipConfigError` naming the bad key)."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise VipConfigError(f"{path}: must be a list, got {value!r}")
    out: list[VipSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            raise VipConfigError(f"{where}: must be a mapping with group and address, got {item!r}")
        unknown = set(item) - {"group", "address", "interface"}
        if unknown:
            raise VipConfigError(
                f"{where}.{sorted(unknown)[0]}: unknown key (allowed: address, group, interface)"
            )
        group = item.get("group")
        if not isinstance(group, str) or not group:
            raise VipConfigError(
                f"{where}.group: must be a service group such as walrus or clc, got {group!r}"
            )
        raw = item.get("address")
        if not isinstance(raw, str) or "/" not in raw:
            raise VipConfigError(
                f"{where}.address: must be an IPv4 address with a prefix length (A.B.C.D/N), got {raw!r}"
            )
        try:
            address = ipaddress.IPv4Interface(raw)
        except ValueError:
            raise VipConfigError(f"{where}.address: not an IPv4 address/prefix, got {raw!r}") from None
        if str(address.ip) in seen:
            raise VipConfigError(f"{where}.address: {address.ip} is listed twice")
        seen.add(str(address.ip))
        iface = item.get("interface")
        if iface is not None and (not isinstance(iface, str) or not iface or "/" in iface or len(iface) > 15):
            raise VipConfigError(f"{where}.interface: must be a network interface name, got {iface!r}")
        out.append(VipSpec(group=group, address=address, interface=iface))
    return tuple(out)


# --------------------------------------------------------------------------- the pure decision


@dataclass
class VipState:
    """Whether this node should hold one VIP, and when to announce it (pure; clock passed in)."""

    guard: float = GUARD
    announce_after: Sequence[float] = ANNOUNCE_AFTER
    reannounce: float = REANNOUNCE
    held: bool = False
    acquired_at: float = 0.0
    announcements: int = 0
    next_announce: float = float("inf")
    closed: bool = False

    def wants(self, now: float, lease_end: float | None) -> bool:
        """Hold it iff the local instance is ENABLED with more than `guard` of lease left."""
        return not self.closed and lease_end is not None and now < lease_end - self.guard

    def step(self, now: float, lease_end: float | None) -> list[str]:
        """The actions due now: ``add``, ``announce``, ``remove`` (in that order)."""
        want = self.wants(now, lease_end)
        if want and not self.held:
            self.held, self.acquired_at, self.announcements = True, now, 0
            self._schedule(now)
            return ["add", "announce"]
        if self.held and not want:
            self.held, self.next_announce = False, float("inf")
            return ["remove"]
        if self.held and now >= self.next_announce:
            self.announcements += 1
            self._schedule(now)
            return ["announce"]
        return []

    def _schedule(self, now: float) -> None:
        if self.announcements < len(self.announce_after):
            self.next_announce = self.acquired_at + self.announce_after[self.announcements]
        else:
            self.next_announce = now + self.reannounce

    def next_deadline(self, lease_end: float | None) -> float:
        """When `step` must run next at the latest (lease guard or the next announcement)."""
        if not self.held:
            return float("inf")
        drop_at = float("inf") if lease_end is None else lease_end - self.guard
        return min(drop_at, self.next_announce)


# --------------------------------------------------------------------------- the network side


def _run_ip(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=5, check=False)


def interface_of(
    address: str, run: Callable[[Sequence[str]], subprocess.CompletedProcess[str]] = _run_ip
) -> str:
    """The interface that holds `address` (``ip -j address show``)."""
    out = run(["-j", "address", "show"])
    if out.returncode != 0:
        raise OSError(f"ip address show failed: {out.stderr.strip()}")
    for link in json.loads(out.stdout or "[]"):
        for a in link.get("addr_info", ()):
            if a.get("local") == address:
                return str(link["ifname"])
    raise OSError(f"no interface holds {address}: set the VIP's interface")


def holds(
    spec: VipSpec, iface: str, run: Callable[[Sequence[str]], subprocess.CompletedProcess[str]] = _run_ip
) -> bool:
    out = run(["-j", "address", "show", "dev", iface])
    if out.returncode != 0:
        return False
    return any(
        a.get("local") == spec.ip
        for link in json.loads(out.stdout or "[]")
        for a in link.get("addr_info", ())
    )


def add_address(spec: VipSpec, iface: str) -> None:
    out = _run_ip(["address", "replace", str(spec.address), "dev", iface])
    if out.returncode != 0:
        raise OSError(f"ip address replace {spec.address} dev {iface}: {out.stderr.strip()}")


def remove_address(spec: VipSpec, iface: str) -> bool:
    """Remove the address; True if it was there."""
    out = _run_ip(["address", "del", str(spec.address), "dev", iface])
    if out.returncode == 0:
        return True
    if "Cannot assign" in out.stderr or "not" in out.stderr.lower():
        return False
    raise OSError(f"ip address del {spec.address} dev {iface}: {out.stderr.strip()}")


def arp_frames(mac: bytes, ip: str) -> list[bytes]:
    """A gratuitous ARP request and reply for `ip` from `mac` (broadcast Ethernet frames)."""
    addr = socket.inet_aton(ip)
    eth = b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
    frames = []
    for op, target_mac in ((1, b"\x00" * 6), (2, b"\xff" * 6)):
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac + addr + target_mac + addr
        frames.append(eth + arp)
    return frames


def send_gratuitous_arp(iface: str, ip: str) -> None:
    """Announce `ip` on `iface` (needs CAP_NET_RAW)."""
    mac_text = Path(f"/sys/class/net/{iface}/address").read_text().strip()
    mac = bytes.fromhex(mac_text.replace(":", ""))
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((iface, 0))
        for frame in arp_frames(mac, ip):
            s.send(frame)


# --------------------------------------------------------------------------- the manager


@dataclass
class _Vip:
    spec: VipSpec
    iface: str
    state: VipState = field(default_factory=VipState)


class VipManager:
    """Holds each configured VIP while this node's instance of its group is ENABLED."""

    def __init__(self, node: Node, specs: Sequence[VipSpec]) -> None:
        self.node = node
        self.vips = [_Vip(s, s.interface or interface_of(node.cfg.listen.host)) for s in specs]
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def held(self) -> list[dict[str, str]]:
        """The VIPs this node holds now (for its status document)."""
        return [{"group": v.spec.group, "address": v.spec.ip} for v in self.vips if v.state.held]

    def kick(self) -> None:
        """Re-evaluate at once (an instance entered or left ENABLED)."""
        self._wake.set()

    def _lease_end(self, group: str) -> float | None:
        inst = self.node.by_group.get(group)
        if inst is None or inst.state != "ENABLED" or not inst.can_serve():
            return None
        cand = inst.candidate
        return None if cand is None else float(cand.lease_end())

    async def _apply(self, vip: _Vip, actions: list[str]) -> None:
        spec, iface = vip.spec, vip.iface
        for action in actions:
            try:
                if action == "add":
                    await asyncio.to_thread(add_address, spec, iface)
                    log.info("vip taken", extra={"node": self.node.name, "group": spec.group, "vip": spec.ip})
                elif action == "announce":
                    await asyncio.to_thread(send_gratuitous_arp, iface, spec.ip)
                else:
                    await asyncio.to_thread(remove_address, spec, iface)
                    log.info(
                        "vip dropped", extra={"node": self.node.name, "group": spec.group, "vip": spec.ip}
                    )
            except OSError as exc:
                log.error(
                    "vip action failed",
                    extra={
                        "node": self.node.name,
                        "group": spec.group,
                        "vip": spec.ip,
                        "action": action,
                        "error": str(exc),
                    },
                )

    async def evaluate(self) -> float:
        """One round over every VIP; returns the next deadline on the monotonic clock."""
        async with self._lock:
            now = self.node.clock.monotonic()
            nxt = float("inf")
            changed = False
            for vip in self.vips:
                lease_end = self._lease_end(vip.spec.group)
                actions = vip.state.step(now, lease_end)
                if actions:
                    changed = changed or actions != ["announce"]
                    await self._apply(vip, actions)
                nxt = min(nxt, vip.state.next_deadline(lease_end))
            if changed:
                self.node.gossip_soon()
            return nxt

    async def run(self) -> None:
        for vip in self.vips:  # a stale address from a previous life of this process
            with contextlib.suppress(OSError):
                if await asyncio.to_thread(holds, vip.spec, vip.iface):
                    await asyncio.to_thread(remove_address, vip.spec, vip.iface)
        while True:
            nxt = await self.evaluate()
            wait = max(0.0, min(TICK, nxt - self.node.clock.monotonic()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def release_all(self) -> None:
        """Drop every VIP for good (graceful stop: before the leases are released)."""
        async with self._lock:
            for vip in self.vips:
                vip.state.closed = True
                if vip.state.held:
                    await self._apply(vip, vip.state.step(self.node.clock.monotonic(), None))


# --------------------------------------------------------------------------- release (systemd)


def release(config_file: str) -> int:
    """Remove every VIP of `config_file` from this host (``ExecStopPost=`` after any exit)."""
    from euca_runtime.config import ConfigError, load_config

    try:
        cfg = load_config(config_file)
    except ConfigError as exc:
        print(f"vip release: {exc}", file=sys.stderr)
        return 2
    status = 0
    for spec in cfg.vips:
        try:
            iface = spec.interface or interface_of(cfg.listen.host)
            if remove_address(spec, iface):
                print(f"vip release: removed {spec.address} from {iface}")
        except OSError as exc:
            print(f"vip release: {spec.address}: {exc}", file=sys.stderr)
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m euca_runtime.vip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("release", help="remove this host's VIPs (after the runtime exited)")
    p.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    return release(args.config)


if __name__ == "__main__":
    raise SystemExit(main())
