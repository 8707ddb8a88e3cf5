"""``euca-runtime``: run one runtime process, or a whole local cloud.

- ``euca-runtime serve --config FILE``: one runtime process (what systemd runs). SIGTERM or
  SIGINT stops it gracefully: its leases are released so a backup takes over at once. SIGHUP
  re-reads FILE and applies its ``peers`` and ``voters`` without a restart (the same as
  ``POST /v1/reload``; see `euca_runtime.reconfig`).
- ``euca-runtime up [--ha] [--dir DIR] [--node NAME]``: a local cloud on loopback (see
  `euca_runtime.local`); returns once the cloud is ENABLED and prints where things are.
- ``euca-runtime down --dir DIR [--node NAME]``: stop it; no process is left behind.

Exit status: 0 on success, 1 on a runtime failure, 2 on a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from euca_runtime import gc_tuning, sdnotify
from euca_runtime.config import ConfigError, load_config
from euca_runtime.log import configure, get_logger

log = get_logger("cli")

DEFAULT_DIR = "./euca-local"


async def _serve(config_path: str) -> int:
    from euca_runtime.node import Node, load_admin_token

    cfg = load_config(config_path)
    configure(cfg.log_level, node=cfg.node)
    token = load_admin_token(cfg.data_dir)
    node = Node(cfg, admin_token=token, faults_enabled=os.environ.get("EUCA_RUNTIME_FAULTS") == "1")
    node.config_path = Path(config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def reload() -> None:
        from euca_runtime import reconfig
        from euca_runtime.component import RequestError

        try:
            await reconfig.reload(node)
        except RequestError as exc:
            log.error("reload refused", extra={"reason": exc.message})

    loop.add_signal_handler(signal.SIGHUP, lambda: node.spawn(reload()))
    try:
        await node.start()
    except OSError as exc:
        log.error("cannot start", extra={"reason": str(exc)})
        await node.stop()
        return 1
    gc_tuning.watch()
    log.info("gc tuned", extra=gc_tuning.tune())  # after start-up: see euca_runtime/gc_tuning.py
    # Under systemd (Type=notify, WatchdogSec=): ready now, then watchdog pings from this loop.
    sdnotify.notify("READY=1")
    interval = sdnotify.watchdog_interval()
    pinger = asyncio.create_task(sdnotify.watchdog_loop(interval), name="watchdog") if interval else None
    await stop.wait()
    sdnotify.notify("STOPPING=1")
    if pinger is not None:
        pinger.cancel()
    await node.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="euca-runtime", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve", help="run one runtime process")
    p.add_argument("--config", required=True, help="YAML configuration file")
    p = sub.add_parser("up", help="start a local cloud (creates it on first use)")
    p.add_argument("--ha", action="store_true", help="node-a + node-b primary/backup, node-c arbitrator")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"where the cloud lives (default {DEFAULT_DIR})")
    p.add_argument("--node", help="start only this node (restart a stopped or killed one)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for ENABLED")
    p = sub.add_parser("down", help="stop a local cloud")
    p.add_argument("--dir", default=DEFAULT_DIR)
    p.add_argument("--node", help="stop only this node")
    p = sub.add_parser("_supervise", help=argparse.SUPPRESS)
    p.add_argument("--dir", required=True)
    p.add_argument("--node", required=True)
    args = parser.parse_args(argv)

    if args.cmd == "serve":
        try:
            return asyncio.run(_serve(args.config))
        except ConfigError as exc:
            print(f"euca-runtime: {exc}", file=sys.stderr)
            return 2
    from euca_runtime import local

    try:
        if args.cmd == "up":
            layout = local.up(Path(args.dir), ha=args.ha, node=args.node, timeout=args.timeout)
            print(f"cloud is ENABLED ({layout.mode}); nodes: {', '.join(layout.nodes)}")
            print(f"  source {layout.root / 'eucarc'}")
            print(f"  eucactl --dir {layout.root} describe-services")
            return 0
        if args.cmd == "down":
            stopped = local.down(Path(args.dir), node=args.node)
            print(f"stopped: {', '.join(stopped)}")
            return 0
        if args.cmd == "_supervise":
            return local.supervise(Path(args.dir), args.node)
    except local.UpError as exc:
        print(f"euca-runtime {args.cmd}: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
