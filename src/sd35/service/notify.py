"""systemd's notify protocol (sd_notify), in a few lines instead of a dependency.

Why: with `Type=notify` systemd considers the unit started only when we say `READY=1` — after the model
is loaded and warmed up, not when the process exists — and restarts it when `WATCHDOG=1` stops coming
(a hung GPU). `EXTEND_TIMEOUT_USEC` keeps a long first load (a 25 GB download) from hitting
`TimeoutStartSec`. Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send `KEY=value` lines to $NOTIFY_SOCKET. Returns False when not running under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when the watchdog is off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None
