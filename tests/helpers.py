"""Helpers shared by test modules: digests settling across node processes, a `watch`
process, admission certificates, an offline network of nodes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from edgeswarm.node import Node
from edgeswarm.node.harness import COMMANDS
from edgeswarm.shared import packing, roster, shortening
from edgeswarm.shared.envelope import decode
from edgeswarm.shared.identity import Identity

DAY_MS = 86_400_000


def same_digest(nodes: list, region: str, timeout: float) -> bool:
    """Every node's digest equal to the first's (node processes, or nodes in this process).
    Each wait is on that node's own events; the first may still change while the others
    catch up, so its digest is read again."""
    def call(n, name: str, *args):
        return COMMANDS[name](n, *args) if isinstance(n, Node) else getattr(n, name)(*args)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        target = call(nodes[0], "digest", region)
        if all(call(n, "wait_digest", region, target, 2.0) for n in nodes[1:]) \
                and call(nodes[0], "digest", region) == target:
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


class Network:
    """Nodes that never connect: each one's outbox is the network, and the test decides
    which message reaches which node when, in any order, some of them twice."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.queues: list[list[tuple[str, bytes]]] = [[] for _ in nodes]
        self.delivered: list[list[tuple[str, bytes]]] = [[] for _ in nodes]

    def send(self, i: int) -> None:
        """What node i has in its outbox goes onto the wire towards every other node."""
        node = self.nodes[i]
        for item in node.store.unpublished():
            node.store.mark_published([item.seq])
            for j in range(len(self.nodes)):
                if j != i:
                    self.queues[j].append((item.topic, item.envelope))

    def deliver(self, j: int, pick: int) -> None:
        if self.queues[j]:
            message = self.queues[j].pop(pick % len(self.queues[j]))
            self.delivered[j].append(message)
            self.nodes[j].receive(*message)

    def redeliver(self, j: int, pick: int) -> None:
        if self.delivered[j]:
            self.nodes[j].receive(*self.delivered[j][pick % len(self.delivered[j])])

    def settle(self) -> int:
        rounds = 0
        while True:
            for i in range(len(self.nodes)):
                self.send(i)
            if not any(self.queues):
                return rounds
            rounds += 1
            assert rounds < 200, "the swarm keeps talking: no quiescence"
            for j in range(len(self.nodes)):
                while self.queues[j]:
                    self.deliver(j, 0)


def restored(raw: bytes, node: Node) -> bytes:
    """A message as a sync response carried it to a node, its short forms restored from
    what the node holds (shared/shortening.py)."""
    full = shortening.restore(raw, shortening.Names(node.store.versions_named))
    assert full is not None, "a short form the node cannot restore"
    return full


def sync_body(payload: bytes) -> dict:
    """The body of a sync message taken off the wire, what it carries deflated inflated."""
    body = decode(payload).body
    if "deflated" not in body:
        return body
    return {k: v for k, v in body.items() if k != "deflated"} | packing.inflate(body["deflated"], 1 << 20)
