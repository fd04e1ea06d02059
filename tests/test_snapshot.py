"""Snapshots: write, restore into a wiped or new node, then catch up by sync."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeswarm.node import Config, Node
from edgeswarm.node.snapshot import SnapshotError, latest, restore

TIMEOUT = 15.0


def test_wiped_node_rebuilds_from_a_peer_snapshot_then_syncs(tmp_path, member_configs, region):
    configs = member_configs(3, sync_interval=0, snapshot_interval=0)
    homes, members = [c.home for c in configs], configs[0].members
    a, b = Node(configs[0]).start(), Node(configs[1]).start()
    wiped = None
    try:
        for i in range(5):
            a.put(region, f"k{i}", {"i": i})
        a.patch(region, "k0", set={"more": True})
        for n in (a, b):
            assert n.wait_until(lambda n=n: n.get(region, "k0", consensus=True) == {"i": 0, "more": True}
                                and all(n.consensus(region, f"k{i}") for i in range(5)), TIMEOUT)
        path = b.snapshot()
        assert latest(homes[1]) == path

        # a board whose store is garbage: the node refuses it clearly, restore keeps it aside
        store = homes[2] / "store.db"
        store.write_bytes(b"not sqlite at all" * 50)
        with pytest.raises(Exception, match="edgeswarm restore"):
            Node(configs[2])
        result = restore(configs[2], path, trusted=set(members))
        restored_store = Node(configs[2]).store
        assert restored_store.meta("seq") > b.store.meta("seq")  # above any seq this key could have used
        restored_store.close()
        assert result["frames"] == 5 and result["signer"] == b.node_id
        assert (tmp_path / result["moved_aside"]).read_bytes() == b"not sqlite at all" * 50

        a.patch(region, "k1", set={"after": "snapshot"})  # happens after the snapshot
        assert b.wait_until(lambda: (b.get(region, "k1", consensus=True) or {}).get("after") == "snapshot", TIMEOUT)
        wiped = Node(configs[2])
        assert wiped.get(region, "k0", consensus=True) == {"i": 0, "more": True}
        assert wiped.status(region, "k0")["state"] == "consensus"
        wiped.start()
        wiped.sync_now()
        assert wiped.wait_until(lambda: wiped.get(region, "k1", consensus=True) == {"i": 1, "after": "snapshot"},
                                TIMEOUT), wiped.stats()
    finally:
        for n in (a, b, wiped):
            if n is not None:
                n.stop()


def test_tampered_or_foreign_snapshot_is_refused(tmp_path):
    home = tmp_path / "n"
    node = Node(Config(home=home, regions=["r"], sync_interval=0, snapshot_interval=0))
    node.put("r", "k", {"v": 1})  # (no broker: stays in the outbox)
    path = node.snapshot()
    node.stop()
    raw = path.read_bytes()
    bad = tmp_path / "bad.cbor"
    bad.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # the signature no longer matches
    target = Config(home=tmp_path / "m", regions=["r"])
    with pytest.raises(SnapshotError, match="signature"):
        restore(target, bad)
    with pytest.raises(SnapshotError, match="not a member"):
        restore(target, path, trusted={"someoneelse00000"})


def test_snapshot_and_restore_commands(tmp_path):
    home = tmp_path / "n"
    run = lambda *a: subprocess.run([sys.executable, "-m", "edgeswarm.node.cli", "--home", str(home), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=30)
    assert run("init", "--region", "r").returncode == 0
    assert run("restore").stderr.startswith("edgeswarm: error: no snapshot")
    made = run("snapshot")
    assert made.returncode == 0 and made.stdout.strip().endswith(".cbor")
    restored = run("restore")
    assert restored.returncode == 0 and "restored 0 frames" in restored.stdout, restored.stderr
    assert run("status").returncode == 0
