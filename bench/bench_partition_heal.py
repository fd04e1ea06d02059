"""Partition heal: time and bytes for a split swarm to converge again.

    python bench/bench_partition_heal.py [--nodes 10] [--frames 10000] [--differ 0.01] [--history 1]
                                         [--mosquitto] [--processes]

Ten members share a region of 10,000 frames, every frame at consensus with every
member's vote. The swarm splits: seven nodes on one broker, three on another (a network
split; by default two embedded brokers, with --mosquitto two private Mosquitto processes).
Each side changes its own half of 1 % of the frames: the large side reaches consensus, the
small one cannot (no quorum). Then the small side joins the large side's broker, and the
clock runs until every node holds every version and vote of the changed frames, every
changed frame is at consensus on the same version everywhere, and every node's digest is
the same. With --history H, each frame that changes had been written H times before the split
(a frame's history grows with every write; anti-entropy's exchange should not).

Printed, measured in this one run:
  - heal time;
  - anti-entropy bytes (digest, sync-req, sync-resp payloads delivered to nodes; a pull's
    envelopes travel packed: shared/packing.py);
  - the minimal bytes: for each node, the signed envelopes it lacked when the split healed
    (the other side's diffs and the votes on them), each counted once — and the diffs
    alone, which is the lower figure the goal names, as signed and as a pull would pack them;
  - consensus traffic after the heal (the votes nodes cast on what they received), apart;
  - the trace catch-up (trace-head, trace-req, trace-resp: each node's copies of the other
    side's traces), apart, and everything the nodes were delivered while healing.

The frames' starting state is built directly in one SQLite store through the store's API
(signed diffs and votes, as the nodes would have stored them) and copied to every node:
writing 10,000 frames with 10 votes each through a live swarm would take minutes and
measures something else.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from edgeswarm.broker.embedded import EmbeddedBroker
from edgeswarm.broker.mosquitto import MosquittoProcess
from edgeswarm.node import Config, Node
from edgeswarm.node.harness import COMMANDS, NodeProcess
from edgeswarm.node.store import Frame, Store
from edgeswarm.shared import diff, packing
from edgeswarm.shared.clock import HybridClock
from edgeswarm.shared.envelope import encode
from edgeswarm.shared.identity import Identity

REGION = "plant/line1"
SYNC_KINDS = ("digest", "sync-req", "sync-resp")
TRACE_KINDS = ("trace", "trace-head", "trace-req", "trace-resp")
TIMEOUT = 120.0


def seed_store(path: Path, identities: list[Identity], frames: int, deep: set[str] = frozenset(),
               history: int = 1) -> tuple[dict[str, int], int]:
    """Every frame written by one member (the frames in `deep` `history` times) and its
    last version voted by all, at consensus. Returns each member's last sequence number and
    the last clock."""
    clock = HybridClock(0)
    seqs = {i.node_id: 0 for i in identities}
    store = Store(path)
    versions = {}
    with store.transaction():
        for f in range(frames):
            key, author = f"f{f:05d}", identities[f % len(identities)]
            parent, old = None, None
            for n in range(1, 1 + (history if key in deep else 1)):
                value = {"reading": f * 0.25 + n - 1, "unit": "C", "sensor": f"s{f % 97}"}
                version = diff.version_hash(REGION, key, parent, value)
                seqs[author.node_id] += 1
                t = clock.now()
                env = encode(author, "diff", REGION, seqs[author.node_id], t,  # (its author's vote too)
                             {"key": key, "parent": parent, "version": version, "ops": diff.make(old, value),
                              "round": n})
                store.add_version(REGION, key, version, (parent,) if parent else (), value, author.node_id, t, n)
                store.add_diff(env.msg_id, author.node_id, env.seq, REGION, key, version, parent, env.raw, "applied")
                store.add_vote(REGION, key, author.node_id, n, version, env.raw)
                versions[version] = "consensus"
                parent, old = version, value
            for voter in identities:
                if voter is author:
                    continue
                seqs[voter.node_id] += 1
                vote = encode(voter, "vote", REGION, seqs[voter.node_id], clock.now(),
                              {"key": key, "version": version, "round": 1})
                store.add_vote(REGION, key, voter.node_id, 1, version, vote.raw)
            store.set_frame(REGION, key, Frame(version, version, 1, settled=True))
        store.set_states(versions)
        for i in identities:
            store.set_sender_window(i.node_id, i.public_key, seqs[i.node_id], 0, clock.now())
    store.close()
    return seqs, clock.now()


class Local:
    """A node in this process, driven like a node process (node/harness.py)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def start(self) -> Local:
        self.node.start()
        return self

    def stop(self) -> None:
        self.node.stop()

    def __getattr__(self, name: str):
        return partial(COMMANDS[name], self.node)


