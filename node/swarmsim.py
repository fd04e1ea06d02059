"""`edgeswarm swarm-sim`: N node processes on one broker, a workload, and the swarm's figures.

Every node runs in its own process (as on its own board) through the node harness. The
nodes are the members of R regions and follow all of them. For `seconds`, W writers per
region write its frames at a steady rate, each from its own phase; now and then two
writers change the same frame at the same moment (a concurrent conflict: merged when the
changes touch different fields, kept as a fork when they touch the same one); and some
nodes that do not write lose power (SIGKILL) for a few seconds and come back on their
store. Then the load stops and the swarm is left to settle until every node's digest is
the same, and every node has copied every other node's trace (as the next scheduled round
would do).

Printed, measured in this one run:
  - convergence: the share of (node, frame) pairs whose consensus is the swarm's one
    (100 % when every node agrees on every frame), and whether the digests are equal;
  - frames lost: versions written and acknowledged by a writer that some node lacks;
  - conflicts: the share of frames with a kept fork, and the merges made;
  - latency: write to consensus on the writer, on each node, and on the last of them
    (p50, p99); a node counts for a write when it stayed up from the write until it
    reached consensus (one that lost power meanwhile catches up when it boots, which
    convergence and frames lost judge: its wait would be the length of the power cut);
  - trace depth: how many nodes' traces confirm each consensus version (averaged);
  - throughput: writes per second offered and brought to consensus everywhere, and what
    every frame cost: bytes on the bus (published by the nodes; delivered to them) and
    node CPU, trace copies included.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgeswarm.shared.identity import Identity

from .config import Config
from .harness import HarnessError, NodeProcess
from .metrics import percentile

KEYS = 20  # frames per region
SETTLE_TIMEOUT = 120.0


@dataclass
class Workload:
    nodes: int = 20
    regions: int = 2
    writers: int = 2  # per region
    rate: float = 5.0  # writes per second, per writer
    seconds: float = 10.0
    conflicts: float = 0.05  # share of writes made as a concurrent pair on one frame
    outages: int = 2  # nodes that lose power during the run
    outage_seconds: float = 3.0
    seed: int = 1
    voters: int = 0  # nodes that are members (vote; the writers among them), the others follow; 0: every node

    def check(self) -> None:
        if self.nodes < 2:
            raise ValueError("a swarm needs at least 2 nodes")
        if self.regions < 1 or self.writers < 1 or self.rate <= 0 or self.seconds <= 0:
            raise ValueError("regions, writers, rate and seconds must be positive")
        if self.regions * self.writers + self.outages > self.nodes:
            raise ValueError(f"{self.regions} regions x {self.writers} writers and {self.outages} outages "
                             f"need more than {self.nodes} nodes")
        if self.voters and not self.regions * self.writers <= self.voters <= self.nodes:
            raise ValueError(f"voters is between the {self.regions * self.writers} writers and the {self.nodes} nodes"
                             " (0: every node)")
        if not 0 <= self.conflicts <= 1:
            raise ValueError("conflicts is a share between 0 and 1")


class _Member:
    """One node process, the lock that serialises calls to it, and when it was down."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.proc = NodeProcess(config)
        self.lock = threading.Lock()
        self.down: list[tuple[int, int]] = []  # CLOCK_MONOTONIC ns intervals
        self.events = {"wrote": [], "consensus": []}
        self.sent = Counter()  # counters of the processes that were killed
        self.cpu_base = 0.0  # CPU seconds of the process when the load began (or it booted again)
        self.cpu = 0.0  # CPU seconds spent under the load by processes that were killed

    def call(self, name: str, *args):
        with self.lock:
            return getattr(self.proc, name)(*args)

    def collect(self) -> None:
        for kind, items in self.call("events").items():
            self.events[kind].extend(items)

    def up_between(self, a: float, b: float) -> bool:
        return not any(down <= b and a <= up for down, up in self.down)


def _write_loop(member: _Member, region: str, rng: random.Random, w: Workload, stop: float,
                errors: list[str]) -> None:
    """Steady writes: a value every 1/rate seconds (the pace of the sensor, not a wait),
    from a phase of its own: writers are separate devices, not ticks of one clock (in step,
    every writer's frame would land in the same instant and each write wait for the others)."""
    period, n = 1.0 / w.rate, 0
    start = time.monotonic() + rng.random() * period
    time.sleep(max(0.0, start - time.monotonic()))
    while time.monotonic() < stop:
        _guarded(member.call, errors, "patch", region, f"k{rng.randrange(KEYS)}", {"reading": rng.random(), "n": n})
        n += 1
        time.sleep(max(0.0, start + n * period - time.monotonic()))


