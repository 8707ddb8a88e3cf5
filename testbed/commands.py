"""Pure builders for what the testbed runs and writes: argv lists and file contents.

Kept free of I/O so unit tests can check them without root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from testbed.model import Bed, Fault, Host

PRESET = """\
# euca-ha testbed: a host starts clean; the Ansible roles decide what else runs.
enable ssh.service
enable systemd-networkd.service
enable systemd-journald.service
disable *
"""

SSHD_DROPIN = """\
# euca-ha testbed: one host key of this host's own, key-only root login.
HostKey /etc/ssh/testbed_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
# No PAM: a command over SSH then opens no logind session and starts no user@0.service or
# motd scripts. With them, full test runs saw a host's SSH logins hang (8-20 s timeouts,
# exit 255) while its services answered over TCP; key-only root logins need none of it.
UsePAM no
"""


def overlay_mount(lower: str, upper: Path, work: Path, target: Path) -> list[str]:
    return [
        "mount",
        "-t",
        "overlay",
        "overlay",
        "-o",
        f"lowerdir={lower},upperdir={upper},workdir={work}",
        str(target),
    ]


def nspawn(bed: Bed, host: Host, root: Path) -> list[str]:
    """argv of the container. --keep-unit/--register=no: no host systemd or machined needed."""
    return [
        "systemd-nspawn",
        "--boot",
        f"--directory={root}",
        f"--machine={host.machine}",
        f"--hostname={host.name}",
        f"--network-bridge={bed.bridge}",
        "--register=no",
        "--keep-unit",
        "--console=read-only",
        "--resolv-conf=off",
        "--timezone=off",
        *(f"--bind-ro={path}" for path in bed.binds),
    ]


def network_file(bed: Bed, host: Host) -> str:
    return (
        "[Match]\nName=host0\n\n"
        f"[Network]\nAddress={host.address}/{bed.subnet.prefixlen}\n"
        "LinkLocalAddressing=no\nIPv6AcceptRA=no\n"
    )


def hosts_file(bed: Bed) -> str:
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    lines.append(f"{bed.controller_address} controller")
    lines.append(f"{bed.upstream_address} upstream")
    lines += [f"{h.address} {h.name}" for h in bed.hosts]
    return "\n".join(lines) + "\n"


def ssh_config(bed: Bed, key: Path, known_hosts: Path) -> str:
    out = []
    for h in bed.hosts:
        out.append(
            f"Host {h.name} {h.address}\n"
            f"  HostName {h.address}\n"
            "  User root\n"
            f"  IdentityFile {key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {known_hosts}\n"
            "  StrictHostKeyChecking yes\n"
            "  ConnectTimeout 3\n"
        )
    return "\n".join(out)


def known_hosts(bed: Bed, host_pubkeys: dict[str, str]) -> str:
    """One line per host: its name and address, then the public host key it was given."""
    return "".join(f"{h.name},{h.address} {host_pubkeys[h.name].strip()}\n" for h in bed.hosts)


def inventory(bed: Bed, key: Path, known_hosts_path: Path) -> dict[str, Any]:
    """An Ansible YAML inventory: every host in `testbed`, connection settings in its vars."""
    return {
        "all": {
            "vars": {
                "ansible_user": "root",
                "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_ssh_private_key_file": str(key),
                "ansible_ssh_common_args": (
                    f"-o UserKnownHostsFile={known_hosts_path} -o StrictHostKeyChecking=yes "
                    "-o IdentitiesOnly=yes"
                ),
                "testbed_name": bed.name,
                "testbed_upstream_address": bed.upstream_address,
                "testbed_controller_address": bed.controller_address,
            },
            "children": {
                "testbed": {"hosts": {h.name: {"ansible_host": h.address} for h in bed.hosts}},
            },
        }
    }


def inventory_yaml(bed: Bed, key: Path, known_hosts_path: Path) -> str:
    return "# Written by `python -m testbed up`; rewritten on every up.\n" + yaml.safe_dump(
        inventory(bed, key, known_hosts_path), sort_keys=False
    )


def nft_ruleset(bed: Bed) -> str:
    """The whole fault table of a bed, replaced atomically on every change.

    Rules sit on the bridge's forward hook, so they cut traffic *between* hosts (and between
    a host and the upstream namespace) but never the controller's own management traffic.
    """
    rules: list[str] = []
    for fault in bed.faults:
        rules += _fault_rules(bed, fault)
    body = "".join(f"    {r}\n" for r in rules)
    return (
        f"add table bridge {bed.nft_table}\n"
        f"delete table bridge {bed.nft_table}\n"
        f"table bridge {bed.nft_table} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        f"{body}"
        "  }\n"
        "}\n"
    )


def _addresses(bed: Bed, names: list[str]) -> list[str]:
    return [bed.upstream_address if n == "upstream" else bed.host(n).address for n in names]


def _fault_rules(bed: Bed, fault: Fault) -> list[str]:
    if fault.kind == "partition":
        a = _addresses(bed, fault.args["a"])
        b = _addresses(bed, fault.args["b"])
        sa, sb = "{ " + ", ".join(a) + " }", "{ " + ", ".join(b) + " }"
        return [
            f"ip saddr {sa} ip daddr {sb} drop",
            f"ip saddr {sb} ip daddr {sa} drop",
            # ARP too, so a cut looks like a dead link rather than an ICMP-rejecting one.
            f"arp saddr ip {sa} arp daddr ip {sb} drop",
            f"arp saddr ip {sb} arp daddr ip {sa} drop",
        ]
    if fault.kind == "isolate":
        veth = bed.host(fault.args["host"]).veth
        return [f'iifname "{veth}" drop', f'oifname "{veth}" drop']
    if fault.kind == "cut-upstream":
        return _fault_rules(bed, Fault("partition", {"a": [fault.args["host"]], "b": ["upstream"]}))
    return []  # degrade is tc netem, not nftables


def netem(dev: str, delay_ms: float, loss_pct: float) -> list[str]:
    args = ["tc", "qdisc", "replace", "dev", dev, "root", "netem"]
    if delay_ms:
        args += ["delay", f"{delay_ms}ms"]
    if loss_pct:
        args += ["loss", f"{loss_pct}%"]
    return args


def in_netns(pid: int, argv: list[str]) -> list[str]:
    """Run argv inside the network namespace of process `pid` (a container's init)."""
    return ["nsenter", "-t", str(pid), "-n", "--", *argv]


ROOT_BASHRC = """# testbed host: root's shell starts clean (the build machine's ~/.bashrc is not used here)
"""
ROOT_PROFILE = """# testbed host: root's login shell, as on a fresh Debian host
if [ "$BASH" ] && [ -f ~/.bashrc ]; then
  . ~/.bashrc
fi
"""
