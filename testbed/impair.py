"""Link impairment (delay and loss) on a host's egress, with or without sch_netem.

`apply` makes what a host sends out of `host0` (inside its network namespace, entered through
the pid of its init, the "leader") late by `delay_ms` and lost with probability `loss_pct`;
`clear` undoes it. Two ways, picked by `netem_available()`:

* netem: `tc qdisc replace dev host0 root netem delay ... loss ...` in the namespace.
* delayer, on kernels built without CONFIG_NET_SCH_NETEM: an iptables chain in the namespace
  sends every packet leaving host0 (OUTPUT and FORWARD) to an NFQUEUE with --queue-bypass,
  and `python -m testbed.delayer`, run inside the namespace, holds each one for the delay or
  drops it (see testbed/delayer.py; TCP segments are resent from a raw socket, marked, and
  the chain lets marked packets by). The bypass flag means a dead delayer lets traffic
  through undelayed, never blackholes it; the delayer also exits by itself when the leader
  does, so it cannot keep a dead container's namespace alive.

What was done is recorded in `<state_dir>/impair/<host>.json` (the delayer's pid, queue and
rules), so `apply` is idempotent, `clear` needs no more than the host's name, and `kill_all`
finds every delayer of a state dir, by those files and by command line.

EUCA_TESTBED_IMPAIR=netem|delayer|auto (default auto) forces one way, e.g. to test the delayer
on a kernel that has netem.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.commands import in_netns, netem
from testbed.delayer import DEFAULT_MARK, NFQNL_COPY_PACKET
from testbed.model import TestbedError

DEV = "host0"
CHAIN = "EUCA-IMPAIR"
HOOKS = ("OUTPUT", "FORWARD")
# Two queue numbers, used in turn, so new settings can be served by a fresh delayer before
# the rule is pointed at it: no moment without impairment when the numbers change.
QUEUES = (4231, 4232)
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 3.0
KILL_TIMEOUT = 5.0
MODE_ENV = "EUCA_TESTBED_IMPAIR"
# iptables front ends, best first. The legacy (xtables) tables come first because they live
# apart from nftables: a host's own `flush ruleset` (Debian's /etc/nftables.conf starts with
# one) cannot remove the queue rule then. The nft one needs NFT_COMPAT for the xt NFQUEUE
# target (the nft `queue` statement needs CONFIG_NFT_QUEUE, which kernels may lack).
IPTABLES = (("iptables-legacy", "ip6tables-legacy"), ("iptables", "ip6tables"))
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# Delayers this process started, so that it reaps them (no zombie, no ResourceWarning).
_children: dict[int, subprocess.Popen[bytes]] = {}


# --------------------------------------------------------------------------- probes


def netem_from_config(text: str) -> bool | None:
    """What a kernel config says about sch_netem: True (built in), False (absent), or None
    (a module: it may or may not be installed, so only trying tells)."""
    for line in text.splitlines():
        line = line.strip()
        if line == "CONFIG_NET_SCH_NETEM=y":
            return True
        if line == "CONFIG_NET_SCH_NETEM=m":
            return None
    return False


def _kernel_config() -> str | None:
    with contextlib.suppress(OSError):
        with gzip.open("/proc/config.gz", "rt") as f:
            return f.read()
    with contextlib.suppress(OSError):
        return Path(f"/boot/config-{platform.release()}").read_text()
    return None


def _in_throwaway_netns(argv: list[str]) -> bool:
    """Run argv in a network namespace of its own that vanishes with it; True on success.
    Its only interface is that namespace's own loopback: no real interface is touched."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None or shutil.which(argv[0]) is None:
        return False
    proc = subprocess.run([unshare, "--net", "--", *argv], capture_output=True, check=False, timeout=30)
    return proc.returncode == 0


@functools.cache
def netem_available() -> bool:
    """Whether `tc qdisc ... netem` works here. Probed once per process."""
    config = _kernel_config()
    verdict = netem_from_config(config) if config is not None else None
    if verdict is not None:
        return verdict
    return _in_throwaway_netns(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])


@functools.cache
def iptables_backend() -> tuple[str, str]:
    """(iptables, ip6tables) commands whose NFQUEUE target works here. Probed once."""
    for v4, v6 in IPTABLES:
        probe = [v4, "-w", "-A", "OUTPUT", "-o", "lo", "-j", "NFQUEUE", "--queue-num", "1", "--queue-bypass"]
        if _in_throwaway_netns(probe):
            return v4, v6
    raise TestbedError(
        "link impairment needs netem or the iptables NFQUEUE target, and this kernel has neither "
        "(CONFIG_NET_SCH_NETEM, CONFIG_NETFILTER_XT_TARGET_NFQUEUE): apt-get install iptables?"
    )


