"""systemd's notify protocol (READY=1, WATCHDOG=1) in a few lines of standard library.

The watchdog ping runs on the event loop on purpose: a blocked loop misses its pings and
systemd restarts the service, which is what we want for a device that must react.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable


def notify(state: str) -> bool:
    """Send one notification; False when not run under systemd or the reader is full."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    # Non-blocking: this runs on the event loop, and a reader that stops reading (a full
    # datagram queue) must cost one lost notification, not a frozen loop.
    flags = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    with socket.socket(socket.AF_UNIX, flags) as sock:
        try:
            sock.connect(address)
            sock.send(state.encode())
        except BlockingIOError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC in seconds, or None when no watchdog is configured."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


async def watchdog_pings(healthy: Callable[[], bool] | None = None) -> None:
    """Ping systemd's watchdog from the event loop until cancelled.

    With `healthy`, a ping goes only while it says True: a service that knows it is broken
    in a way a restart may fix (the gateway's deaf intake) lets systemd restart it.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if healthy is None or healthy():
            notify("WATCHDOG=1")
        await asyncio.sleep(interval)
