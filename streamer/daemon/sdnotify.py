"""systemd's notify protocol (sd_notify(3)) without libsystemd: READY, WATCHDOG, STOPPING.

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a unix datagram socket; a leading
``@`` means the abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC``: the
service must send ``WATCHDOG=1`` more often than that or be restarted. Outside systemd every
call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``); False when not under systemd or on error."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), addr)
    except OSError:
        return False
    return True


def watchdog_interval_s(environ: dict[str, str] | None = None) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds (how often to ping), None without a watchdog."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
