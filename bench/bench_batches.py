"""CPU per frame of a writer and a reader of batches, in one process, without a broker.

    python bench/bench_batches.py [--frames 3000] [--batch 100] [--keys 50] [--runs 5]

Two members (quorum 2), each a Node with its real key and SQLite store, not connected: the
writer writes --frames frames in node.batch() blocks of --batch (changing --keys frames in
turn, as bench_brokers does); the messages each block leaves in its outbox go to the reader
as the batches the writer would have published (one per topic), and the votes the reader
casts on them back to the writer, which so reaches consensus on every frame. Measured with
time.process_time, per frame: the writer's batch (storing, signing, deciding), the reader
taking a batch (checking, applying, deciding, voting), the writer taking the reader's votes.
Both nodes run in this one thread, so each figure is the CPU of that step alone, without the
broker, the network threads or the other process that share the cores in bench_brokers.
--runs fresh pairs of nodes; the minimum and the median of each figure are printed (the
minimum is the least disturbed by other work on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from edgeswarm.node import Config, Node
from edgeswarm.shared.envelope import decode_many, encode_batch, encode_relay
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.merkle import MAX_LEAVES

REGION = "bench/batches"


def published(node: Node) -> list[tuple[str, bytes]]:
    """What the node's outbox holds, as the messages it would publish (its own messages in
    their item forms put back together per topic), and the outbox emptied."""
    rows = node.store.unpublished()
    node.store.mark_published([q.seq for q in rows])
    by_topic: dict[str, list[bytes]] = {}
    for q in rows:
        by_topic.setdefault(q.topic, []).append(q.envelope)
    out = []
    for topic, raws in by_topic.items():
        for i in range(0, len(raws), MAX_LEAVES):
            envs = decode_many(encode_relay(raws[i:i + MAX_LEAVES]), max_bytes=2**30)  # (each checked as it came)
            out.append((topic, encode_batch(node.identity, envs) if len(envs) > 1 else envs[0].raw))
    return out


def run(frames: int, batch: int, keys: int) -> tuple[float, float, float]:
    """(writer's batches, reader, writer taking votes), CPU µs per frame."""
    with tempfile.TemporaryDirectory() as tmp:
        homes = [Path(tmp) / name for name in ("writer", "reader")]
        members = [Identity.load_or_create(h / "node.key").node_id for h in homes]
        writer, reader = (Node(Config(home=h, regions=[REGION], members=members, sync_interval=0,
                                      snapshot_interval=0)) for h in homes)
        spent = [0.0, 0.0, 0.0]
        for start in range(0, frames, batch):
            t0 = time.process_time()
            with writer.batch():
                for i in range(start, min(start + batch, frames)):
                    writer.put(REGION, f"k{i % keys}", {"i": i, "reading": i * 0.5, "unit": "C"})
            spent[0] += time.process_time() - t0
            messages = published(writer)
            t0 = time.process_time()
            reader.receive_many(messages)
            spent[1] += time.process_time() - t0
            votes = published(reader)
            t0 = time.process_time()
            writer.receive_many(votes)
            spent[2] += time.process_time() - t0
            published(writer)
        decided = min(writer.counters["consensus"], reader.counters["consensus"])
        if decided < min(keys, frames):
            raise SystemExit(f"only {decided} frames reached consensus on both nodes")
        for node in (writer, reader):
            node.store.close()
        return tuple(s / frames * 1e6 for s in spent)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=3000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--keys", type=int, default=50)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    runs = [run(args.frames, args.batch, args.keys) for _ in range(args.runs)]
    print(f"{args.frames:,} frames in batches of {args.batch} over {args.keys} frames, {args.runs} runs; "
          "CPU per frame, minimum / median:")
    names = ("writer, its batches", "reader, taking them", "writer, taking the reader's votes")
    for i, name in enumerate(names):
        values = [r[i] for r in runs]
        print(f"  {name:<34} {min(values):6.0f} / {statistics.median(values):4.0f} µs")
    totals = [r[0] + r[2] for r in runs]
    print(f"  {'writer, in all':<34} {min(totals):6.0f} / {statistics.median(totals):4.0f} µs")


if __name__ == "__main__":
    main()
