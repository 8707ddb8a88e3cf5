"""Filters of the euca_preflight role: the checks of `euca_vips` that need address arithmetic."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any


def _host_address(value: Any) -> ipaddress.IPv4Address | None:
    """The host's address as an IPv4 address (None: a DNS name or something else)."""
    try:
        return ipaddress.IPv4Address(str(value))
    except ValueError:
        return None


def euca_vip_problems(
    vips: Any,
    host_groups: Mapping[str, str],
    groups: Mapping[str, list[str]],
    addresses: Mapping[str, Any],
) -> list[str]:
    """Every problem of `euca_vips`, each a message naming the service (and host) and the variable.

    `host_groups` maps a service (s3, iam, ...) to the inventory group whose hosts hold its VIP;
    `addresses` maps every host to its address (euca_address or ansible_host).
    """
    if vips is None or vips == "":
        return []
    if not isinstance(vips, Mapping):
        return [
            "euca_vips: must be a mapping of service to address/prefix, e.g. {s3: 10.0.0.100/24}, "
            f"got {vips!r}"
        ]
    problems: list[str] = []
    seen: dict[str, str] = {}
    host_ips = {h: ip for h, a in addresses.items() if (ip := _host_address(a)) is not None}
    for service in sorted(vips, key=str):
        raw = vips[service]
        where = f"euca_vips.{service}"
        group = host_groups.get(str(service))
        if group is None:
            known = ", ".join(sorted(host_groups))
            problems.append(f"{where}: unknown service {service!r} (known: {known})")
            continue
        hosts = list(groups.get(group) or [])
        if not hosts:
            problems.append(
                f"{where}: the service's group {group} has no host, so nothing would hold {raw!r}"
            )
        if not isinstance(raw, str) or "/" not in raw:
            problems.append(f"{where}: must be an IPv4 address with a prefix length (A.B.C.D/N), got {raw!r}")
            continue
        try:
            vip = ipaddress.IPv4Interface(raw)
        except ValueError:
            problems.append(f"{where}: not an IPv4 address/prefix, got {raw!r}")
            continue
        if vip.network.prefixlen < 32 and vip.ip in (
            vip.network.network_address,
            vip.network.broadcast_address,
        ):
            problems.append(f"{where}: {vip.ip} is the network or broadcast address of {vip.network}")
        ip = str(vip.ip)
        if ip in seen:
            problems.append(
                f"{where}: {ip} is also the VIP of euca_vips.{seen[ip]}; each service needs its own"
            )
        else:
            seen[ip] = str(service)
        for host, host_ip in sorted(host_ips.items()):
            if host_ip == vip.ip:
                problems.append(
                    f"{host}: its address {host_ip} (euca_address/ansible_host) is {where}; "
                    "a VIP must be a free address"
                )
        for host in hosts:
            host_ip = host_ips.get(host)
            if host_ip is not None and host_ip not in vip.network:
                problems.append(
                    f"{host}: its address {host_ip} (euca_address/ansible_host) is outside {where} = {raw} "
                    f"({vip.network}); the host could not announce the VIP on its subnet"
                )
    return problems


class FilterModule:
    """euca_preflight filters."""

    def filters(self) -> dict[str, Any]:
        return {"euca_vip_problems": euca_vip_problems}
