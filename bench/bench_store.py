"""What a change costs a member of a swarm: bytes on its card and CPU to take it in.

    python bench/bench_store.py [--members 20] [--changes 500] [--keys 10] [--round-every 50]

One node (real key, real SQLite store, no broker) receives what a swarm of `--members`
sends for each change of `--changes` spread over `--keys` frames: the writer's signed diff
and the signed votes of the other members, each voting for every new version in its next
round. Printed, measured in this one run:
  - the store's bytes per change (SQLite's dbstat), and how much each table grew per change
    over the second half of the run, with the scheduled rounds compacting the vote history
    (free pages are what the rounds freed and the next writes reuse);
  - the receiving node's CPU per change, messages handled one at a time (a quiet swarm:
    each in its own transaction) and as they come in bursts (one transaction per change's
    messages), with its share spent deciding (fork choice and consensus);
  - what the rounds' compaction of the vote history drops, and its CPU;
  - what a change costs the card: SQL statements and pages appended to the write-ahead log
    per change (a third receiver, in bursts, counting; SQLite's own checkpoints off for it,
    so the log keeps every page its COMMITs wrote), and the bytes a receiver running as a
    node does (checkpoints in a thread, once a second; messages at ~100 changes a second)
    has the kernel write to storage per change (/proc/self/io write_bytes: the log, and the
    checkpoints' pages in the file);
  - a lone node's put latency (`--puts` writes, wall clock), with SQLite checkpointing its
    write-ahead log in whichever COMMIT crosses 1,000 pages, and in a thread of its own (as
    a running node does: Store.checkpoint_in_background).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from pathlib import Path

from edgeswarm.node import Config, Node
from edgeswarm.shared.clock import HybridClock
from edgeswarm.shared.envelope import encode
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.topics import region_topic

REGION = "bench/store"


def swarm_messages(home: Path, ids: list[Identity], changes: int, keys: int) -> list[list[tuple[str, bytes]]]:
    """Per change: [the writer's diff and vote], then [the other members' votes] (the
    receiver, ids[1], votes by itself)."""
    members = [i.node_id for i in ids]
    writer = Node(Config(home=home, regions=[REGION], members=members, sync_interval=0), identity=ids[0])
    clock, seqs, rounds, out = HybridClock(0), {}, {}, []
    try:
        for n in range(changes):
            key = f"k{n % keys}"
            version = bytes.fromhex(writer.put(REGION, key, {"n": n, "reading": n * 0.25, "unit": "C"}))
            sent = writer.store.unpublished()
            writer.store.mark_published([item.seq for item in sent])
            out.append([(item.topic, item.envelope) for item in sent])  # its diff, and its vote
            votes = []
            for voter in ids[2:]:
                seqs[voter.node_id] = seqs.get(voter.node_id, 0) + 1
                r = rounds[(voter.node_id, key)] = rounds.get((voter.node_id, key), 0) + 1
                env = encode(voter, "vote", REGION, seqs[voter.node_id], clock.now(),
                             {"key": key, "version": version, "round": r})
                votes.append((region_topic("vote", REGION), env.raw))
            out.append(votes)
    finally:
        writer.stop()
    return out


def receiver(home: Path, ids: list[Identity]) -> Node:
    """A fresh member, ids[1], that receives what swarm_messages made (no broker)."""
    return Node(Config(home=home, regions=[REGION], members=[i.node_id for i in ids], sync_interval=0),
                identity=ids[1])


def acknowledge(node: Node) -> None:
    """The broker acknowledges what the node sent, as the node takes it: the outbox rows go
    with its next transaction."""
    node._on_ack(tuple(item.seq for item in node.store.unpublished()))


def receive(home: Path, ids: list[Identity], messages: list[list[tuple[str, bytes]]], one_by_one: bool,
            round_every: int) -> tuple[Node, float, float, float, list[dict[str, int]]]:
    """A fresh receiver takes the messages, with a scheduled round's compaction of the vote
    history every `round_every` changes; (node, CPU seconds taking messages, of which
    deciding, CPU seconds compacting, the store's bytes by table at half way and at the end)."""
    node = receiver(home, ids)
    deciding, compacting, sizes = [0.0], 0.0, []
    decide = node._reconsider

    def timed(region: str, key: str) -> None:
        t = time.process_time()
        decide(region, key)
        deciding[0] += time.process_time() - t
    node._reconsider = timed
    cpu = 0.0
    changes = len(messages) // 2  # (two groups per change)
    for n, group in enumerate(messages, start=1):
        t0 = time.process_time()
        if one_by_one:
            for message in group:
                node.receive(*message)
        else:
            node.receive_many(group)
        acknowledge(node)
        cpu += time.process_time() - t0
        if n % 2 == 0 and (n // 2 % round_every == 0 or n // 2 == changes):
            t0 = time.process_time()
            node.compact_votes()
            compacting += time.process_time() - t0
        if n % 2 == 0 and n // 2 in (changes // 2, changes):
            sizes.append(table_bytes(node.store.path))
    return node, cpu, deciding[0], compacting, sizes


class _Counting:
    """A store connection that counts the statements run through it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn, self.statements = conn, 0

    def execute(self, *args):
        self.statements += 1
        return self.conn.execute(*args)

    def executemany(self, *args):
        self.statements += 1
        return self.conn.executemany(*args)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)


def card_cost(home: Path, ids: list[Identity], messages: list[list[tuple[str, bytes]]]) -> tuple[float, float, int]:
    """(SQL statements, pages appended to the write-ahead log) per change for a fresh
    receiver taking the messages in bursts, and the page size."""
    node = receiver(home, ids)
    try:
        conn = node.store.db.conn
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        counting = node.store.db.conn = _Counting(conn)
        for group in messages:
            node.receive_many(group)
            acknowledge(node)
        wal = Path(f"{node.store.path}-wal").stat().st_size
        changes = len(messages) // 2
        return counting.statements / changes, (wal - 32) / (page + 24) / changes, page  # (its header; a frame's)
    finally:
        node.stop()


def storage_bytes(home: Path, ids: list[Identity], messages: list[list[tuple[str, bytes]]]) -> float | None:
    """Bytes written to storage per change by a receiver that checkpoints as a running node
    does (None where /proc/self/io is not there)."""
    io = Path("/proc/self/io")
    if not io.exists():
        return None

    def written() -> int:
        return next(int(line.split()[1]) for line in io.read_text().splitlines() if line.startswith("write_bytes"))
    node = receiver(home, ids)
    node.store.checkpoint_in_background()
    os.sync()
    before = written()
    for group in messages:
        node.receive_many(group)
        acknowledge(node)
        time.sleep(0.005)  # (a swarm's pace, so that checkpoints fall between changes as they do)
    node.stop()  # (its last checkpoint)
    os.sync()
    return (written() - before) / (len(messages) // 2)


def put_latency(home: Path, puts: int, apart: bool) -> list[float]:
    """Seconds each of `puts` puts took on a node with no broker, sorted."""
    node = Node(Config(home=home, regions=[REGION], sync_interval=0))
    if apart:
        node.store.checkpoint_in_background()
    took = []
    try:
        for n in range(puts):
            t0 = time.perf_counter()
            node.put(REGION, f"k{n % 200}", {"n": n, "reading": n * 0.25, "unit": "C", "note": "x" * 100})
            took.append(time.perf_counter() - t0)
    finally:
        node.store.close()
    return sorted(took)


def table_bytes(path: Path) -> dict[str, int]:
    """Bytes by table (indexes with their table), and free pages."""
    groups: dict[str, int] = {}
    with sqlite3.connect(path) as db:
        for name, size in db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            table = next((t for t in ("votes", "latest", "trace", "diffs", "versions") if t in name), "other")
            groups[table] = groups.get(table, 0) + size
        groups["free pages"] = db.execute("PRAGMA freelist_count").fetchone()[0] * db.execute(
            "PRAGMA page_size").fetchone()[0]
    return groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=20, help="members of the swarm (at least 2)")
    p.add_argument("--changes", type=int, default=500)
    p.add_argument("--keys", type=int, default=10, help="frames the changes are spread over")
    p.add_argument("--round-every", type=int, default=50, help="changes between two scheduled rounds")
    p.add_argument("--puts", type=int, default=6000, help="puts timed for the checkpoint comparison")
    args = p.parse_args()
    if args.members < 2:
        p.error("--members is at least 2")
    ids = [Identity.generate() for _ in range(args.members)]
    with tempfile.TemporaryDirectory() as tmp:
        messages = swarm_messages(Path(tmp) / "writer", ids, args.changes, args.keys)
        results = {}
        for label, one_by_one in (("one at a time", True), ("in bursts", False)):
            home = Path(tmp) / label.replace(" ", "-")
            node, cpu, deciding, compacting, sizes = receive(home, ids, messages, one_by_one, args.round_every)
            results[label] = (cpu, deciding, node.counters["consensus"], node.counters["votes-compacted"],
                              compacting, sizes)
            node.stop()
        n = args.changes
        print(f"a member of a {args.members}-member swarm, {n} changes of {args.keys} frames "
              f"(a diff and {args.members - 1} votes each), a round every {args.round_every} changes")
        for label, (cpu, deciding, reached, *_) in results.items():
            if reached != n:
                raise SystemExit(f"{label}: {reached} of {n} changes reached consensus")
            print(f"  CPU per change, messages {label}: {cpu / n * 1000:.2f} ms"
                  f" ({deciding / cpu * 100:.0f} % deciding)")
        _, _, _, compacted, compacting, (half, end) = results["in bursts"]
        statements, pages, page = card_cost(Path(tmp) / "counted", ids, messages)
        print(f"  the card: {statements:.1f} SQL statements and {pages:.1f} pages of {page:,} B"
              f" ({pages * page / 1024:.0f} KiB) appended to the write-ahead log per change (taken in bursts,"
              f" acknowledged as they go)")
        stored = storage_bytes(Path(tmp) / "checkpointed", ids, messages)
        if stored is not None:
            print(f"  written to storage per change by a receiver checkpointing as a node does:"
                  f" {stored / 1024:.0f} KiB")
        print(f"  the rounds' compaction dropped {compacted:,} of {n * args.members:,} votes"
              f" ({compacting / n * 1000:.3f} ms CPU per change)")
        grown = {t: end.get(t, 0) - half.get(t, 0) for t in end}
        second = n - n // 2
        print(f"  store: {sum(end.values()) / n:,.0f} B per change in all; over the second half it grew"
              f" {sum(grown.values()) / second:,.0f} B per change, by table (with indexes):")
        for table, size in sorted(grown.items(), key=lambda i: -i[1]):
            print(f"    {table:<11}{size / second:>7,.0f} B per change")
        print(f"a lone node's put, {args.puts:,} puts over 200 frames, wall clock (ms):")
        for label, apart in (("log checkpointed in COMMIT", False), ("in a thread of its own", True)):
            took = put_latency(Path(tmp) / f"puts-{apart}", args.puts, apart)
            q = {name: took[min(len(took) - 1, int(len(took) * f))] * 1000
                 for name, f in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))}
            print(f"  {label:<27} mean {sum(took) / len(took) * 1000:.2f}, p50 {q['p50']:.2f}, "
                  f"p99 {q['p99']:.2f}, p99.9 {q['p99.9']:.2f}, max {took[-1] * 1000:.1f}")


if __name__ == "__main__":
    main()
