"""Telling systemd how the node is doing: the sd_notify protocol (a datagram to the socket
named by $NOTIFY_SOCKET) for a `Type=notify` unit with `WatchdogSec=`.

READY=1 once the node runs, WATCHDOG=1 while it is healthy (systemd restarts it when the
pings stop), STOPPING=1 on the way out; EXTEND_TIMEOUT_USEC while its store opens (the
first start after an update may migrate a large store for longer than the unit's
TimeoutStartSec, and a migration killed half-way starts over at the next start). Outside systemd ($NOTIFY_SOCKET unset) nothing is
sent. The protocol is one datagram per message, so it is written here rather than pulling
in libsystemd's bindings, which a board would have to compile.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def notify(state: str) -> bool:
    """Send `state` ("READY=1", ...) to systemd; False when not run by systemd or the
    socket is gone."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half systemd's timeout), or None when systemd asks
    for none (or asks another process)."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec), 0) / 2e6 or None
    except ValueError:
        return None


@contextmanager
def more_time(step: float = 30.0) -> Iterator[None]:
    """Around a start-up step that may outlast TimeoutStartSec: ask systemd for `step`
    seconds more, again every `step` / 3 seconds while the step runs (nothing outside
    systemd)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        yield
        return
    done = threading.Event()

    def extend() -> None:
        while notify(f"EXTEND_TIMEOUT_USEC={int(step * 1e6)}") and not done.wait(step / 3):
            pass
    asking = threading.Thread(target=extend, daemon=True, name="edgeswarm-start-time")
    asking.start()
    try:
        yield
    finally:
        done.set()
        asking.join()
