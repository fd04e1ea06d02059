"""Crashes: nothing acknowledged is lost."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from edgeswarm.node import Config, Node, restart, snapshot
from edgeswarm.node.store import Store

TIMEOUT = 30.0

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edgeswarm.node import Config, Node
    home, port, protocol, region, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    node = Node(Config(home=Path(home), regions=[region], broker_port=port, protocol=protocol,
                       sync_interval=0, snapshot_interval=0)).start()
    for i in range(0, 100000, size):
        with node.batch():  # (a batch of one is a plain put)
            versions = [node.put(region, f"k{j % 200}", {"i": j}) for j in range(i, i + size)]
        for version in versions:  # acknowledged: the batch returned
            print(version, flush=True)
""")


@pytest.mark.parametrize("size", [1, 20])
def test_kill_9_during_writes_loses_no_acknowledged_frame(tmp_path, broker, region, size):
    reader = Node(Config(home=tmp_path / "reader", regions=[region], broker_host=broker.host,
                         broker_port=broker.port, protocol=broker.protocol, sync_interval=0)).start()
    writer_home = tmp_path / "writer"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(writer_home), str(broker.port), broker.protocol,
                             region, str(size)], stdout=subprocess.PIPE, text=True)
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


def test_a_power_cut_that_loses_the_last_commits_costs_the_node_nothing_with_its_peers(member_configs, region):
    """A power cut loses the commits made since the store's last sync, while what they sent
    is with the peers. Opened in a new boot, the node numbers its messages, trace entries,
    vote rounds and sessions anew: its next writes are taken (not dropped as replays), no
    peer takes it for a node rewriting its history or for one still dead, and a peer keeps
    the entries the node lost and goes on with its copy from the new start."""
    a_config, b_config = member_configs(2, sync_interval=0, snapshot_interval=0)
    a, b = Node(a_config).start(), Node(b_config).start()
    saved = a_config.store_path.with_name("as-synced.db")

    def writes(a: Node, tag: str) -> list[str]:
        versions = [a.put(region, f"k{i}", {"i": i, tag: True}) for i in range(3)]
        assert b.wait_until(lambda: all(b.store.has_version(bytes.fromhex(v)) for v in versions), TIMEOUT), \
            b.counters
        return versions

    def copied(a: Node) -> tuple[int, bytes]:
        """b holds a's whole trace (a records on as votes come in: pushed until it holds still)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            head = a.store.trace_head(a.node_id)
            a.trace.push()
            if b.wait_until(lambda: b.store.trace_head(a.node_id) == head, 2.0) and \
                    a.store.trace_head(a.node_id) == head:
                return head
        raise AssertionError(f"b did not copy a's trace: {b.counters}")

    try:
        writes(a, "first")
        a.stop()  # (a clean stop leaves the whole store in the file)
        shutil.copy(a_config.store_path, saved)
        a = Node(a_config).start()
        lost = writes(a, "lost")
        lost_head = copied(a)
        a.stop()

        # The power cut: the card holds the store as it was before the last three writes,
        # last opened in another boot than the one the board comes back in.
        shutil.copy(saved, a_config.store_path)
        store = Store(a_config.store_path)
        store.set_meta("boot", store.meta("boot") ^ 1)
        store.close()
        a = Node(a_config).start()
        writes(a, "after the cut")
        assert copied(a)[0] > lost_head[0]
        assert b.wait_until(lambda: b.swarm().get(a.node_id, {}).get("alive"), TIMEOUT), b.swarm().get(a.node_id)
        assert not b.store.flagged() and not b.counters["equivocations"], b.counters
        assert not b.counters["rejected.duplicate"] and not b.counters["rejected.replay"]
        copy = b.trace.entries(a.node_id)
        assert lost_head[1] in {e.hash for e in copy}  # what the node itself no longer holds
        assert b.counters["trace.anchored"] == 1 and not b.counters["rejected.trace-chain"]
        # and what the lost writes sent comes back to the node by anti-entropy
        a.sync_now()
        assert a.wait_until(lambda: all(a.store.has_version(bytes.fromhex(v)) for v in lost), TIMEOUT), a.counters
        assert not a.counters["rejected.duplicate"] and not a.counters["rejected.replay"]
    finally:
        a.stop()
        b.stop()


def test_numbers_start_anew_only_in_another_boot_and_only_once(tmp_path, region):
    """A new store has nothing to forget; a store last opened in this boot keeps its numbers;
    one last opened in another boot moves them all past what a lost second can have used,
    once (the next start in the same boot keeps them)."""
    config = Config(home=tmp_path / "n", regions=[region], sync_interval=0)
    node = Node(config)
    assert node.store.meta("seq") == 0 and node.store.meta("trace_start") == 0
    node.put(region, "k", {"i": 1})
    seq, head = node.store.meta("seq"), node.store.trace_head(node.node_id)
    round_ = node.store.frame(region, "k").round
    node.stop()
    node = Node(config)  # same boot: nothing moves
    assert node.store.meta("seq") == seq and node.store.meta("trace_start") == 0
    node.store.set_meta("boot", node.store.meta("boot") ^ 1)
    node.stop()
    node = Node(config)  # another boot
    assert node.store.meta("seq") >= seq + 2**20 and node.store.meta("trace_start") >= head[0] + 2**20
    assert node.store.meta("session") >= seq + 2**20
    assert node.round_floor >= round_ + 2**16
    moved = node.store.meta("seq"), node.store.meta("trace_start"), node.round_floor
    node.put(region, "k", {"i": 2})
    assert node.store.trace_head(node.node_id)[0] == moved[1] + 1  # the trace goes on from the new start
    assert node.store.frame(region, "k").round == moved[2] + 1
    node.stop()
    node = Node(config)  # and once only
    assert (node.store.meta("trace_start"), node.round_floor) == moved[1:]
    node.stop()


def _outrun_floors(member_configs, monkeypatch) -> tuple:
    """Two members started, with the time's round floor and the margin above old rounds
    made small enough for five writes of one frame to outrun them (as a frame changed
    faster than four times a second does): (a's config, a, b)."""
    monkeypatch.setattr(snapshot, "round_floor", lambda now=None: 2)
    monkeypatch.setattr(restart, "ROUND_MARGIN", 1)
    a_config, b_config = member_configs(2, sync_interval=0, snapshot_interval=0)
    return a_config, Node(a_config).start(), Node(b_config).start()


def _hot_writes(a, b, region: str) -> Iterator[int]:
    """a writes frame "hot" five times (its rounds 1 to 5), each at consensus on b before the next."""
    for i in range(5):
        version = a.put(region, "hot", {"i": i})
        assert b.wait_until(lambda v=version: b.status(region, "hot")["consensus"] == v, TIMEOUT)
        yield i


def test_a_restored_node_votes_above_the_old_rounds_it_learns_back(member_configs, region, monkeypatch):
    """A restored node's vote rounds start at a floor from the time and from its rounds the
    snapshot holds (restart.py, snapshot.py), which a frame changed more than four times a
    second after an older snapshot outruns. Its old votes come back by anti-entropy, and its
    next vote on such a frame goes above them: below, its peers would take it for a late
    vote of an old round (or, where they still hold that round, for a second vote in it) and
    go on counting the old one."""
    a_config, a, b = _outrun_floors(member_configs, monkeypatch)
    try:
        path = [a.snapshot() for i in _hot_writes(a, b, region) if i == 1][0]  # (three rounds follow it)
        assert a.store.latest_round(region, "hot", a.node_id) == 5
        a.stop()
        snapshot.restore(a_config, path)
        a = Node(a_config).start()
        # (the snapshot's round 2 and the margin, then the margin again as the store is new here)
        assert a.store.latest_round(region, "hot", a.node_id) == 0 and a.round_floor == 4
        a.sync_now()
        assert a.wait_until(lambda: a.store.latest_round(region, "hot", a.node_id) == 5, TIMEOUT), a.counters
        version = a.put(region, "hot", {"i": "after the restore"})
        assert b.wait_until(lambda: b.status(region, "hot")["consensus"] == version, TIMEOUT), b.status(region, "hot")
        assert b.status(region, "hot")["votes"][a.node_id] == version and b.store.latest_round(
            region, "hot", a.node_id) == 6
        assert not b.store.flagged() and not b.counters["equivocations"]
    finally:
        a.stop()
        b.stop()


def test_a_node_restored_from_a_peers_snapshot_votes_above_the_rounds_it_holds(member_configs, region, monkeypatch):
    """A frame changed more than four times a second outruns the time's floor; the snapshot
    (here a peer's, as a wiped board bootstraps from) holds the restored node's highest
    round and lifts the floor above it, so its next vote counts at once, before any sync:
    below, the peer still holding the node's vote in that round would take the new one for a
    second vote in it and flag the node for good."""
    a_config, a, b = _outrun_floors(member_configs, monkeypatch)
    try:
        path = [b.snapshot() for i in _hot_writes(a, b, region) if i == 4][0]
        a.stop()
        snapshot.restore(a_config, path)
        a = Node(a_config).start()
        assert a.round_floor > 5 == b.store.latest_round(region, "hot", a.node_id)
        version = a.put(region, "hot", {"i": "after the restore"})
        assert b.wait_until(lambda: b.status(region, "hot")["consensus"] == version, TIMEOUT), b.status(region, "hot")
        assert b.store.latest_round(region, "hot", a.node_id) > 5
        assert not b.store.flagged() and not b.counters["equivocations"]
    finally:
        a.stop()
        b.stop()