def same_digest(nodes: list) -> bool:
    """Every node's digest equal to the first's (read again while it still changes)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        target = nodes[0].digest("plant")
        if all(n.wait_digest("plant", target, 2.0) for n in nodes[1:]) and nodes[0].digest("plant") == target:
            return True
    return False


def lacking(stores: list[Store], keys: list[str]) -> tuple[int, int, int]:
    """(bytes of the envelopes each node lacks of what any node holds, bytes of the diffs
    among them, and of those diffs packed as a pull packs them), summed over nodes: what a
    perfect exchange would have to move. Of a
    voter's votes, those above the latest round the node holds of it (anti-entropy sends
    each voter's latest and the votes it moved away from, which fork choice reads)."""
    held = []
    for store in stores:
        have: dict[tuple, bytes] = {}
        latest: dict[tuple, int] = {}
        for k in keys:
            versions, votes = store.frame_items(REGION, k)
            have.update({("diff", v): raw for v, raw in versions if raw})
            have.update({("vote", k, voter, round_): raw for voter, round_, raw in votes})
            latest.update({(k, voter): round_ for voter, round_, _ in votes})  # (in round order)
        held.append((have, latest))
    every = {item: raw for have, _ in held for item, raw in have.items()}
    total = diffs = packed = 0
    for have, latest in held:
        lacked = {raw for item, raw in every.items()
                  if item not in have and (item[0] == "diff" or item[3] > latest.get(item[1:3], 0))}
        total += sum(map(len, lacked))  # (a diff that is its author's vote too counts once)
        lacked_diffs = [raw for item, raw in every.items() if item[0] == "diff" and item not in have]
        diffs += sum(map(len, lacked_diffs))
        packed += len(packing.pack(lacked_diffs)) if lacked_diffs else 0
    return total, diffs, packed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--small", type=int, default=3, help="nodes on the side without a quorum")
    p.add_argument("--frames", type=int, default=10_000)
    p.add_argument("--differ", type=float, default=0.01, help="share of frames changed during the split")
    p.add_argument("--history", type=int, default=1, help="versions each changed frame had before the split")
    p.add_argument("--mosquitto", action="store_true", help="two private Mosquitto brokers instead of embedded")
    p.add_argument("--processes", action="store_true", help="every node in its own process (default: all in this one)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_, ExitStack() as stack:
        tmp = Path(tmp_)
        homes = [tmp / f"n{i}" for i in range(args.nodes)]
        identities = [Identity.load_or_create(h / "node.key") for h in homes]
        members = [i.node_id for i in identities]
        changed = max(2, round(args.frames * args.differ))
        keys = [f"f{(f * 7919) % args.frames:05d}" for f in range(changed)]
        t0 = time.perf_counter()
        seqs, hlc = seed_store(tmp / "seed.db", identities, args.frames, set(keys), max(1, args.history))
        seed_s = time.perf_counter() - t0
        for identity, home in zip(identities, homes):
            shutil.copy(tmp / "seed.db", home / "store.db")
            store = Store(home / "store.db")
            store.set_meta("seq", seqs[identity.node_id])
            store.set_meta("hlc", hlc)
            store.close()
        if args.mosquitto:
            ports = [stack.enter_context(MosquittoProcess(tmp)).port for _ in range(2)]
            protocol = "5"
        else:
            ports = [stack.enter_context(EmbeddedBroker()).port, stack.enter_context(EmbeddedBroker()).port]
            protocol = "3.1.1"

        def node(i: int, port: int):
            # A long interval: the rounds measured are the ones nodes run when they (re)connect.
            config = Config(home=homes[i], regions=["plant"], broker_port=port, protocol=protocol, members=members,
                            sync_interval=3600, snapshot_interval=0)
            n = NodeProcess(config) if args.processes else Local(Node(config))
            stack.callback(n.stop)
            return n.start()

        big = args.nodes - args.small
        nodes = [node(i, ports[0] if i < big else ports[1]) for i in range(args.nodes)]
        side_keys = {"big": keys[: changed // 2], "small": keys[changed // 2:]}
        expected = {}
        for j, key in enumerate(side_keys["big"]):
            expected[key] = nodes[j % big].patch(REGION, key, {"reading": -1.0, "by": "big side"})
        for j, key in enumerate(side_keys["small"]):
            expected[key] = nodes[big + j % args.small].patch(REGION, key, {"reading": -2.0, "by": "small side"})
        big_side = {k: expected[k] for k in side_keys["big"]}
        small_side = {k: expected[k] for k in side_keys["small"]}
        for n in nodes[:big]:
            assert n.wait_consensus(REGION, big_side, TIMEOUT), "the big side did not settle"
        for n in nodes[big:]:
            assert n.wait_heads(REGION, small_side, TIMEOUT), "the small side did not settle"
        for side in (nodes[:big], nodes[big:]):  # each side in step within itself (all its votes in)
            assert same_digest(side), "a side did not settle"
        stores = [Store(h / "store.db") for h in homes]  # (read alongside the nodes)
        minimal, minimal_diffs, packed_diffs = lacking(stores, keys)
        for store in stores:
            store.close()

        # Heal: the small side joins the big side's broker.
        for n in nodes[big:]:
            n.stop()
        before = [Counter(n.counters()) for n in nodes[:big]]
        t0 = time.perf_counter()
        nodes = nodes[:big] + [node(i, ports[0]) for i in range(big, args.nodes)]
        before += [Counter() for _ in range(args.small)]
        wanted = list(expected.values())
        if not all(n.wait_versions(wanted, TIMEOUT) for n in nodes):
            raise SystemExit("the changed versions did not reach every node within the timeout")
        versions_s = time.perf_counter() - t0
        if not all(n.wait_consensus(REGION, expected, TIMEOUT) for n in nodes) or not same_digest(nodes):
            raise SystemExit("no convergence within the timeout: " + str([n.counters() for n in nodes]))
        heal_s = time.perf_counter() - t0
        moved = Counter()
        for n, b in zip(nodes, before):
            moved.update({k: v - b[k] for k, v in n.counters().items() if k.startswith(("bytes-in.", "sync."))})
        sync_bytes = sum(moved[f"bytes-in.{k}"] for k in SYNC_KINDS)
        live = moved["bytes-in.vote"] + moved["bytes-in.diff"]
        trace_bytes = sum(moved[f"bytes-in.{k}"] for k in TRACE_KINDS)
        everything = sum(v for k, v in moved.items() if k.startswith("bytes-in."))

    broker = "two private Mosquitto brokers" if args.mosquitto else "two embedded brokers"
    where = "one process per node" if args.processes else "all nodes in one process"
    print(f"partition heal, {args.nodes} nodes ({big} | {args.small}) x {args.frames:,} frames, {changed} changed "
          f"during the split ({args.differ:.1%}), each written {max(1, args.history)} time(s) before it, {broker}, "
          f"{where}; starting state built in {seed_s:.1f} s")
    print(f"  heal time (small side reconnects -> everything identical everywhere): {heal_s:.2f} s; "
          f"every changed version on every node after {versions_s:.2f} s")
    print(f"  anti-entropy bytes delivered: {sync_bytes:,} "
          f"(digest {moved['bytes-in.digest']:,}, sync-req {moved['bytes-in.sync-req']:,}, "
          f"sync-resp {moved['bytes-in.sync-resp']:,}); pulls {moved['sync.pulls']}, "
          f"envelopes taken {moved['sync.envelopes']} ({moved['sync.already-held']} of them also came live)")
    print(f"  minimal: the envelopes each node lacked {minimal:,} bytes -> ratio {sync_bytes / minimal:.3f}; "
          f"the differing diffs alone {minimal_diffs:,} bytes -> ratio {sync_bytes / minimal_diffs:.2f} "
          f"(those diffs packed as a pull packs them: {packed_diffs:,} bytes -> ratio {sync_bytes / packed_diffs:.2f})")
    print(f"  consensus traffic after the heal (votes cast on what arrived), apart: {live:,} bytes")
    print(f"  trace catch-up (the other side's trace entries), apart: {trace_bytes:,} bytes; everything delivered "
          f"to the nodes while healing (births and fingerprints too): {everything:,} bytes "
          f"({everything / minimal_diffs:.1f} times the differing diffs)")


if __name__ == "__main__":
    main()
