"""Each node in its own process, as on its own board: network cuts, splits and heals."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from edgeswarm.broker.embedded import EmbeddedBroker
from edgeswarm.node import Config
from edgeswarm.node.harness import HarnessError, NodeProcess
from edgeswarm.shared.envelope import canonical, encode
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.topics import node_topic

from helpers import same_digest
from netcut import Link

TIMEOUT = 60.0


def test_node_cut_off_by_the_network_catches_up_on_1000_frames(tmp_path, broker, region):
    homes = [tmp_path / name for name in ("a", "b", "cut")]
    members = [Identity.load_or_create(h / "node.key").node_id for h in homes]

    def config(home, port):
        return Config(home=home, regions=[region], broker_host=broker.host, broker_port=port,
                      protocol=broker.protocol, members=members, sync_interval=2, snapshot_interval=0)
    with Link(broker.host, broker.port) as link, ExitStack() as stack:
        a = stack.enter_context(NodeProcess(config(homes[0], broker.port)))
        b = stack.enter_context(NodeProcess(config(homes[1], broker.port)))
        # Behind a link the test cuts, with no broker session kept for it: what it misses
        # can only come back by anti-entropy.
        cut = stack.enter_context(NodeProcess(config(homes[2], link.port), persistent=False))
        first = a.put(region, "first", {"i": -1})
        assert cut.wait_versions([first], TIMEOUT)

        link.cut()
        versions = a.put_many(region, [[f"f{i:04d}", {"i": i}] for i in range(1000)])
        keys = [f"f{i:04d}" for i in range(1000)]
        assert b.wait_versions(versions, TIMEOUT)
        assert not cut.has_versions(versions[:1])  # it was cut off indeed
        link.restore()

        assert cut.wait_versions(versions, TIMEOUT), cut.counters()
        expected = dict(zip(keys, versions))
        for n in (a, b, cut):
            assert n.wait_consensus(region, expected, TIMEOUT), n.counters()
        assert same_digest([a, b, cut], region, TIMEOUT)
        moved = cut.counters()
        assert moved["sync.envelopes"] >= 1000 and moved.get("rejected.internal", 0) == 0


def test_split_halves_of_six_processes_converge_with_forks_kept(tmp_path, region):
    """Six members on two brokers (a network split): neither half has a quorum of four;
    both write, some frames in conflict. Healed onto one broker, they converge."""
    homes = [tmp_path / f"n{i}" for i in range(6)]
    members = [Identity.load_or_create(h / "node.key").node_id for h in homes]
    with EmbeddedBroker() as left, EmbeddedBroker() as right, ExitStack() as stack:
        def node(home, broker):
            return stack.enter_context(NodeProcess(Config(
                home=home, regions=[region], broker_port=broker.port, protocol="3.1.1", members=members,
                sync_interval=0, snapshot_interval=0)))
        nodes = [node(h, left if i < 3 else right) for i, h in enumerate(homes)]
        first, second = nodes[0], nodes[3]
        for i in range(10):  # frames written on both sides: same key (conflict), other keys (merge)
            first.put(region, f"shared{i}", {"v": f"left {i}"})
            second.put(region, f"shared{i}", {"v": f"right {i}"})
            first.put(region, f"joint{i}", {"left": i})
            second.put(region, f"joint{i}", {"right": i})
        left_versions = first.put_many(region, [[f"left{i}", {"v": i}] for i in range(10)])
        right_versions = second.put_many(region, [[f"right{i}", {"v": i}] for i in range(10)])
        keys = [f"{kind}{i}" for kind in ("shared", "joint", "left", "right") for i in range(10)]
        for n in nodes:  # each half sees its own writes but reaches no consensus
            assert n.wait_versions(left_versions if n in nodes[:3] else right_versions, TIMEOUT)
            assert set(n.consensus(region, keys).values()) == {None}
        # each half settles (every vote of it held by all of it: the votes for a version go
        # through its author, so they are not all there the moment the versions are)
        assert same_digest(nodes[:3], region, TIMEOUT) and same_digest(nodes[3:], region, TIMEOUT)

        for n in nodes[3:]:  # heal: the right half joins the left broker
            n.stop()
        nodes = nodes[:3] + [node(h, left) for h in homes[3:]]
        for n in nodes:
            n.sync_now()
        assert same_digest(nodes, region, TIMEOUT)
        views = [n.status(region, keys) for n in nodes]
        for view in views:
            assert all(s["consensus"] and s["consensus"] == s["head"] for s in view.values()), view
        assert len({repr(sorted((k, s["consensus"], s["forks"]) for k, s in v.items())) for v in views}) == 1
        view = views[0]
        assert all(len(view[f"shared{i}"]["forks"]) == 1 for i in range(10)), "a conflict lost its fork"
        assert all(not view[f"{kind}{i}"]["forks"] for kind in ("joint", "left", "right") for i in range(10))
        for i in range(10):  # the disjoint edits were merged, identically everywhere
            assert {repr(n.get(region, f"joint{i}", True)) for n in nodes} == {repr({"left": i, "right": i})}


def test_wiped_board_rebuilds_from_a_peer_snapshot_then_syncs(tmp_path, broker, region):
    """A board whose store is garbage: its node refuses to start and says how to recover;
    `edgeswarm restore --file` with a peer's snapshot brings it back, and sync brings what
    happened after the snapshot."""
    homes = [tmp_path / name for name in ("a", "b", "wiped")]
    members = [Identity.load_or_create(h / "node.key").node_id for h in homes]
    configs = [Config(home=h, regions=[region], broker_host=broker.host, broker_port=broker.port,
                      protocol=broker.protocol, members=members, sync_interval=2, snapshot_interval=0)
               for h in homes]
    with ExitStack() as stack:
        a, b = (stack.enter_context(NodeProcess(c)) for c in configs[:2])
        wiped = NodeProcess(configs[2]).start()
        stack.callback(wiped.stop)
        versions = a.put_many(region, [[f"k{i}", {"i": i}] for i in range(5)])
        expected = dict(zip([f"k{i}" for i in range(5)], versions))
        assert b.wait_consensus(region, expected, TIMEOUT) and wiped.wait_consensus(region, expected, TIMEOUT)
        snapshot = Path(b.snapshot())
        wiped.sync_now()  # its peers hold its trace as it was before the wipe
        old_head = wiped.trace_head(members[2])
        assert a.wait_trace(members[2], old_head[0], TIMEOUT) and b.wait_trace(members[2], old_head[0], TIMEOUT)
        wiped.stop()

        (homes[2] / "store.db").write_bytes(b"not sqlite at all" * 50)
        with pytest.raises(HarnessError, match="cannot open store.*`edgeswarm restore`"):
            wiped.start()
        restore = subprocess.run([sys.executable, "-m", "edgeswarm.node.cli", "--home", str(homes[2]), "restore",
                                  "--file", str(snapshot)], capture_output=True, text=True, timeout=TIMEOUT)
        assert restore.returncode == 0 and "restored 5 frames" in restore.stdout, restore.stderr

        expected["k1"] = a.patch(region, "k1", {"after": "snapshot"})  # after the snapshot
        assert b.wait_consensus(region, expected, TIMEOUT)
        wiped.start()
        assert wiped.wait_consensus(region, expected, TIMEOUT), wiped.counters()
        assert wiped.get(region, "k1", True) == {"i": 1, "after": "snapshot"}
        assert same_digest([a, b, wiped], region, TIMEOUT)
        # Its trace goes on from a new start, above anything it wrote before the wipe: its
        # peers take that (the entries between are gone) rather than see a rewritten history.
        wiped.sync_now()
        trace_head = wiped.trace_head(members[2])
        for peer in (a, b):
            assert peer.wait_trace(members[2], trace_head[0], TIMEOUT), peer.counters()
            assert members[2] not in peer.flagged() and peer.counters().get("trace.forks", 0) == 0


def test_a_rewritten_trace_entry_is_caught_by_node_processes(tmp_path, broker, region, attacker):
    """A node's key signs a second, different first entry of its trace (a rewrite of its
    history): peers holding the original flag it."""
    homes = [tmp_path / name for name in ("a", "b")]
    identities = [Identity.load_or_create(h / "node.key") for h in homes]
    configs = [Config(home=h, regions=[region], broker_host=broker.host, broker_port=broker.port,
                      protocol=broker.protocol, members=[i.node_id for i in identities], sync_interval=0,
                      snapshot_interval=0) for h in homes]
    with ExitStack() as stack:
        a, b = (stack.enter_context(NodeProcess(c)) for c in configs)
        version = a.put(region, "door", {"locked": True})
        assert b.wait_consensus(region, {"door": version}, TIMEOUT)
        seq, _ = a.trace_head(a.node_id)
        a.sync_now()  # its trace head goes out; b fetches the entries and checks the chain
        assert b.wait_trace(a.node_id, seq, TIMEOUT)

        forged = canonical([1, None, 1, "wrote", {"region": region, "key": "door", "version": bytes(32)}])
        key = identities[0]
        attacker.send(node_topic(b.node_id, "trace-resp"), encode(
            key, "trace-resp", None, 10**9, 10**9, {"entries": [[forged, key.sign(forged)]]}).raw)
        assert b.wait_counter("trace.forks", 1, TIMEOUT), b.counters()
        assert a.node_id in b.flagged()


def test_swarm_sim_converges_with_conflicts_and_power_cuts(broker):
    """`edgeswarm swarm-sim`: node processes, concurrent writers, a node losing power; the
    command fails unless every node ends on the same state with no write lost. Four of the
    five are members; the fifth, the one that loses power, follows them."""
    out = subprocess.run([sys.executable, "-m", "edgeswarm.node.cli", "swarm-sim", "--nodes", "5", "--regions", "1",
                          "--writers", "2", "--rate", "4", "--seconds", "3", "--conflicts", "0.2", "--outages", "1",
                          "--voters", "4",
                          "--broker", f"mqtt://{broker.host}:{broker.port}", "--protocol", broker.protocol],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 of them voting members" in out.stdout, out.stdout
    assert "diffs and votes published by the nodes that are not members (1): 0 B" in out.stdout, out.stdout
    assert "convergence 100.0 %" in out.stdout and "frames lost: 0 of" in out.stdout, out.stdout
    written = int(out.stdout.split("frames lost: 0 of ")[1].split()[0])
    assert written >= 20, out.stdout  # 2 writers x 4/s x 3 s, and the conflicting pairs
    cores = float(out.stdout.split("node CPU while the load ran: ")[1].split()[0])
    assert 0 < cores <= (os.cpu_count() or 1), out.stdout
