"""Helpers shared by test modules: digests settling across node processes, a `watch`
process, admission certificates."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from edgeswarm.shared import roster
from edgeswarm.shared.identity import Identity

DAY_MS = 86_400_000


def same_digest(nodes: list, region: str, timeout: float) -> bool:
    """Every node's digest equal to the first's. Each wait is on that node's own events;
    the first may still change while the others catch up, so its digest is read again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        target = nodes[0].digest(region)
        if all(n.wait_digest(region, target, 2.0) for n in nodes[1:]) and nodes[0].digest(region) == target:
            return True
    return False


def watch_one(args: list[str], act: Callable[[], Any], timeout: float, env: dict | None = None) -> tuple[str, Any]:
    """Run `edgeswarm ARGS --count 1` (a watch), do `act()` once it says it is subscribed;
    (what it printed, what act returned). The watch must end well."""
    watch = subprocess.Popen([sys.executable, "-m", "edgeswarm.node.cli", *args, "--count", "1",
                              "--timeout", str(timeout)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "watching" in watch.stderr.readline()  # connected and subscribed
        acted = act()
        out, err = watch.communicate(timeout=timeout)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(timeout)
    assert watch.returncode == 0, err
    return out, acted


def certificate(admin: Identity, identity: Identity, regions: list[str], days: float = 1) -> bytes:
    """An admission certificate for `identity`, valid from now for `days` (negative: expired)."""
    now = int(time.time() * 1000)
    return roster.issue(admin, identity.public_key, regions, now + int(days * DAY_MS), now)
