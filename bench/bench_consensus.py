"""Consensus latency: from a write on one node until all five nodes hold it as consensus.

    python bench/bench_consensus.py [--writes 200] [--nodes 5]

The nodes run in this one process (one interpreter lock for all five, so the figures are
pessimistic compared with one node per board) against the embedded broker, then against
Mosquitto on 127.0.0.1:1883 when one is running. Writes are sequential: each waits for
the previous one's consensus everywhere. Prints p50, p99 and max in milliseconds.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

from edgeswarm.broker.embedded import EmbeddedBroker
from edgeswarm.node import Config, Node
from edgeswarm.shared.identity import Identity


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def run(name: str, host: str, port: int, protocol: str, n_nodes: int, writes: int, warmup: int) -> None:
    region = f"bench/consensus/{int(time.time() * 1000)}"
    with tempfile.TemporaryDirectory() as tmp:
        homes = [Path(tmp) / f"n{i}" for i in range(n_nodes)]
        members = [Identity.load_or_create(h / "node.key").node_id for h in homes]
        nodes = [Node(Config(home=h, regions=[region], broker_host=host, broker_port=port, protocol=protocol,
                             members=members)).start() for h in homes]
        target: list[str | None] = [None]
        reached: dict[str, float] = {}
        lock = threading.Lock()
        done = threading.Event()

        def watcher(node_id: str):
            def on_change(fv) -> None:
                if fv.state == "consensus" and fv.version == target[0]:
                    with lock:
                        reached.setdefault(node_id, time.perf_counter())
                        if len(reached) == n_nodes:
                            done.set()
            return on_change

        for n in nodes:
            n.subscribe(watcher(n.node_id), region)
        latencies, writer_latencies = [], []
        try:
            for i in range(warmup + writes):
                writer = nodes[i % n_nodes]
                with lock:
                    reached.clear()
                    done.clear()
                t0 = time.perf_counter()
                version = writer.patch(region, "counter", set={"i": i, "by": writer.node_id})
                with lock:
                    target[0] = version
                    # the writer's own callback may have fired before target was set
                    if (c := writer.consensus(region, "counter")) is not None and c.version == version:
                        reached.setdefault(writer.node_id, time.perf_counter())
                if not done.wait(30):
                    raise SystemExit(f"{name}: write {i} did not reach consensus on all nodes in 30 s")
                if i >= warmup:
                    latencies.append((max(reached.values()) - t0) * 1000)
                    writer_latencies.append((reached[writer.node_id] - t0) * 1000)
        finally:
            for n in nodes:
                n.stop()
    print(f"{name:<10} {n_nodes} nodes, {writes} writes: write -> consensus on all nodes "
          f"p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms, "
          f"max {max(latencies):.1f} ms; on the writer p50 {percentile(writer_latencies, 50):.1f} ms, "
          f"p99 {percentile(writer_latencies, 99):.1f} ms")


def mosquitto_running() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=1.0):
            return True
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--writes", type=int, default=200)
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args()
    with EmbeddedBroker() as broker:
        run("embedded", broker.host, broker.port, "3.1.1", args.nodes, args.writes, args.warmup)
    if mosquitto_running():
        run("mosquitto", "127.0.0.1", 1883, "auto", args.nodes, args.writes, args.warmup)
    else:
        print("mosquitto  skipped: nothing listens on 127.0.0.1:1883")


if __name__ == "__main__":
    main()