def mode() -> str:
    """'netem' or 'delayer': EUCA_TESTBED_IMPAIR when set, else netem if the kernel has it."""
    forced = os.environ.get(MODE_ENV, "auto")
    if forced in ("netem", "delayer"):
        return forced
    if forced != "auto":
        raise TestbedError(f"{MODE_ENV}={forced!r}: use netem, delayer or auto")
    return "netem" if netem_available() else "delayer"


# --------------------------------------------------------------------------- pure builders


def install_argvs(ipt: str, queue: int, mark: int = DEFAULT_MARK) -> list[list[str]]:
    """Create the chain that queues everything sent to it but the delayer's own copies."""
    return [
        [ipt, "-w", "-N", CHAIN],
        [ipt, "-w", "-A", CHAIN, "-m", "mark", "--mark", f"{mark:#x}", "-j", "RETURN"],
        [ipt, "-w", "-A", CHAIN, "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"],
    ]


def retarget_argv(ipt: str, queue: int) -> list[str]:
    """Point the chain's queue rule (its second) at another queue: an atomic rule replace."""
    return [ipt, "-w", "-R", CHAIN, "2", "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]


def jump_spec(hook: str, dev: str) -> list[str]:
    """The rule, without its verb, that sends what leaves `dev` through `hook` to the chain."""
    return [hook, "-o", dev, "-j", CHAIN]


def jumps_in(listing: str) -> list[list[str]]:
    """Rule specs (as for -D) of the jumps to CHAIN in `iptables -S HOOK` output."""
    out = []
    for line in listing.splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "-A" and words[-2:] == ["-j", CHAIN]:
            out.append(words[1:])
    return out


def delayer_argv(
    queue: int, delay_ms: float, loss_pct: float, leader: int, tag: str, mark: int = DEFAULT_MARK
) -> list[str]:
    """The delayer's own command line (to be run inside the namespace)."""
    return [
        sys.executable,
        "-m",
        "testbed.delayer",
        "--queue",
        str(queue),
        "--delay",
        f"{delay_ms:g}",
        "--loss",
        f"{loss_pct:g}",
        "--leader",
        str(leader),
        "--mark",
        f"{mark:#x}",
        "--tag",
        tag,
    ]


def parse_queue_table(text: str) -> dict[int, dict[str, int]]:
    """/proc/net/netfilter/nfnetlink_queue, by queue number: who listens, how it copies, and
    what was dropped."""
    names = ("portid", "waiting", "copy_mode", "copy_range", "queue_dropped", "user_dropped", "id_sequence")
    table = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 8 and all(w.isdigit() for w in words[:8]):
            table[int(words[0])] = dict(zip(names, map(int, words[1:8]), strict=True))
    return table


def command_tag(argv: list[str]) -> str | None:
    """The --tag of a delayer command line (nsenter's or python's), else None."""
    if "testbed.delayer" not in argv:
        return None
    with contextlib.suppress(ValueError, IndexError):
        return argv[argv.index("--tag") + 1]
    return None


# --------------------------------------------------------------------------- processes


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise TestbedError(f"{' '.join(argv[-6:])}: {msg[-1] if msg else f'exit {proc.returncode}'}")
    return proc


def _alive(pid: int | None) -> bool:
    """Running (a zombie is not)."""
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _reap(pid: int) -> None:
    """Collect the exit status when the delayer is our own child (no zombie left behind)."""
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        _reap(pid)
        if not _alive(pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def delayers(prefix: str) -> dict[int, str]:
    """Running delayers whose --tag starts with `prefix`, by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        tag = command_tag(_cmdline(int(entry.name)))
        if tag is not None and tag.startswith(prefix) and _alive(int(entry.name)):
            found[int(entry.name)] = tag
    return found


def _stop(pid: int, tag: str) -> None:
    """SIGTERM, then SIGKILL, the delayer `pid` if it still is the one tagged `tag`."""
    if command_tag(_cmdline(pid)) != tag:
        _reap(pid)
        return  # gone, or the pid now belongs to something else
    for sig, timeout in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, KILL_TIMEOUT)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_gone(pid, timeout):
            return
    raise TestbedError(f"delayer {pid} ({tag}) did not die on SIGKILL")


# --------------------------------------------------------------------------- state


def _dir(state_dir: Path) -> Path:
    return state_dir.resolve() / "impair"


def _state_path(state_dir: Path, host_name: str) -> Path:
    return _dir(state_dir) / f"{host_name}.json"


def _load(state_dir: Path, host_name: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(_state_path(state_dir, host_name).read_text()))
    except (OSError, ValueError):
        return None


def _save(state_dir: Path, host_name: str, info: dict[str, Any]) -> None:
    path = _state_path(state_dir, host_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- the namespace side


def _netns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _start_delayer(
    state_dir: Path, host_name: str, leader: int, queue: int, delay_ms: float, loss_pct: float
) -> int:
    """Start a delayer in the leader's namespace and wait until it serves `queue`. Its pid."""
    tag = str(_state_path(state_dir, host_name))
    log_path = _dir(state_dir) / f"{host_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            in_netns(leader, delayer_argv(queue, delay_ms, loss_pct, leader, tag)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",
            env=env,
        )
    _children[proc.pid] = proc
    target = _netns(leader)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            _children.pop(proc.pid, None)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-2:]
            raise TestbedError(f"delayer for {host_name} exited {proc.returncode}: {' | '.join(tail)}")
        # nsenter execs the delayer in place: same pid, and /proc/<pid>/net is its namespace's.
        if target is not None and _netns(proc.pid) == target:
            with contextlib.suppress(OSError):
                table = parse_queue_table(Path(f"/proc/{proc.pid}/net/netfilter/nfnetlink_queue").read_text())
                if table.get(queue, {}).get("copy_mode") == NFQNL_COPY_PACKET:
                    return proc.pid
        if time.monotonic() > deadline:
            _stop(proc.pid, tag)
            raise TestbedError(f"delayer for {host_name} did not bind queue {queue} in {READY_TIMEOUT:.0f}s")
        time.sleep(0.02)