def _conflict_loop(pairs: list[tuple[_Member, _Member, str]], rng: random.Random, w: Workload, stop: float,
                   errors: list[str]) -> None:
    """Two writers of a region change one frame at once, from their own processes."""
    total_rate = w.rate * w.writers * w.regions
    if w.conflicts <= 0:
        return
    period = 1.0 / (total_rate * w.conflicts)
    while time.monotonic() + period < stop:
        time.sleep(period)
        a, b, region = rng.choice(pairs)
        key = f"k{rng.randrange(KEYS)}"
        same_field = rng.random() < 0.5  # a fork; otherwise the changes merge
        changes = [{"reading": rng.random()} if same_field else {f"by{i}": rng.random()} for i in (0, 1)]
        threads = [threading.Thread(target=_guarded, args=(m.call, errors, "patch", region, key, c))
                   for m, c in zip((a, b), changes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _guarded(fn, errors: list[str], *args) -> None:
    try:
        fn(*args)
    except HarnessError as e:
        errors.append(str(e))


def _outage_loop(victims: list[_Member], w: Workload, stop: float, errors: list[str]) -> None:
    """Each victim in turn loses power in the middle of the run, then boots on its store."""
    if not victims:
        return
    step = w.seconds / (len(victims) + 1)
    for i, m in enumerate(victims, 1):
        time.sleep(max(0.0, stop - w.seconds + i * step - time.monotonic()))
        with m.lock:
            try:  # what it recorded and sent so far: lost with the process otherwise
                for kind, items in m.proc.events().items():
                    m.events[kind].extend(items)
                m.sent.update(m.proc.counters())
                m.cpu += m.proc.cpu() - m.cpu_base
            except HarnessError as e:
                errors.append(str(e))
            down = time.monotonic_ns()
            m.proc.kill()
            time.sleep(w.outage_seconds)  # (the length of the power cut)
            m.proc = NodeProcess(m.config)
            try:
                m.proc.start()
                m.cpu_base = m.proc.cpu()
            except HarnessError as e:
                errors.append(f"after a power cut: {e}")
            m.down.append((down, time.monotonic_ns()))


def _settle(members: list[_Member], root: str, timeout: float) -> bool:
    """Wait until every node's digest is the same: take the commonest digest and wait for
    it on the others; again until they agree or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        digests = [m.call("digest", root) for m in members]
        target, _ = Counter(digests).most_common(1)[0]
        if all(d == target for d in digests):
            return True
        for m, d in zip(members, digests):
            if d != target:
                m.call("wait_digest", root, target, max(0.1, min(5.0, deadline - time.monotonic())))
    return False


def run(w: Workload, broker_urls: list[str], protocol: str = "auto", home: Path | None = None,
        say=print) -> dict:
    w.check()
    rng = random.Random(w.seed)
    root = f"sim/{uuid.uuid4().hex[:8]}"  # this run's own tree: runs sharing a broker do not meet
    regions = [f"{root}/r{i}" for i in range(w.regions)]
    with tempfile.TemporaryDirectory(prefix="edgeswarm-sim-") as tmp:
        base = Path(home) if home else Path(tmp)
        homes = [base / f"node{i:02d}" for i in range(w.nodes)]
        ids = [Identity.load_or_create(Config(home=h).key_path).node_id for h in homes]
        # several brokers (a cluster's endpoints): node i starts on the i-th, the others to fail over to
        members = [_Member(Config(home=h, regions=[root], broker_urls=broker_urls[i % len(broker_urls):]
                                  + broker_urls[:i % len(broker_urls)], protocol=protocol,
                                  members=ids[:w.voters or None]))
                   for i, h in enumerate(homes)]
        started: list[_Member] = []
        try:
            t0 = time.monotonic()
            for m in members:
                m.proc.start()
                started.append(m)
            say(f"{w.nodes} node processes up in {time.monotonic() - t0:.1f} s; load for {w.seconds:g} s")
            return _drive(w, members, root, regions, rng)
        finally:
            for m in started:
                m.proc.stop()


def _drive(w: Workload, members: list[_Member], root: str, regions: list[str], rng: random.Random) -> dict:
    writers = {r: members[i * w.writers:(i + 1) * w.writers] for i, r in enumerate(regions)}
    victims = members[len(regions) * w.writers:][-w.outages:] if w.outages else []
    pairs = [(ws[0], ws[1], r) for r, ws in writers.items() if len(ws) > 1]
    errors: list[str] = []
    for m in members:
        m.cpu_base = m.call("cpu")
    start = time.monotonic()
    stop = start + w.seconds
    threads = [threading.Thread(target=_write_loop, args=(m, r, random.Random(rng.random()), w, stop, errors))
               for r, ws in writers.items() for m in ws]
    if pairs:
        threads.append(threading.Thread(target=_conflict_loop,
                                        args=(pairs, random.Random(rng.random()), w, stop, errors)))
    threads.append(threading.Thread(target=_outage_loop, args=(victims, w, stop, errors)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # the writers stop at `stop`; the last outage may end a little later
    quiet = time.monotonic()
    load_cpu = sum(m.cpu + m.call("cpu") - m.cpu_base for m in members)  # (every node is up again)
    settled = _settle(members, root, SETTLE_TIMEOUT)
    settle_s = time.monotonic() - quiet
    mirrored = _mirror_traces(members, SETTLE_TIMEOUT)
    for m in members:
        m.collect()
        m.cpu += m.call("cpu") - m.cpu_base
    return _figures(w, members, regions, settled, settle_s, stop - start, errors) | {
        "traces_mirrored": mirrored, "load_cores": load_cpu / (quiet - start), "cores": os.cpu_count()}


def _mirror_traces(members: list[_Member], timeout: float) -> bool:
    """Every node copies every other node's trace up to its head, as the next scheduled
    round would (pushed, or fetched where a push was missed): the CPU and bytes a write
    costs include the copies of the entries it made every node record (a run shorter than
    the sync interval would leave them out)."""
    deadline = time.monotonic() + timeout
    ids = [m.proc.node_id for m in members]
    heads = {i: m.call("trace_head", i) for m, i in zip(members, ids)}
    for m in members:
        m.call("sync_now")  # (its new trace entries and its head go out with its digests)
    return all(m.call("wait_trace", i, heads[i][0], max(0.1, deadline - time.monotonic()))
               for m in members for i in ids if heads[i])


def _figures(w: Workload, members: list[_Member], regions: list[str], settled: bool, settle_s: float,
             load_s: float, errors: list[str]) -> dict:
    written = {v: t for m in members for v, t in m.events["wrote"]}
    writer_of = {v: m for m in members for v, _ in m.events["wrote"]}
    reached = [{v: t for v, t in reversed(m.events["consensus"])} for m in members]  # first time each

    writer_ms, node_ms, everywhere_ms = [], [], []
    by_writer: dict[int, list[float]] = {}
    for v, t in written.items():
        i = members.index(writer_of[v])
        if v in reached[i]:
            writer_ms.append((reached[i][v] - t) / 1e6)
            by_writer.setdefault(i, []).append(writer_ms[-1])
        times = [r[v] for m, r in zip(members, reached) if v in r and m.up_between(t, r[v])]
        node_ms.extend((x - t) / 1e6 for x in times)
        # (every node that stayed up since the write reached it)
        if times and all(v in r or not m.up_between(t, math.inf) for m, r in zip(members, reached)):
            everywhere_ms.append((max(times) - t) / 1e6)

    lost = set()
    agree = pairs = 0
    for region in regions:
        keys = sorted({k for m in members for k in m.call("keys", region)})
        consensus = [m.call("consensus", region, keys) for m in members]
        for key in keys:
            common, _ = Counter(c[key] for c in consensus).most_common(1)[0]
            agree += sum(1 for c in consensus if c[key] == common and common is not None)
            pairs += len(consensus)
    versions = list(written)
    for m in members:
        if not m.call("has_versions", versions):
            lost.update(v for v in versions if not m.call("has_versions", [v]))
    counters = Counter()
    followed = Counter()  # (of the nodes that are not members)
    for i, m in enumerate(members):
        mine = Counter(m.call("counters"))
        mine.update(m.sent)
        counters.update(mine)
        if w.voters and i >= w.voters:
            followed.update(mine)
    metrics = [m.call("metrics") for m in members]
    conflict = [x["conflict_rate"] for x in metrics if x["conflict_rate"] is not None]
    depth = [x["trace_depth"] for x in metrics if x["trace_depth"] is not None]
    frames = max(1, len(written))
    bytes_out = sum(v for k, v in counters.items() if k.startswith("bytes-out."))
    bytes_in = sum(v for k, v in counters.items() if k.startswith("bytes-in."))
    return {
        "nodes": w.nodes, "writes": len(written), "errors": len(errors), "load_s": load_s,
        "settled": settled, "settle_s": settle_s,
        "convergence": agree / pairs if pairs else None, "lost": len(lost),
        "conflict_rate": sum(conflict) / len(conflict) if conflict else None,
        "trace_depth": sum(depth) / len(depth) if depth else None,
        "writer_ms": (percentile(writer_ms, 50), percentile(writer_ms, 99), len(writer_ms)),
        "by_writer_ms": [(percentile(ms, 50), percentile(ms, 99), len(ms)) for _, ms in sorted(by_writer.items())],
        "node_ms": (percentile(node_ms, 50), percentile(node_ms, 99), len(node_ms)),
        "everywhere_ms": (percentile(everywhere_ms, 50), percentile(everywhere_ms, 99), len(everywhere_ms)),
        "offered_per_s": len(written) / load_s,
        "bytes_out_per_frame": bytes_out / frames, "bytes_in_per_frame": bytes_in / frames,
        "bytes_in_by_kind": {k.removeprefix("bytes-in."): v / frames for k, v in counters.items()
                             if k.startswith("bytes-in.")},
        "cpu_ms_per_write": sum(m.cpu for m in members) * 1000 / frames,
        "first_errors": errors[:3],
        "followers_votes_out": followed["bytes-out.vote"] + followed["bytes-out.diff"],
    }


def _ms(figure: tuple) -> str:
    p50, p99, n = figure
    return f"p50 {p50:,.1f} ms, p99 {p99:,.1f} ms (of {n:,})" if n else "none measured"


def report(w: Workload, f: dict, broker: str) -> str:
    conflict = "none" if f["conflict_rate"] is None else f"{f['conflict_rate'] * 100:.1f} % of frames kept a fork"
    following = w.nodes - w.voters if w.voters else 0  # (nodes that are not members)
    lines = [
        f"swarm-sim: {w.nodes} nodes on {broker}"
        + (f", {w.voters} of them voting members" if following else "")
        + f"; {w.regions} regions x {w.writers} writers at {w.rate:g}/s "
        f"for {w.seconds:g} s, {w.conflicts * 100:g} % of writes in concurrent pairs, "
        f"{w.outages} power cuts of {w.outage_seconds:g} s",
        f"  convergence {f['convergence'] * 100:.1f} % of (node, frame) on the same consensus; digests "
        + (f"equal after {f['settle_s']:.1f} s of quiet" if f["settled"] else f"NOT equal after {SETTLE_TIMEOUT:g} s"),
        f"  frames lost: {f['lost']} of {f['writes']} written" + (f"; {f['errors']} writes failed: "
                                                                    f"{f['first_errors']}" if f["errors"] else ""),
        f"  conflicts: {conflict}",
        f"  write -> consensus: on the writer {_ms(f['writer_ms'])}; on each node {_ms(f['node_ms'])}; "
        f"on every node up since the write {_ms(f['everywhere_ms'])}",
        *([f"  diffs and votes published by the nodes that are not members ({following}): "
           f"{f['followers_votes_out']:,} B"] if following else []),
        "  on the writer, each writer's p50 / p99: " + ", ".join(f"{p50:,.0f} / {p99:,.0f} ms"
                                                              for p50, p99, _ in f["by_writer_ms"]),
        f"  trace depth {f['trace_depth'] or 0:.1f} (nodes whose trace confirms a consensus version"
        + (", every trace copied everywhere)" if f.get("traces_mirrored") else "; traces NOT all copied)"),
        f"  throughput {f['offered_per_s']:.1f} writes/s; per frame {f['bytes_out_per_frame']:,.0f} B published, "
        f"{f['bytes_in_per_frame']:,.0f} B delivered; {f['cpu_ms_per_write']:,.1f} ms of node CPU (all nodes)",
        f"  node CPU while the load ran: {f['load_cores']:.2f} of this machine's {f['cores']} cores (the broker and "
        "this driver share them: near the cores, writes queue behind each other and the tail grows)",
        "  delivered per frame by kind: " + ", ".join(
            f"{kind} {n:,.0f} B" for kind, n in sorted(f["bytes_in_by_kind"].items(), key=lambda kv: -kv[1]) if n >= 1),
    ]
    return "\n".join(lines)
