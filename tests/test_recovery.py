"""Crashes and partitions: nothing acknowledged is lost, split halves converge."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from edgeswarm.broker.embedded import EmbeddedBroker
from edgeswarm.node import Config, Node
from edgeswarm.shared.identity import Identity

TIMEOUT = 30.0

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edgeswarm.node import Config, Node
    home, port, protocol, region = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    node = Node(Config(home=Path(home), regions=[region], broker_port=port, protocol=protocol,
                       sync_interval=0, snapshot_interval=0)).start()
    for i in range(100000):
        print(node.put(region, f"k{i % 200}", {"i": i}), flush=True)
""")


def test_kill_9_during_writes_loses_no_acknowledged_frame(tmp_path, broker, region):
    reader = Node(Config(home=tmp_path / "reader", regions=[region], broker_host=broker.host,
                         broker_port=broker.port, protocol=broker.protocol, sync_interval=0)).start()
    writer_home = tmp_path / "writer"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(writer_home), str(broker.port), broker.protocol,
                             region], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    try:
        for line in proc.stdout:  # every line is a put() that returned
            acknowledged.append(bytes.fromhex(line.strip()))
            if len(acknowledged) == 300:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(TIMEOUT)
        assert proc.returncode == -signal.SIGKILL
        # the board comes back: what it stored but had not sent goes out now
        restarted = Node(Config(home=writer_home, regions=[region], broker_host=broker.host,
                                broker_port=broker.port, protocol=broker.protocol, sync_interval=0)).start()
        try:
            missing = lambda: [v for v in acknowledged if not reader.store.has_version(v)]  # noqa: E731
            assert reader.wait_until(lambda: not missing(), TIMEOUT), f"{len(missing())} acknowledged frames lost"
            assert restarted.wait_published(TIMEOUT) and not restarted.store.unpublished()
        finally:
            restarted.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.stop()


def test_split_swarm_heals_with_identical_hashes_and_forks(tmp_path, region):
    """Six members on two brokers (a network split): neither half has a quorum of four;
    both write, some frames in conflict. Healed onto one broker, they converge."""
    homes = [tmp_path / f"n{i}" for i in range(6)]
    members = [Identity.load_or_create(h / "node.key").node_id for h in homes]
    with EmbeddedBroker() as left, EmbeddedBroker() as right:
        def node(home, broker):
            return Node(Config(home=home, regions=[region], broker_port=broker.port, protocol="3.1.1",
                               members=members, sync_interval=0, snapshot_interval=0)).start()
        nodes = [node(h, left if i < 3 else right) for i, h in enumerate(homes)]
        try:
            first, second = nodes[0], nodes[3]
            for i in range(10):  # frames written on both sides: same key (conflict), other keys (merge)
                first.put(region, f"shared{i}", {"v": f"left {i}"})
                second.put(region, f"shared{i}", {"v": f"right {i}"})
                first.put(region, f"joint{i}", {"left": i})
                second.put(region, f"joint{i}", {"right": i})
            for i in range(10):
                first.put(region, f"left{i}", {"v": i})
                second.put(region, f"right{i}", {"v": i})
            keys = [f"{kind}{i}" for kind in ("shared", "joint", "left", "right") for i in range(10)]
            for n in nodes:  # each half sees its own writes but reaches no consensus
                side = "left" if n in nodes[:3] else "right"
                assert n.wait_until(lambda n=n, s=side: all(n.head(region, f"{s}{i}") for i in range(10)), TIMEOUT)
                assert all(n.consensus(region, k) is None for k in keys)

            for n in nodes[3:]:  # heal: the right half joins the left broker
                n.stop()
            healed = nodes[:3] + [node(h, left) for h in homes[3:]]
            nodes = healed
            for n in nodes:
                n.sync_now()

            def settled(n):
                return all((s := n.status(region, k))["consensus"] and s["consensus"] == s["head"] for k in keys)
            for n in nodes:
                assert n.wait_until(lambda n=n: settled(n), TIMEOUT), n.stats()
            views = {n.node_id: {k: (n.status(region, k)["consensus"], tuple(n.status(region, k)["forks"]))
                                 for k in keys} for n in nodes}
            assert len({tuple(sorted(v.items())) for v in views.values()}) == 1, "the halves disagree"
            view = next(iter(views.values()))
            assert all(len(view[f"shared{i}"][1]) == 1 for i in range(10)), "a conflict lost its fork"
            assert all(not view[f"{kind}{i}"][1] for kind in ("joint", "left", "right") for i in range(10))
            for i in range(10):  # the disjoint edits were merged, identically everywhere
                assert {n.get(region, f"joint{i}", consensus=True)["left"] for n in nodes} == {i}
                assert nodes[0].consensus(region, f"joint{i}").value == {"left": i, "right": i}
        finally:
            for n in nodes:
                n.stop()
