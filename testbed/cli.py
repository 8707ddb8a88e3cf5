"""`python -m testbed` (also `euca-testbed`): real systemd hosts without Docker.

up --hosts N [--name NAME]        boot N hosts on a bridge, write inventory + ssh config
down [--name NAME]                remove everything the bed made (safe to run twice)
status [--name NAME] [--json]     hosts, addresses, states, active faults
kill HOST | start HOST            machine failure and restart
pause HOST PATTERN | resume HOST  SIGSTOP / SIGCONT processes whose command line matches
partition A[,B..] C[,D..]         no traffic between the two sets
isolate HOST                      no traffic between HOST and any other host
degrade HOST --delay MS --loss PCT
cut-upstream HOST | restore-upstream HOST
heal                              remove every network fault
events [--name NAME]              the JSON-lines fault log
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from testbed import bed as tb
from testbed.model import TestbedError

DEFAULT_NAME = "tb"


def _hosts(arg: str) -> list[str]:
    return [h for h in arg.split(",") if h]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m testbed", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(name: str, help: str, default: str | None = DEFAULT_NAME) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--name", default=default, help=f"testbed name (default {default or 'all'})")
        return sp

    up = verb("up", "boot N hosts")
    up.add_argument("--hosts", type=int, required=True)
    up.add_argument("--timeout", type=float, default=tb.BOOT_TIMEOUT, help="seconds to wait per host")
    verb("down", "remove everything the bed made")
    st = verb("status", "show hosts and faults", default=None)
    st.add_argument("--json", action="store_true")
    for name in ("kill", "start", "resume", "isolate", "cut-upstream", "restore-upstream"):
        verb(name, f"{name} HOST").add_argument("host")
    pa = verb("pause", "SIGSTOP processes on HOST matching PATTERN")
    pa.add_argument("host")
    pa.add_argument("pattern")
    pt = verb("partition", "cut traffic between two comma-separated host sets")
    pt.add_argument("a", type=_hosts)
    pt.add_argument("b", type=_hosts)
    dg = verb("degrade", "netem delay/loss on HOST's link")
    dg.add_argument("host")
    dg.add_argument("--delay", type=float, default=0.0, metavar="MS")
    dg.add_argument("--loss", type=float, default=0.0, metavar="PCT")
    verb("heal", "remove every network fault")
    verb("events", "print the fault log")
    return p


def _print_status(beds: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(beds, indent=2))
        return
    if not beds:
        print("no testbeds are up")
    for b in beds:
        print(f"bed {b['name']}: {b['subnet']} on {b['bridge']}, upstream {b['upstream']}")
        print(f"  inventory  {b['inventory']}\n  ssh config {b['ssh_config']}")
        for h in b["hosts"]:
            print(f"  {h['name']:<6} {h['address']:<15} {h['state']}")
        for f in b["faults"]:
            print("  fault: " + " ".join(f"{k}={v}" for k, v in f.items()))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    name = args.name
    try:
        match args.verb:
            case "up":
                t0 = time.monotonic()
                bed = tb.up(name, args.hosts, args.timeout)
                print(f"testbed {name}: {len(bed.hosts)} hosts up in {time.monotonic() - t0:.1f}s")
                _print_status(tb.status(name), False)
            case "down":
                found = tb.down(name)
                print(f"testbed {name}: {'removed' if found else 'nothing to remove'}")
            case "status":
                _print_status(tb.status(name), args.json)
            case "kill":
                tb.kill(name, args.host)
            case "start":
                tb.start(name, args.host)
            case "pause":
                print("paused pids: " + " ".join(map(str, tb.pause(name, args.host, args.pattern))))
            case "resume":
                print("resumed pids: " + " ".join(map(str, tb.resume(name, args.host))))
            case "partition":
                tb.partition(name, args.a, args.b)
            case "isolate":
                tb.isolate(name, args.host)
            case "degrade":
                tb.degrade(name, args.host, args.delay, args.loss)
            case "cut-upstream":
                tb.cut_upstream(name, args.host)
            case "restore-upstream":
                tb.restore_upstream(name, args.host)
            case "heal":
                tb.heal(name)
            case "events":
                sys.stdout.write((tb.load(name).dir / "events.jsonl").read_text())
    except TestbedError as e:
        print(f"testbed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130
    return 0
