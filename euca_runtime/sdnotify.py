"""systemd's notify protocol (sd_notify), the few lines the runtime needs.

Under a ``Type=notify`` unit systemd sets ``NOTIFY_SOCKET`` (a datagram socket; a leading ``@``
is the abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``,
the process that must ping). The runtime sends ``READY=1`` once its node has started and then
``WATCHDOG=1`` from its event loop at half the watchdog interval, so a stuck loop stops the pings
and systemd kills and restarts the process (its ``ExecStopPost=`` then certifies the death).
Outside systemd every function is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket

from euca_runtime.log import get_logger

log = get_logger("sdnotify")


def notify(state: str) -> bool:
    """Send `state` (e.g. ``READY=1``) to systemd; False when not under a notify unit."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify failed", extra={"state": state, "reason": str(exc)})
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``WatchdogSec=``), None without a watchdog for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        return None
    return seconds / 2 if seconds > 0 else None


async def watchdog_loop(interval: float) -> None:
    """Ping systemd's watchdog every `interval` seconds, from the event loop, until cancelled."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
