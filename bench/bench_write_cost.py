"""What one write costs a swarm in CPU, step by step: N members in one process, no broker.

    python bench/bench_write_cost.py [--members 20] [--writes 200] [--runs 3]

N members (quorum: a majority), each a Node with its real key and SQLite store, joined by a
loopback in this one thread instead of a broker: what a node publishes is handed to the
nodes that would receive it, as soon as it is published. Two of them write in turn, one
frame at a time (20 frames), and each write is carried to consensus everywhere the way the
swarm carries it (node/relay.py):
  1. the writer writes (stores, signs, publishes its diff, which is its vote);
  2. every other member takes the diff and votes, to the writer;
  3. the writer takes the votes one by one (as they come from separate boards) and passes
     them on: at once when the frame reaches consensus, then the late ones;
  4. every other member takes the relays.
Measured with time.process_time, per write and per node in each step, and the Ed25519
signature checks the write made the swarm do (counted), with what they cost on this
machine (a check timed alone). Every figure is the CPU of that step alone: on a board the
broker, the network thread and the hand-over between threads come on top (bench_brokers
measures the whole). --runs fresh swarms; the minimum and median of each figure are printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from edgeswarm.node import Config, Node
from edgeswarm.shared import envelope
from edgeswarm.shared.identity import Identity, verify

REGION = "bench/writes"
KEYS = 20
STEPS = ("write", "diff", "votes", "relays")


class Loopback:
    """What each node publishes, in order; the broker's acknowledgement given at once."""

    def __init__(self, nodes: list[Node]) -> None:
        self.sent: dict[str, list[tuple[str, bytes]]] = {n.node_id: [] for n in nodes}
        for node in nodes:
            node.publish_tracked = self._publisher(node)

    def _publisher(self, node: Node):
        sent = self.sent[node.node_id]

        def publish_tracked(topic: str, raw: bytes, kind: str, ids: tuple[int, ...]) -> None:
            sent.append((topic, raw))
            if ids:
                node._on_ack(ids)
        return publish_tracked

    def take(self, node: Node) -> list[tuple[str, bytes]]:
        sent = self.sent[node.node_id]
        out = list(sent)
        sent.clear()
        return out


class Checks:
    """Counts the signature checks envelopes make."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> Checks:
        def counted(public_key: bytes, message: bytes, signature: bytes) -> bool:
            self.count += 1
            return verify(public_key, message, signature)
        envelope.verify = counted
        return self

    def __exit__(self, *exc: object) -> None:
        envelope.verify = verify


def run(members: int, writes: int) -> tuple[dict[str, float], float]:
    """(step -> CPU ms per write in all nodes, signature checks per write)."""
    with tempfile.TemporaryDirectory() as tmp:
        homes = [Path(tmp) / f"n{i:02d}" for i in range(members)]
        ids = [Identity.load_or_create(h / "node.key").node_id for h in homes]
        nodes = [Node(Config(home=h, regions=[REGION], members=ids, sync_interval=0, snapshot_interval=0))
                 for h in homes]
        for node in nodes:  # (what births say: each passes votes on)
            for peer in nodes:
                if peer is not node:
                    node.relay.on_presence(peer.node_id, True)
        bus = Loopback(nodes)
        spent = dict.fromkeys(STEPS, 0.0)
        with Checks() as checks:
            for w in range(writes):
                writer = nodes[w % 2]
                readers = [n for n in nodes if n is not writer]
                t0 = time.process_time()
                writer.put(REGION, f"k{w % KEYS}", {"reading": w * 0.5, "n": w, "unit": "C"})
                spent["write"] += time.process_time() - t0
                diff = bus.take(writer)
                votes = []
                t0 = time.process_time()
                for reader in readers:
                    reader.receive_many(diff)
                    votes += bus.take(reader)
                spent["diff"] += time.process_time() - t0
                t0 = time.process_time()
                for vote in votes:
                    writer.receive_many([vote])
                writer.relay.flush(force=True)  # (the late votes' short wait, not waited for here)
                spent["votes"] += time.process_time() - t0
                relays = bus.take(writer)
                t0 = time.process_time()
                for reader in readers:
                    reader.receive_many(relays)
                    reader.relay.flush(force=True)
                    bus.take(reader)
                spent["relays"] += time.process_time() - t0
        decided = min(n.counters["consensus"] for n in nodes)
        if decided < writes:
            raise SystemExit(f"only {decided} of {writes} writes reached consensus on every node")
        for node in nodes:
            node.store.close()
        return {k: v * 1e3 / writes for k, v in spent.items()}, checks.count / writes


def check_cost(n: int = 2000) -> float:
    """µs one Ed25519 check of a vote-sized message takes here."""
    identity = Identity.generate()
    message = b"v" * 160
    signature = identity.sign(message)
    t0 = time.process_time()
    for _ in range(n):
        verify(identity.public_key, message, signature)
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=20)
    p.add_argument("--writes", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if args.members < 2:
        raise SystemExit("--members is at least 2")
    runs = [run(args.members, args.writes) for _ in range(args.runs)]
    check_us = check_cost()
    others = args.members - 1
    print(f"{args.members} members, {args.writes} writes, {args.runs} runs; CPU per write, minimum / median:")
    per_node = {"write": 1, "diff": others, "votes": 1, "relays": others}
    names = {"write": "the writer writes", "diff": "each member takes the diff and votes",
             "votes": "the writer takes the votes, passes them on", "relays": "each member takes the relays"}
    for step in STEPS:
        values = [r[step] for r, _ in runs]
        print(f"  {names[step]:<44} {min(values):7.2f} / {statistics.median(values):6.2f} ms in all, "
              f"{statistics.median(values) / per_node[step]:5.2f} ms per node")
    totals = [sum(r.values()) for r, _ in runs]
    checks = statistics.median(c for _, c in runs)
    print(f"  {'in all':<44} {min(totals):7.2f} / {statistics.median(totals):6.2f} ms")
    print(f"  signature checks: {checks:.0f} per write, {check_us:.0f} µs each here: "
          f"{checks * check_us / 1e3:.1f} ms, {checks * check_us / 1e3 / statistics.median(totals):.0%} of the median")


if __name__ == "__main__":
    main()
