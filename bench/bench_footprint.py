"""Footprint of a node with many frames on disk.

    python bench/bench_footprint.py [--frames 100000]

Writes the frames through the Node API into a fresh store (one node, a member alone, so
every write is also voted and reaches consensus locally), then starts that node in a new
process against an embedded broker, runs one anti-entropy round (which reads every
version of the region) and prints the process's resident memory before and after, with
the store's size on disk and the write rate.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeswarm.node import Config, Node
from edgeswarm.shared.identity import Identity

CHILD = """
import sys, time
from pathlib import Path
from edgeswarm.broker.embedded import EmbeddedBroker
from edgeswarm.node import Config, Node

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

home, member = Path(sys.argv[1]), sys.argv[2]
with EmbeddedBroker() as broker:
    node = Node(Config(home=home, regions=["bench"], broker_port=broker.port, protocol="3.1.1",
                       members=[member], sync_interval=0, snapshot_interval=0)).start()
    started = rss_mib()
    t0 = time.perf_counter()
    node.sync_now()
    took = time.perf_counter() - t0
    print(f"{started:.1f} {rss_mib():.1f} {took:.2f}")
    node.stop()
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=100_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "node"
        member = Identity.load_or_create(home / "node.key").node_id
        node = Node(Config(home=home, regions=["bench"], members=[member], sync_interval=0, snapshot_interval=0))
        t0 = time.perf_counter()
        for i in range(args.frames):
            node.put(f"bench/area{i % 100}", f"frame{i}", {"i": i, "reading": i * 0.25, "unit": "C"})
        wrote = time.perf_counter() - t0
        node.stop()
        size = sum(f.stat().st_size for f in home.glob("store.db*")) / 2**20
        out = subprocess.run([sys.executable, "-c", CHILD, str(home), member], capture_output=True, text=True,
                             check=True).stdout.split()
        started, after, digest_s = out
    print(f"{args.frames} frames written in {wrote:.1f} s ({args.frames / wrote:,.0f}/s, with trace and vote); "
          f"store {size:.1f} MiB on disk")
    print(f"node process (embedded broker included): RSS {started} MiB after start, {after} MiB after a digest "
          f"round over all frames ({digest_s} s)")


if __name__ == "__main__":
    main()