def _install_rules(leader: int, backend: tuple[str, str], dev: str, queue: int) -> list[str]:
    """Queue what leaves `dev` to `queue`, retargeting the chain if it is there. Returns the
    rules as text. IPv4 must work; IPv6 is best effort (a kernel may have it off)."""
    rules = []
    for family, ipt in enumerate(backend):
        try:
            if _run(in_netns(leader, [ipt, "-w", "-S", CHAIN]), check=False).returncode != 0:
                for argv in install_argvs(ipt, queue):
                    _run(in_netns(leader, argv))
            elif _run(in_netns(leader, retarget_argv(ipt, queue)), check=False).returncode != 0:
                # The chain is there but not as we left it: fill it again.
                _run(in_netns(leader, [ipt, "-w", "-F", CHAIN]))
                for argv in install_argvs(ipt, queue)[1:]:
                    _run(in_netns(leader, argv))
            for hook in HOOKS:
                spec = jump_spec(hook, dev)
                if _run(in_netns(leader, [ipt, "-w", "-C", *spec]), check=False).returncode != 0:
                    _run(in_netns(leader, [ipt, "-w", "-I", hook, "1", *spec[1:]]))
        except TestbedError:
            if family == 0:
                raise
            continue
        rules += [f"{ipt} -A {' '.join(jump_spec(h, dev))}" for h in HOOKS]
        rules += [" ".join(a for a in argv if a != "-w") for argv in install_argvs(ipt, queue)[1:]]
    return rules


def _rules_point_at(leader: int, backend: tuple[str, str], queue: int) -> bool:
    listing = _run(in_netns(leader, [backend[0], "-w", "-S", CHAIN]), check=False)
    return listing.returncode == 0 and f"--queue-num {queue} " in listing.stdout + " "


def _remove_rules(leader: int, backend: tuple[str, str]) -> None:
    """Remove the chain and every jump to it, whatever the device. Quiet when absent."""
    for ipt in backend:
        if _run(in_netns(leader, [ipt, "-w", "-S", CHAIN]), check=False).returncode != 0:
            continue
        for hook in HOOKS:
            listing = _run(in_netns(leader, [ipt, "-w", "-S", hook]), check=False).stdout
            for spec in jumps_in(listing):
                _run(in_netns(leader, [ipt, "-w", "-D", *spec]), check=False)
        _run(in_netns(leader, [ipt, "-w", "-F", CHAIN]), check=False)
        _run(in_netns(leader, [ipt, "-w", "-X", CHAIN]), check=False)


# --------------------------------------------------------------------------- API


def _check_args(delay_ms: float, loss_pct: float) -> None:
    if not delay_ms >= 0 or not 0 <= loss_pct <= 100:
        raise TestbedError("impairment: delay must be >= 0 ms and loss between 0 and 100 percent")


def _same(prev: dict[str, Any] | None, **want: Any) -> bool:
    return prev is not None and all(prev.get(k) == v for k, v in want.items())


