"""The store's per-transaction cache and the writes it keeps for COMMIT."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess

import pytest

from edgeswarm.node import Config, Node
from edgeswarm.node.store import PAGE_SIZE, Frame, Store, StoreFullError

KEY = bytes(32)


def h(n: int) -> bytes:
    return hashlib.blake2b(bytes([n]), digest_size=32).digest()


@pytest.fixture
def stores(tmp_path):
    """Two connections to one file, as a node and a CLI command sharing a store."""
    a, b = Store(tmp_path / "store.db"), Store(tmp_path / "store.db")
    yield a, b
    a.close()
    b.close()


def read_all(store: Store) -> tuple:
    with store.transaction():
        return (store.sender_window("n1"), store.frame("r", "k"), store.latest_votes("r", "k"),
                sorted(store.voters("r")), store.flagged(), store.trace_head("n1"), store.waiting("r", "k"))


def test_another_connection_commit_is_seen(stores):
    a, b = stores
    before = read_all(a)
    assert before == ((0, 0), Frame(None, None, 0), {}, [], frozenset(), None, False)
    with b.transaction():
        b.set_sender_window("n1", KEY, 7, 3, 1)
        b.set_frame("r", "k", Frame(h(1), h(1), 2, True))
        b.add_vote("r", "k", "n2", 1, h(1), b"vote", (h(3), h(4)))
        b.flag("n3", "two votes", b"a", b"b")
        b.add_trace("n1", 1, h(5), None, b"entry", b"sig")
    assert read_all(a) == read_all(b) == (
        (7, 3), Frame(h(1), h(1), 2, True), {"n2": h(1)}, ["n2"], frozenset({"n3"}), (1, h(5)), True)


def test_rollback_forgets_what_the_transaction_read_and_wrote(stores):
    a, _ = stores
    with a.transaction():
        a.set_sender_window("n1", KEY, 1, 1, 1)
        a.add_vote("r", "k", "n2", 1, h(1), b"vote")
    with pytest.raises(RuntimeError), a.transaction():
        a.set_sender_window("n1", KEY, 9, 1, 1)
        a.set_frame("r", "k", Frame(h(2), None, 1))
        a.add_vote("r", "k", "n2", 2, h(2), b"vote")
        a.flag("n2", "two votes", b"a", b"b")
        raise RuntimeError
    assert read_all(a)[:5] == ((1, 1), Frame(None, None, 0), {"n2": h(1)}, ["n2"], frozenset())


def test_frames_changed_in_a_transaction_are_written_once_and_read_back_by_queries(stores):
    a, b = stores
    with a.transaction():
        for n in range(1, 4):  # (a batch changing one frame three times)
            a.set_frame("r", "k", Frame(h(n), h(1), 1))
        a.set_frame("r", "j", Frame(h(9), None, 0))
        # the table's own queries see what the transaction changed so far
        assert a.keys("r") == ["j", "k"] and a.regions() == ["r"]
        assert a.frame_counts() == {"frames": 2, "shadows": 2} and a.highest_round() == 1
    assert b.frame("r", "k") == Frame(h(3), h(1), 1) and b.frame_heads() == [
        ("r", "j", h(9).hex(), None), ("r", "k", h(3).hex(), h(1).hex())]


def test_a_version_older_than_a_settled_consensus_unsettles_its_frame(stores):
    a, b = stores
    a.add_version("r", "k", h(1), (), {"n": 1}, "n1", 1, 1)
    a.add_version("r", "k", h(2), (h(1),), {"n": 2}, "n1", 2, 2)
    a.set_frame("r", "k", Frame(h(2), h(2), 1, True))
    with a.transaction():
        assert a.frame("r", "k").settled  # (cached for the transaction)
        a.add_version("r", "k", h(3), (h(1),), {"n": 3}, "n2", 3, 2)  # as old as the consensus: still settled
        assert a.frame("r", "k").settled
        a.add_version("r", "k", h(4), (), {"n": 4}, "n3", 4, 1)  # older: a fork from further back
        assert not a.frame("r", "k").settled
    assert b.frame("r", "k") == Frame(h(2), h(2), 1, False)


def test_repeated_vote_returns_the_one_held(stores):
    a, _ = stores
    assert a.add_vote("r", "k", "n1", 1, h(1), b"first") is None
    assert a.add_vote("r", "k", "n1", 1, h(2), b"second") == (h(1), b"first")
    assert a.latest_votes("r", "k") == {"n1": h(1)}


def envelopes(store: Store) -> dict[int, bytes | None]:
    return dict(store.db.execute("SELECT round, envelope FROM votes WHERE voter = 'n1' ORDER BY round").fetchall())


def test_votes_keep_their_envelopes_and_the_latest_is_what_the_sum_covers(stores):
    """Anti-entropy sends the votes fork choice reads, so each keeps its envelope (until the
    node compacts the frame's votes), whichever order the rounds arrive in."""
    a, _ = stores
    for round_ in (1, 2, 4):
        assert a.add_vote("r", "k", "n1", round_, h(round_), b"vote%d" % round_) is None
    assert a.add_vote("r", "k", "n1", 3, h(3), b"vote3") is None  # late: already superseded
    assert envelopes(a) == {1: b"vote1", 2: b"vote2", 3: b"vote3", 4: b"vote4"}
    assert a.latest_votes("r", "k") == {"n1": h(4)} and a.votes_in_order("r", "k") == {"n1": [h(1), h(2), h(3), h(4)]}
    assert a.frame_items("r", "k")[1] == [("n1", r, b"vote%d" % r) for r in (1, 2, 3, 4)]
    assert a.read_sums("r", list)[1][0][3] == 4  # the sum counts the latest round only
    # a second vote in a round is caught, with the one held as evidence
    assert a.add_vote("r", "k", "n1", 2, h(9), b"other") == (h(2), b"vote2")
    assert a.drop_votes("r", "k", [("n1", 1), ("n1", 2)]) == 2
    assert envelopes(a) == {3: b"vote3", 4: b"vote4"}


def test_sums_written_at_commit_match_a_rebuild(stores):
    a, b = stores
    changes = []
    a.sum_listeners.append(lambda gen, items: changes.extend(items))
    with a.transaction():
        for i in range(1, 4):
            a.add_version("r", f"k{i}", h(i), (), {"i": i}, "n1", i, 1)
            for voter in ("n1", "n2"):
                a.add_vote("r", f"k{i}", voter, 1, h(i), b"vote")
        a.add_vote("r", "k1", "n2", 2, h(9), b"vote")  # replaces n2's latest vote
        a.add_vote("r", "k1", "n2", 1, h(8), b"vote")  # an older round: the sum keeps the latest
    assert len(changes) == 3 + 6 + 1
    kept = a.read_sums("r", list)[1]
    assert sum(row[2] for row in kept) == 3 and sum(row[3] for row in kept) == 3 * 2 + 1
    b.rebuild_sums()
    assert b.read_sums("r", list)[1] == kept


def test_a_second_vote_in_a_superseded_round_flags_the_voter(tmp_path):
    """The voter has moved on since that round: it is flagged all the same, with both
    signed votes as evidence."""
    from edgeswarm.node import Config, Node
    from edgeswarm.shared.envelope import encode
    from edgeswarm.shared.identity import Identity
    from edgeswarm.shared.topics import region_topic

    mallory = Identity.generate()
    node = Node(Config(home=tmp_path / "n", regions=["plant"], sync_interval=0))
    try:
        v1 = bytes.fromhex(node.put("plant/a", "door", {"locked": True}))
        v2 = bytes.fromhex(node.patch("plant/a", "door", set={"locked": False}))
        topic = region_topic("vote", "plant/a")

        def vote(seq: int, version: bytes, round_: int) -> bytes:
            return encode(mallory, "vote", "plant/a", seq, seq, {"key": "door", "version": version,
                                                                 "round": round_}).raw
        first = vote(1, v1, 1)
        node.receive(topic, first)
        node.receive(topic, vote(2, v2, 2))
        assert node.store.vote_at("plant/a", "door", mallory.node_id, 1) == (v1, first)
        assert node.counters["equivocations"] == 0
        second = vote(3, v2, 1)
        node.receive(topic, second)
        assert node.counters["equivocations"] == 1
        assert node.store.flagged() == {mallory.node_id}
        assert node.store.db.execute("SELECT evidence_a, evidence_b FROM flagged").fetchone() == (first, second)
    finally:
        node.stop()


def test_a_running_node_checkpoints_in_a_thread_of_its_own_not_in_commit(tmp_path):
    """With background checkpoints no COMMIT copies the log into the file (the 1,000-page
    mark is passed and the file alone holds none of it); the thread's checkpoint does."""
    path = tmp_path / "store.db"
    store = Store(path)
    store.checkpoint_in_background(every=3600)  # (its first checkpoint comes only as it stops)

    def rows_in_the_file_alone() -> int:
        copy = tmp_path / "file-alone.db"
        copy.write_bytes(path.read_bytes())  # without the -wal file beside it
        conn = sqlite3.connect(copy)
        try:
            return conn.execute("SELECT count(*) FROM versions").fetchone()[0]
        except sqlite3.OperationalError:  # (not even the schema there yet)
            return 0
        finally:
            conn.close()
            copy.unlink()

    for i in range(300):  # ~5 pages each: 1,500 pages through the log
        with store.transaction():
            store.add_version("r", f"k{i}", hashlib.sha256(b"%d" % i).digest(), (), {"blob": "x" * 16000},
                              "n", i + 1, 1)
    assert (tmp_path / "store.db-wal").stat().st_size > 1200 * 4096
    assert rows_in_the_file_alone() == 0
    store.stop_checkpoints()
    assert rows_in_the_file_alone() == 300
    assert store.version_info(hashlib.sha256(b"7").digest())[:2] == ("r", "k7")
    store.close()


def test_a_new_store_has_small_pages_and_an_old_one_keeps_its_own(tmp_path):
    """Small pages write fewer bytes per COMMIT (PAGE_SIZE); a store made with 4,096-byte
    pages before keeps them (SQLite cannot change them in WAL mode) and works as before."""
    new = Store(tmp_path / "new.db")
    assert new.db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 2048
    new.close()
    old_path = tmp_path / "old.db"
    with sqlite3.connect(old_path) as conn:  # (as earlier releases made it)
        conn.execute("PRAGMA page_size=4096")
        conn.execute("PRAGMA journal_mode=WAL")
    old = Store(old_path)
    try:
        assert old.db.execute("PRAGMA page_size").fetchone()[0] == 4096
        with old.transaction():
            old.add_version("r", "k", b"v" * 32, (), {"x": 1}, "author", 1, 1)
            old.set_frame("r", "k", Frame(b"v" * 32, None, 0))
        assert old.frame("r", "k").head == b"v" * 32 and old.version_info(b"v" * 32).value == {"x": 1}
    finally:
        old.close()


def test_a_full_disk_is_a_clear_error_that_loses_nothing(offline_pair):
    """A store whose disk is full (here: SQLite's page limit, which fails a write the same
    way) refuses a write with a clear error and counts what it could not take; what it held
    stays, and once there is room again the same messages are taken."""
    a, b = offline_pair
    sent = [(item.topic, item.envelope) for item in a.store.unpublished()]
    assert len(sent) == 6  # a's six diffs
    for message in sent[:3]:
        b.receive(*message)
    held = {f"k{i}": b.get("plant/a", f"k{i}") for i in range(3)}
    assert held == {f"k{i}": {"i": i} for i in range(3)}

    a.put("plant/a", "k9", {"blob": "y" * 5_000})  # (more than a page: the store must grow to take it)
    sent_big = [(item.topic, item.envelope) for item in a.store.unpublished()][-1]

    conn = b.store.db.conn
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(StoreFullError, match="is full"):
        b.put("plant/b", "big", {"blob": "x" * 20_000})
    b.receive(*sent_big)
    assert b.counters["rejected.disk-full"] == 1 and not b.counters["rejected.internal"]
    assert b.head("plant/a", "k9") is None and b.head("plant/b", "big") is None
    assert not conn.in_transaction
    assert {k: b.get("plant/a", k) for k in held} == held

    conn.execute("PRAGMA max_page_count = 1073741823")  # room again
    b.receive(*sent_big)  # (its sequence number was not taken: no replay)
    assert b.get("plant/a", "k9") == {"blob": "y" * 5_000} and not b.counters["rejected.replay"]
    b.put("plant/b", "big", {"blob": "x" * 20_000})
    assert b.get("plant/b", "big") == {"blob": "x" * 20_000}


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB filesystem of its own (tmpfs; mounting one needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_node_whose_disk_fills_keeps_what_it_held_and_says_so(small_disk):
    node = Node(Config(home=small_disk / "node", regions=["plant"], sync_interval=0))
    try:
        written = {}
        with pytest.raises(StoreFullError, match="is full"):
            for i in range(1000):
                value = {"blob": os.urandom(4000).hex()}
                node.put("plant/a", f"k{i}", value)
                written[f"k{i}"] = value
        assert 5 < len(written) < 1000 and {k: node.get("plant/a", k) for k in written} == written
        with pytest.raises(OSError):
            node.snapshot()  # (the state does not fit either)
        assert not list((small_disk / "node" / "recovery").glob("*"))  # no part left taking space
    finally:
        node.stop()
    reopened = Store(small_disk / "node" / "store.db")
    try:
        assert len(reopened.keys("plant/a")) == len(written)
    finally:
        reopened.close()
