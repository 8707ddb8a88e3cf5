"""A real 2-host bed: SSH, partition, heal, kill/start, pause/resume, and a clean teardown."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import bed as tb
from testbed.model import STATE_ROOT, TestbedError

pytestmark = [pytest.mark.testbed, pytest.mark.slow]


def ssh(name: str, host: str, cmd: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-F", str(STATE_ROOT / name / "ssh_config"), "-o", "BatchMode=yes", host, cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def reaches(name: str, src: str, dst: str) -> bool:
    return ssh(name, src, f"ping -c1 -W1 {dst}").returncode == 0


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def leftovers(name: str) -> list[str]:
    found = []
    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout)
    found += [link["ifname"] for link in links if name in link["ifname"]]
    mounts = Path("/proc/mounts").read_text().splitlines()
    found += [line for line in mounts if f"euca-testbed/{name}/" in line]
    procs = subprocess.run(["pgrep", "-af", f"--machine={name}-"], capture_output=True, text=True).stdout
    found += procs.splitlines()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [line for line in netns.splitlines() if f"eucatb-{name}-" in line]
    if (STATE_ROOT / name).exists():
        found.append(str(STATE_ROOT / name))
    return found


@pytest.fixture(scope="module")
def bed() -> Iterator[str]:
    name = f"it{os.getpid() % 100000}"
    try:
        tb.up(name, 2)
        yield name
    finally:
        tb.down(name)
    assert leftovers(name) == []


def test_hosts_answer_ssh_as_real_systemd_machines(bed):
    for host in ("h1", "h2"):
        out = ssh(bed, host, "hostname && systemctl is-system-running && cat /etc/machine-id")
        name, state, machine_id = out.stdout.split()
        assert name == host
        assert state in ("running", "degraded")
        assert machine_id != Path("/etc/machine-id").read_text().strip()
        # root's shell init is the host's own, not the build machine's (its pyenv, say)
        assert ssh(bed, host, "head -1 ~/.bashrc").stdout.startswith("# testbed host")


def test_partition_cuts_only_between_the_sets_and_heal_restores(bed):
    assert reaches(bed, "h1", "h2")
    tb.partition(bed, ["h1"], ["h2"])
    try:
        assert not reaches(bed, "h1", "h2")
        assert not reaches(bed, "h2", "h1")
        # both still reach the rest: the upstream namespace and the controller
        assert reaches(bed, "h1", "upstream") and reaches(bed, "h2", "upstream")
        assert ssh(bed, "h1", "true").returncode == 0
    finally:
        tb.heal(bed)
    assert reaches(bed, "h1", "h2")


def test_cut_upstream_cuts_one_hosts_route_to_the_users_only(bed):
    tb.cut_upstream(bed, "h2")
    try:
        assert not reaches(bed, "h2", "upstream")
        assert reaches(bed, "h1", "upstream")
        assert reaches(bed, "h2", "h1")
    finally:
        tb.restore_upstream(bed, "h2")
    assert reaches(bed, "h2", "upstream")


def test_isolate_cuts_a_host_from_every_other(bed):
    tb.isolate(bed, "h2")
    try:
        assert not reaches(bed, "h1", "h2")
        assert not reaches(bed, "h2", "upstream")
    finally:
        tb.heal(bed)
    assert reaches(bed, "h1", "h2")


def rtt_ms(name: str, src: str, dst: str) -> float:
    out = ssh(name, src, f"ping -c3 -i0.2 -W2 {dst}").stdout
    return float(out.strip().splitlines()[-1].split("=")[1].split("/")[1])  # rtt min/avg/max/mdev


def test_degrade_delays_what_the_host_sends_and_heal_removes_it(bed):
    tb.degrade(bed, "h1", delay_ms=60, loss_pct=0)
    try:
        assert rtt_ms(bed, "h1", "h2") >= 60
        assert rtt_ms(bed, "h2", "h1") >= 60  # the replies h1 sends are delayed too
        assert [f["kind"] for f in tb.status(bed)[0]["faults"]] == ["degrade"]
    finally:
        tb.heal(bed)
    assert rtt_ms(bed, "h1", "h2") < 60
    with pytest.raises(TestbedError, match="--loss"):
        tb.degrade(bed, "h1", delay_ms=10, loss_pct=150)


def test_pause_and_resume_a_process_inside_a_host(bed):
    ssh(bed, "h2", "systemd-run --property=Type=exec --unit=victim sleep 600")  # returns after exec
    pids = tb.pause(bed, "h2", r"sleep 600$")
    assert len(pids) == 1
    state = lambda: Path(f"/proc/{pids[0]}/stat").read_text().split(")")[-1].split()[0]  # noqa: E731
    assert state() == "T"
    assert tb.resume(bed, "h2") == pids
    assert state() == "S"
    ssh(bed, "h2", "systemctl stop victim")


def test_kill_is_a_machine_failure_and_start_boots_it_again(bed):
    tb.kill(bed, "h2")
    assert [h["state"] for h in tb.status(bed)[0]["hosts"]] == ["running", "stopped"]
    assert not reaches(bed, "h1", "h2")
    tb.start(bed, "h2")
    assert ssh(bed, "h2", "systemctl is-system-running").stdout.strip() in ("running", "degraded")
    wait_for(lambda: reaches(bed, "h1", "h2"), "h1 to reach the restarted h2")


def test_every_fault_is_in_the_event_log(bed):
    log = STATE_ROOT / bed / "events.jsonl"

    def events() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()]

    assert events()[0]["verb"] == "up"
    before = len(events())
    tb.partition(bed, ["h1"], ["h2"])
    tb.isolate(bed, "h2")
    tb.cut_upstream(bed, "h1")
    tb.restore_upstream(bed, "h1")
    tb.degrade(bed, "h2", delay_ms=5, loss_pct=0)
    tb.heal(bed)
    new = events()[before:]
    assert [e["verb"] for e in new] == [
        "partition",
        "isolate",
        "cut-upstream",
        "restore-upstream",
        "degrade",
        "heal",
    ]
    assert new[0]["args"] == {"a": ["h1"], "b": ["h2"]}
    assert new[-1]["args"]["faults"] == ["partition", "isolate", "degrade"]
    assert all(e["ts"] > 0 and e["mono"] > 0 for e in new)
    assert [e["mono"] for e in new] == sorted(e["mono"] for e in new)


def test_bad_input_fails_clearly_and_changes_nothing(bed):
    with pytest.raises(TestbedError, match="already up"):
        tb.up(bed, 1)
    with pytest.raises(TestbedError, match="no host 'h9'"):
        tb.kill(bed, "h9")
    with pytest.raises(TestbedError, match="both sides"):
        tb.partition(bed, ["h1"], ["h1", "h2"])
    with pytest.raises(TestbedError, match="no testbed named"):
        tb.heal("nosuch")
    assert [h["state"] for h in tb.status(bed)[0]["hosts"]] == ["running", "running"]


def test_down_is_safe_twice_and_after_a_failed_up(monkeypatch):
    name = f"fu{os.getpid() % 100000}"

    def never_ready(bed, host, timeout):
        raise TestbedError(f"host {host.name} never came up (injected)")

    # a bed that fails while booting, with its hosts already running, leaves nothing behind
    monkeypatch.setattr(tb, "_wait_ready", never_ready)
    with pytest.raises(TestbedError, match="injected"):
        tb.up(name, 2)
    assert leftovers(name) == []
    assert tb.down(name) is False