def apply(
    state_dir: Path, host_name: str, leader_pid: int, delay_ms: float, loss_pct: float, *, dev: str = DEV
) -> dict[str, Any]:
    """Make what `dev` sends in the leader's namespace `delay_ms` late and `loss_pct` % lost.

    Replaces any earlier setting for the host; a no-op when that setting is already in force.
    Returns what `clear` needs (also kept in `<state_dir>/impair/<host>.json`): mode, leader,
    dev, delay_ms, loss_pct and, for the delayer, pid, queue, backend, rules, tag and log.
    Zero delay and zero loss clear instead, and return {"mode": "none"}.
    """
    _check_args(delay_ms, loss_pct)
    if not _alive(leader_pid):
        raise TestbedError(f"host {host_name} is not running: cannot impair its link")
    delay_ms, loss_pct = float(delay_ms), float(loss_pct)
    prev = _load(state_dir, host_name)
    if not delay_ms and not loss_pct:
        clear(state_dir, host_name, leader_pid, prev)
        return {"mode": "none"}
    how = mode()
    want = {"mode": how, "leader": leader_pid, "dev": dev, "delay_ms": delay_ms, "loss_pct": loss_pct}
    if how == "netem":
        if _same(prev, mode="netem", leader=leader_pid, dev=dev, delay_ms=delay_ms, loss_pct=loss_pct):
            assert prev is not None
            return prev
        if prev is not None and prev.get("mode") != "netem":
            clear(state_dir, host_name, leader_pid, prev)
        _run(in_netns(leader_pid, netem(dev, delay_ms, loss_pct)))
        _save(state_dir, host_name, want)
        return want

    backend = iptables_backend()
    tag = str(_state_path(state_dir, host_name))
    reuse = prev if _same(prev, mode="delayer", leader=leader_pid, dev=dev) else None
    if prev is not None and reuse is None:
        clear(state_dir, host_name, leader_pid, prev)
    elif reuse is not None:
        running = _alive(reuse.get("pid")) and command_tag(_cmdline(reuse["pid"])) == tag
        in_force = running and _rules_point_at(leader_pid, backend, reuse["queue"])
        if in_force and _same(reuse, delay_ms=delay_ms, loss_pct=loss_pct):
            return reuse
        if not running:
            reuse = None
    for stray, stray_tag in delayers(tag).items():  # e.g. left by an apply that was killed
        if stray_tag == tag and (reuse is None or stray != reuse["pid"]):
            _stop(stray, tag)
    queue = QUEUES[1] if reuse is not None and reuse.get("queue") == QUEUES[0] else QUEUES[0]
    pid = _start_delayer(state_dir, host_name, leader_pid, queue, delay_ms, loss_pct)
    try:
        rules = _install_rules(leader_pid, backend, dev, queue)
    except BaseException:
        _stop(pid, tag)
        raise
    if reuse is not None:
        _stop(reuse["pid"], tag)  # after the switch, so no packet is left without a delay
    info = {
        **want,
        "pid": pid,
        "queue": queue,
        "backend": list(backend),
        "rules": rules,
        "tag": tag,
        "log": str(_dir(state_dir) / f"{host_name}.log"),
    }
    _save(state_dir, host_name, info)
    return info


def clear(
    state_dir: Path, host_name: str, leader_pid: int | None, info: dict[str, Any] | None = None
) -> None:
    """Remove the host's impairment: qdisc or queue rules (when its leader still runs) and any
    delayer of the host (always). Safe to call twice, without `info` (the state file is used),
    and after the container died (`leader_pid` dead or None: its rules died with it).

    With nothing recorded for the host, only a netem qdisc is looked for (as the bed always
    did): the queue rules are never installed without a record, and checking costs two
    iptables runs per host on every network change.
    """
    info = info or _load(state_dir, host_name)
    how = info.get("mode") if info else None
    if _alive(leader_pid):
        assert leader_pid is not None
        if how == "netem" or (how is None and netem_available()):
            dev = (info or {}).get("dev", DEV)
            _run(in_netns(leader_pid, ["tc", "qdisc", "del", "dev", dev, "root"]), check=False)
        elif how == "delayer":
            assert info is not None
            v4, v6 = info.get("backend") or iptables_backend()
            _remove_rules(leader_pid, (v4, v6))
    tag = str(_state_path(state_dir, host_name))
    pids = {int(info["pid"])} if info and info.get("pid") else set()
    pids |= {pid for pid, t in delayers(tag).items() if t == tag}
    for pid in sorted(pids):
        _stop(pid, tag)
    _state_path(state_dir, host_name).unlink(missing_ok=True)


def kill_all(state_dir: Path) -> list[int]:
    """Stop every delayer started for `state_dir` (found by state file and by command line)
    and forget their state. For `down`: rules are left to die with the namespaces. Returns
    the pids stopped."""
    prefix = str(_dir(state_dir)) + "/"
    targets = dict(delayers(prefix))
    for path in sorted(_dir(state_dir).glob("*.json")):
        info = _load(state_dir, path.stem)
        if info and info.get("pid") and info.get("tag"):
            targets.setdefault(int(info["pid"]), str(info["tag"]))
    stopped = []
    for pid, tag in sorted(targets.items()):
        if _alive(pid) and command_tag(_cmdline(pid)) == tag:
            stopped.append(pid)
        _stop(pid, tag)
    for path in _dir(state_dir).glob("*.json"):
        path.unlink(missing_ok=True)
    return stopped
