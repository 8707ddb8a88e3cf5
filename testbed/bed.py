"""Bringing a bed up and down, and the fault verbs. This is the part that needs root.

Each verb loads the bed's state under an exclusive lock, acts, saves, and records an event
(a JSON line with wall and monotonic timestamps) in `<state>/events.jsonl`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from testbed import commands, impair
from testbed.model import (
    STATE_ROOT,
    Bed,
    Fault,
    Host,
    TestbedError,
    check_bed_name,
    check_host_count,
    new_bed,
)

BOOT_TIMEOUT = 120.0
REQUIRED_TOOLS = {
    "systemd-nspawn": "systemd-container",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ip": "iproute2",
    "tc": "iproute2",
    "nft": "nftables",
    "nsenter": "util-linux",
}


# --------------------------------------------------------------------------- helpers


def run(argv: list[str], check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise TestbedError(f"{' '.join(argv[:4])}...: {msg[-1] if msg else f'exit {proc.returncode}'}")
    return proc


def preflight() -> None:
    if os.geteuid() != 0:
        raise TestbedError("testbed needs root (containers, mounts and bridges): run it as root or with sudo")
    for tool, package in REQUIRED_TOOLS.items():
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise TestbedError(f"{tool} not found: run `make deps` (or apt-get install {package})")
    _raise_inotify_limit()


INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
MIN_INOTIFY_INSTANCES = 1024
"""Every host's systemd, journald and udev take inotify instances from root's one limit (the
hosts run as root in the machine's user namespace); Debian's default of 128 is gone after a
few hosts, and the next one hangs at boot with "Too many open files"."""


def _raise_inotify_limit() -> None:
    try:
        current = int(INOTIFY_INSTANCES.read_text())
    except (OSError, ValueError):
        return  # not Linux procfs as we know it: nothing to adjust
    if current < MIN_INOTIFY_INSTANCES:
        INOTIFY_INSTANCES.write_text(f"{MIN_INOTIFY_INSTANCES}\n")
        limit = "fs.inotify.max_user_instances"
        print(f"testbed: raised {limit} from {current} to {MIN_INOTIFY_INSTANCES}", file=sys.stderr)


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is not a running host.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(what: str, predicate: Any, timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TestbedError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


# --------------------------------------------------------------------------- state


def state_file(name: str) -> Path:
    return STATE_ROOT / name / "state.json"


def list_beds() -> list[Bed]:
    if not STATE_ROOT.exists():
        return []
    return [Bed.from_json(p.read_text()) for p in sorted(STATE_ROOT.glob("*/state.json"))]


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    path = STATE_ROOT / f".{name}.lock"
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if not (STATE_ROOT / name).exists():
                path.unlink(missing_ok=True)  # no bed by that name: leave no trace


def load(name: str) -> Bed:
    check_bed_name(name)
    path = state_file(name)
    if not path.exists():
        raise TestbedError(f"no testbed named {name!r} is up (see `python -m testbed status`)")
    return Bed.from_json(path.read_text())


def save(bed: Bed) -> None:
    write(state_file(bed.name), bed.to_json())


def record(bed: Bed, verb: str, **args: Any) -> None:
    event = {"ts": time.time(), "mono": time.monotonic(), "bed": bed.name, "verb": verb, "args": args}
    with open(bed.dir / "events.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")


# --------------------------------------------------------------------------- up / down


def up(name: str, count: int, timeout: float = BOOT_TIMEOUT, binds: Sequence[str | Path] = ()) -> Bed:
    """Boot a bed of `count` hosts. `binds`: controller directories every host sees read-only at
    the same path (a checkout and its venv, say, when they live under /tmp: a host's /tmp is its
    own tmpfs)."""
    preflight()
    check_bed_name(name)
    check_host_count(count)
    resolved = [str(Path(b).resolve()) for b in binds]
    for path in resolved:
        if not Path(path).is_dir():
            raise TestbedError(f"bind {path}: not a directory on the controller")
    with locked(name):
        if state_file(name).exists():
            raise TestbedError(f"a testbed named {name!r} is already up: pick another --name or `down` it")
        used = {b.index for b in list_beds()}
        bed = new_bed(name, count, used)
        bed.binds = resolved
        bed.dir.mkdir(parents=True, exist_ok=True)
        save(bed)  # first, so that `down` finds whatever a failed up leaves
        try:
            _up(bed, timeout)
        except BaseException:
            _remove(name)
            raise
        record(bed, "up", hosts=[h.name for h in bed.hosts])
        return bed


def _up(bed: Bed, timeout: float) -> None:
    key = bed.dir / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"testbed-{bed.name}", "-f", str(key)])
    _make_bridge(bed)
    _make_upstream(bed)
    pubkeys: dict[str, str] = {}
    for host in bed.hosts:
        pubkeys[host.name] = _prepare_host(bed, host, key)
    known = bed.dir / "known_hosts"
    write(known, commands.known_hosts(bed, pubkeys))
    write(bed.dir / "ssh_config", commands.ssh_config(bed, key, known))
    write(bed.dir / "inventory.yml", commands.inventory_yaml(bed, key, known))
    for host in bed.hosts:
        _boot(bed, host)
    save(bed)
    apply_network(bed)
    for host in bed.hosts:
        _wait_ready(bed, host, timeout)


def _make_bridge(bed: Bed) -> None:
    run(["ip", "link", "add", bed.bridge, "type", "bridge"])
    run(["ip", "addr", "add", f"{bed.controller_address}/{bed.subnet.prefixlen}", "dev", bed.bridge])
    run(["ip", "link", "set", bed.bridge, "up"])


def _make_upstream(bed: Bed) -> None:
    """A bare network namespace on the bridge that stands for the users (it answers ping)."""
    ns, veth = bed.upstream_netns, bed.upstream_veth
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    run(["ip", "link", "set", veth, "master", bed.bridge, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{bed.upstream_address}/{bed.subnet.prefixlen}", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])


def host_dir(bed: Bed, host: Host) -> Path:
    return bed.dir / "hosts" / host.name


def _prepare_host(bed: Bed, host: Host, key: Path) -> str:
    """Mount the host's overlay and write its identity into the upper layer. Returns its host key."""
    hdir = host_dir(bed, host)
    upper, work, root = hdir / "upper", hdir / "work", hdir / "root"
    for d in (upper, work, root):
        d.mkdir(parents=True, exist_ok=True)
    run(commands.overlay_mount("/", upper, work, root))
    write(root / "etc/hostname", host.name + "\n")
    write(root / "etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
    write(root / "etc/hosts", commands.hosts_file(bed))
    write(root / "etc/fstab", "# testbed host: nothing to mount\n")
    write(root / "etc/systemd/network/10-host0.network", commands.network_file(bed, host))
    write(root / "etc/systemd/system-preset/00-testbed.preset", commands.PRESET)
    run(["systemctl", f"--root={root}", "preset-all"])
    write(root / "etc/ssh/sshd_config.d/00-testbed.conf", commands.SSHD_DROPIN)
    hostkey = root / "etc/ssh/testbed_host_ed25519_key"
    hostkey.unlink(missing_ok=True)
    hostkey.with_suffix(".pub").unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", str(hostkey)])
    sshdir = root / "root/.ssh"
    sshdir.mkdir(parents=True, exist_ok=True)
    os.chmod(sshdir, 0o700)
    write(sshdir / "authorized_keys", Path(f"{key}.pub").read_text(), 0o600)
    # root's shell starts clean on a host: the build machine's own ~/.bashrc and ~/.profile (a
    # pyenv init, say, whose `pyenv rehash` lock, left behind by a machine kill, made every later
    # `bash -c` over SSH wait 60 s) belong to the controller, not to a fresh Debian host.
    write(root / "root/.bashrc", commands.ROOT_BASHRC)
    write(root / "root/.profile", commands.ROOT_PROFILE)
    keytype, keydata = hostkey.with_suffix(".pub").read_text().split()[:2]
    return f"{keytype} {keydata}"


def _boot(bed: Bed, host: Host) -> None:
    hdir = host_dir(bed, host)
    log = open(hdir / "console.log", "ab")
    proc = subprocess.Popen(
        commands.nspawn(bed, host, hdir / "root"),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd="/",
    )
    log.close()

    def leader_found() -> bool:
        if proc.poll() is not None:
            tail = (hdir / "console.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise TestbedError(f"host {host.name}: systemd-nspawn exited: {' | '.join(tail)}")
        # nspawn forks a short-lived "outer" child first; the container's init is the child
        # that lives in a pid namespace of its own.
        own_ns = os.readlink("/proc/self/ns/pid")
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{child}/ns/pid") != own_ns:
                    host.leader = int(child)
        return host.leader is not None

    host.leader = None
    host.nspawn = proc.pid
    host.paused = []
    wait_until(f"host {host.name} to start", leader_found, 20, 0.05)


def ssh(bed: Bed, host: Host, *argv: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    cmd = ["ssh", "-F", str(bed.dir / "ssh_config"), "-o", "BatchMode=yes", host.name, *argv]
    try:
        return subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 255, "", "timeout")


def _wait_ready(bed: Bed, host: Host, timeout: float) -> None:
    def ready() -> bool:
        if not alive(host.leader):
            raise TestbedError(f"host {host.name} died while booting (see {host_dir(bed, host)}/console.log)")
        out = ssh(bed, host, "systemctl", "is-system-running", timeout=5).stdout.strip()
        return out in ("running", "degraded")

    wait_until(f"host {host.name} to answer SSH with systemd running", ready, timeout, 0.3)


def down(name: str) -> bool:
    """Remove everything bed `name` made. Returns False when there was nothing to remove."""
    check_bed_name(name)
    if os.geteuid() != 0:
        raise TestbedError("testbed needs root (containers, mounts and bridges): run it as root or with sudo")
    with locked(name):
        return _remove(name)


def _remove(name: str) -> bool:
    path = state_file(name)
    bed = Bed.from_json(path.read_text()) if path.exists() else None
    found = _down(bed) if bed else False
    found = _sweep(name) or found
    found = bool(impair.kill_all(STATE_ROOT / name)) or found  # also when state.json was lost
    shutil.rmtree(STATE_ROOT / name, ignore_errors=True)
    return found


def _down(bed: Bed) -> bool:
    for host in bed.hosts:
        _kill(host)
    impair.kill_all(bed.dir)
    run(["nft", "delete", "table", "bridge", bed.nft_table], check=False)
    return True


def _kill(host: Host) -> None:
    if alive(host.leader):
        assert host.leader is not None
        os.kill(host.leader, signal.SIGKILL)  # the pid namespace dies with its init
        wait_until(f"host {host.name} to die", lambda: not alive(host.leader), 20, 0.05)
    if host.nspawn and alive(host.nspawn):
        wait_until(f"systemd-nspawn of {host.name} to exit", lambda: not alive(host.nspawn), 20, 0.05)
    if host.nspawn:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(host.nspawn, 0)  # reap it when it is our child (a test's, or `up` in-process)
    host.leader = None
    host.nspawn = None
    host.paused = []


def _sweep(name: str) -> bool:
    """Find and remove by name whatever is left: containers, mounts, links, namespaces."""
    found = False
    marker = f"--machine={name}-h"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"systemd-nspawn") and any(a.decode().startswith(marker) for a in argv):
            found = True
            pid = int(proc.name)
            children = Path(f"/proc/{pid}/task/{pid}/children")
            with contextlib.suppress(OSError, ProcessLookupError):
                for child in children.read_text().split():
                    os.kill(int(child), signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            wait_until(f"container process {pid} to exit", lambda pid=pid: not alive(pid), 20, 0.05)
    prefix = str(STATE_ROOT / name) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        found = True
        if run(["umount", target], check=False).returncode != 0:
            run(["umount", "-l", target], check=False)
    links = json.loads(run(["ip", "-j", "link", "show"]).stdout or "[]")
    for link in links:
        ifname = link.get("ifname", "")
        if ifname in (f"eucatb-{name}", f"tu-{name}") or ifname.startswith(f"vb-{name}-h"):
            found = True
            run(["ip", "link", "del", ifname], check=False)
    if run(["ip", "netns", "list"]).stdout.find(f"eucatb-{name}-up") >= 0:
        found = True
        run(["ip", "netns", "del", f"eucatb-{name}-up"], check=False)
    if run(["nft", "list", "table", "bridge", f"eucatb_{name}"], check=False).returncode == 0:
        found = True
        run(["nft", "delete", "table", "bridge", f"eucatb_{name}"], check=False)
    return found


# --------------------------------------------------------------------------- faults


@contextlib.contextmanager
def mutate(name: str) -> Iterator[Bed]:
    preflight()
    with locked(name):
        bed = load(name)
        yield bed
        save(bed)


def kill(name: str, host_name: str) -> None:
    """Machine failure: the container's init is SIGKILLed, every process in it dies at once."""
    with mutate(name) as bed:
        host = bed.host(host_name)
        if not alive(host.leader):
            raise TestbedError(f"host {host_name} is not running (start it with `start {host_name}`)")
        _kill(host)
        impair.clear(bed.dir, host_name, None)
        record(bed, "kill", host=host_name)


def start(name: str, host_name: str, timeout: float = BOOT_TIMEOUT) -> None:
    with mutate(name) as bed:
        host = bed.host(host_name)
        if alive(host.leader):
            raise TestbedError(f"host {host_name} is already running")
        _boot(bed, host)
        save(bed)
        apply_network(bed)
        _wait_ready(bed, host, timeout)
        record(bed, "start", host=host_name)


def processes_in_host(leader: int) -> list[Path]:
    """The /proc entries of every process in the pid namespace of `leader` (a host's init)."""
    ns = os.readlink(f"/proc/{leader}/ns/pid")
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(proc / "ns/pid") == ns:
                found.append(proc)
    return found


def _pids_in_host(host: Host, pattern: str) -> list[int]:
    """Pids (as seen from here) of processes in the host's pid namespace whose cmdline matches."""
    if not alive(host.leader):
        raise TestbedError(f"host {host.name} is not running")
    assert host.leader is not None
    rx = re.compile(pattern)
    pids = []
    for proc in processes_in_host(host.leader):
        if int(proc.name) == host.leader:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmdline and rx.search(cmdline):
            pids.append(int(proc.name))
    return sorted(pids)


def pause(name: str, host_name: str, pattern: str) -> list[int]:
    """SIGSTOP every process of the host whose command line matches the regex `pattern`."""
    with mutate(name) as bed:
        host = bed.host(host_name)
        pids = _pids_in_host(host, pattern)
        if not pids:
            raise TestbedError(f"no process on {host_name} matches {pattern!r}")
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        host.paused = sorted(set(host.paused) | set(pids))
        record(bed, "pause", host=host_name, pattern=pattern, pids=pids)
        return pids


def resume(name: str, host_name: str) -> list[int]:
    with mutate(name) as bed:
        host = bed.host(host_name)
        resumed = []
        for pid in host.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                resumed.append(pid)
        host.paused = []
        record(bed, "resume", host=host_name, pids=resumed)
        return resumed


def _check_names(bed: Bed, names: list[str]) -> None:
    for n in names:
        if n != "upstream":
            bed.host(n)


def partition(name: str, a: list[str], b: list[str]) -> None:
    with mutate(name) as bed:
        _check_names(bed, a + b)
        if set(a) & set(b):
            raise TestbedError(f"a host cannot be on both sides of a partition: {sorted(set(a) & set(b))}")
        bed.faults.append(Fault("partition", {"a": a, "b": b}))
        apply_network(bed)
        record(bed, "partition", a=a, b=b)


def isolate(name: str, host_name: str) -> None:
    with mutate(name) as bed:
        bed.host(host_name)
        bed.faults.append(Fault("isolate", {"host": host_name}))
        apply_network(bed)
        record(bed, "isolate", host=host_name)


def degrade(name: str, host_name: str, delay_ms: float, loss_pct: float) -> None:
    if delay_ms < 0 or not 0 <= loss_pct <= 100:
        raise TestbedError("degrade: --delay must be >= 0 ms and --loss between 0 and 100 percent")
    with mutate(name) as bed:
        bed.host(host_name)
        bed.faults = [f for f in bed.faults if not (f.kind == "degrade" and f.args["host"] == host_name)]
        bed.faults.append(Fault("degrade", {"host": host_name, "delay_ms": delay_ms, "loss_pct": loss_pct}))
        apply_network(bed)
        record(bed, "degrade", host=host_name, delay_ms=delay_ms, loss_pct=loss_pct)


def cut_upstream(name: str, host_name: str) -> None:
    with mutate(name) as bed:
        bed.host(host_name)
        bed.faults.append(Fault("cut-upstream", {"host": host_name}))
        apply_network(bed)
        record(bed, "cut-upstream", host=host_name)


def restore_upstream(name: str, host_name: str) -> None:
    with mutate(name) as bed:
        bed.host(host_name)
        bed.faults = [f for f in bed.faults if not (f.kind == "cut-upstream" and f.args["host"] == host_name)]
        apply_network(bed)
        record(bed, "restore-upstream", host=host_name)


def heal(name: str) -> None:
    """Remove every network fault: partitions, isolations, degraded links and upstream cuts."""
    with mutate(name) as bed:
        healed = [f.kind for f in bed.faults]
        bed.faults = []
        apply_network(bed)
        record(bed, "heal", faults=healed)


def apply_network(bed: Bed) -> None:
    """Make the kernel's filters and link impairments match bed.faults exactly."""
    run(["nft", "-f", "-"], input=commands.nft_ruleset(bed))
    degraded = {f.args["host"]: f.args for f in bed.faults if f.kind == "degrade"}
    for host in bed.hosts:
        if not alive(host.leader):
            impair.clear(bed.dir, host.name, None)  # stop a dead host's delayer, forget it
            continue
        assert host.leader is not None
        # Delay/loss on what the host sends (host0 egress): netem, or the NFQUEUE delayer.
        spec = degraded.get(host.name)
        if spec is None:
            impair.clear(bed.dir, host.name, host.leader)
        else:
            impair.apply(bed.dir, host.name, host.leader, spec["delay_ms"], spec["loss_pct"])


def status(name: str | None = None) -> list[dict[str, Any]]:
    beds = [load(name)] if name else list_beds()
    out = []
    for bed in beds:
        out.append(
            {
                "name": bed.name,
                "subnet": str(bed.subnet),
                "bridge": bed.bridge,
                "upstream": bed.upstream_address,
                "inventory": str(bed.dir / "inventory.yml"),
                "ssh_config": str(bed.dir / "ssh_config"),
                "hosts": [
                    {
                        "name": h.name,
                        "address": h.address,
                        "state": ("paused" if h.paused else "running") if alive(h.leader) else "stopped",
                        "paused_pids": h.paused,
                    }
                    for h in bed.hosts
                ],
                "faults": [{"kind": f.kind, **f.args} for f in bed.faults],
            }
        )
    return out
