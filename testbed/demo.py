"""`make demo`: testbed hosts, site.yml onto them (twice: the second run must change nothing),
a smoke check, and how to reach the result. Grows with the project."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from testbed import bed as tb
from testbed.model import STATE_ROOT, TestbedError

NAME = "demo"
HOSTS = 3
ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY = ROOT / "inventories" / "demo" / "topology.yml"


def site(inventory: Path, *extra: str) -> tuple[int, str]:
    """Run site.yml; return the total `changed=` of the play recap and the output."""
    bindir = Path(sys.executable).parent
    cmd = [str(bindir / "ansible-playbook"), "-i", str(inventory), "-i", str(TOPOLOGY), *extra]
    cmd.append("playbooks/site.yml")
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:])
        raise TestbedError(f"site.yml failed (exit {proc.returncode})")
    recap = proc.stdout[proc.stdout.rfind("PLAY RECAP") :]
    return sum(int(n) for n in re.findall(r"changed=(\d+)", recap)), recap


def main() -> int:
    try:
        if (STATE_ROOT / NAME / "state.json").exists():
            print(f"demo: testbed {NAME!r} is already up; reusing it")
        else:
            t0 = time.monotonic()
            tb.up(NAME, HOSTS)
            print(f"demo: {HOSTS} testbed hosts up in {time.monotonic() - t0:.1f}s")
        inventory = STATE_ROOT / NAME / "inventory.yml"
        first, recap = site(inventory)
        print(f"demo: site.yml first run: changed={first}")
        second, recap = site(inventory)
        print(f"demo: site.yml second run: changed={second}\n{recap.strip()}")
        if second != 0:
            raise TestbedError(f"site.yml is not idempotent: the second run changed {second} things")
        checked, _ = site(inventory, "--check", "--diff")
        print(f"demo: site.yml --check --diff: changed={checked}")
        if checked != 0:
            raise TestbedError(f"site.yml --check --diff would change {checked} things on a converged cloud")
        bed = tb.load(NAME)
        for host in bed.hosts:
            out = tb.ssh(bed, host, "id -u eucalyptus && stat -c %a /var/lib/eucalyptus")
            if out.returncode != 0 or out.stdout.split() != ["970", "700"]:
                raise TestbedError(f"smoke check failed on {host.name}: {out.stdout or out.stderr}")
        print("demo: smoke check passed (service account and state directory on every host)")
    except TestbedError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    status = tb.status(NAME)[0]
    print(
        f"\nThe demo cloud's hosts are up on {status['subnet']}:\n"
        + "".join(f"  {h['name']}  {h['address']}  {h['state']}\n" for h in status["hosts"])
        + f"\nReach them:   ssh -F {status['ssh_config']} h1\n"
        f"Ansible:      .venv/bin/ansible-playbook -i {status['inventory']} -i {TOPOLOGY.relative_to(ROOT)} "
        "playbooks/site.yml\n"
        "Faults:       .venv/bin/python -m testbed --help   (use --name demo)\n"
        "Tear down:    make down\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
