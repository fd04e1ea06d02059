"""`edgeswarm demo`: an embedded broker and a few local nodes that write frames and converge."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from edgeswarm.broker.embedded import EmbeddedBroker

from edgeswarm.shared.identity import Identity

from .config import Config
from .node import Node

REGION = "demo/line1"


def _converged(nodes: list[Node]) -> bool:
    """Every node has the same head and the same consensus for every frame, and they agree."""
    first = nodes[0].store.frame_heads()
    return (bool(first) and all(head == consensus for _, _, head, consensus in first)
            and all(n.store.frame_heads() == first for n in nodes[1:]))


def _has(node: Node, key: str, version: str) -> bool:
    head = node.head(REGION, key)
    return head is not None and head.version == version


def _wait_until(condition, changed: threading.Event, timeout: float) -> bool:
    """Re-check `condition` each time a node stores a change, until it holds or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if not changed.wait(max(0.0, deadline - time.monotonic())):
            return condition()
        changed.clear()
    return True


def run_demo(nodes: int = 3, home: Path | None = None, timeout: float = 15.0) -> int:
    if not 2 <= nodes <= 20:
        raise ValueError("the demo runs between 2 and 20 nodes")
    with tempfile.TemporaryDirectory(prefix="edgeswarm-demo-") as tmp, EmbeddedBroker() as broker:
        base = Path(home) if home else Path(tmp)
        print(f"embedded broker on {broker.host}:{broker.port}; {nodes} nodes in {base}, "
              f"consensus at {nodes // 2 + 1} votes")
        homes = [base / f"node{i}" for i in range(nodes)]
        members = [Identity.load_or_create(Config(home=h).key_path).node_id for h in homes]
        configs = [Config(home=h, regions=["demo"], broker_port=broker.port, protocol="3.1.1", members=members)
                   for h in homes]
        if home:  # kept: write the configurations so that get, status and trace work on them
            for config in configs:
                if not config.config_path.exists():
                    config.save()
        swarm = [Node(config) for config in configs]
        changed = threading.Event()
        try:
            for n in swarm:
                n.subscribe(lambda fv: changed.set())
                n.start()
                print(f"  node {n.node_id} started")
            t0 = time.monotonic()
            # Every node writes its own sensor frame; then the nodes take turns editing one
            # shared frame, each starting from the version it received from the previous one.
            for i, n in enumerate(swarm):
                v = n.put(REGION, f"sensor-{i}", {"node": n.node_id, "reading": 20.0 + i, "unit": "C"})
                print(f"  {n.node_id} put    {REGION} sensor-{i:<3} -> {v[:12]}")
            version = None
            for i, n in enumerate(swarm):
                if version is not None and not _wait_until(lambda: _has(n, "setpoints", version), changed, timeout):
                    print(f"NOT converged: node {n.node_id} did not receive setpoints {version[:12]}")
                    return 1
                version = n.patch(REGION, "setpoints", set={("zone", str(i)): 18 + i})
                print(f"  {n.node_id} patch  {REGION} setpoints  -> {version[:12]}")
            # Two nodes edit different zones of the same version at once: a three-way merge.
            if not _wait_until(lambda: all(_has(n, "setpoints", version) for n in swarm), changed, timeout):
                print("NOT converged: setpoints did not reach every node")
                return 1
            a, b = swarm[0], swarm[1]
            va = a.patch(REGION, "setpoints", set={("zone", "0"): 17.5})
            vb = b.patch(REGION, "setpoints", set={("zone", "1"): 21.5})
            print(f"  {a.node_id} patch  {REGION} setpoints  -> {va[:12]}  (concurrently)")
            print(f"  {b.node_id} patch  {REGION} setpoints  -> {vb[:12]}  (concurrently)")
            if not _wait_until(lambda: _converged(swarm), changed, timeout):
                print("NOT converged: the nodes hold different versions")
                return 1
            took = (time.monotonic() - t0) * 1000
            heads = swarm[0].store.frame_heads()
            print(f"converged in {took:.0f} ms: all {nodes} nodes hold the same consensus for {len(heads)} frames")
            print(f"  {'frame':<24}" + "".join(f"{n.node_id[:10]:>12}" for n in swarm))
            for region, key, _, _ in heads:
                row = "".join(f"{n.consensus(region, key).version[:10]:>12}" for n in swarm)
                print(f"  {region + '/' + key:<24}{row}")
            print(f"  setpoints = {swarm[-1].get(REGION, 'setpoints', consensus=True)}")
            merges = sum(n.stats().get("merges", 0) for n in swarm)
            print(f"merge versions computed: {merges} (identical hash on every node)")
            rejected = sum(v for n in swarm for k, v in n.stats().items() if k.startswith("rejected."))
            print(f"messages rejected: {rejected}")
            return 0
        finally:
            for n in swarm:
                n.stop()
