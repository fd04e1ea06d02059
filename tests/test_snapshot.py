"""Snapshots: signed, checked on restore, and the commands (a wiped board restored
from a peer's snapshot: test_processes.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeswarm.node import Config, Node
from edgeswarm.node.snapshot import SnapshotError, restore


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
