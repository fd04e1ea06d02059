"""Property: whatever the interleaving of writes and deliveries, nodes converge.

The nodes are real (keys, SQLite stores, signed envelopes) but never connect to a broker:
each one's outbox is the network, and the test decides which message reaches which node
when, in any order, some of them twice. EDGESWARM_SIM_EXAMPLES sets how many interleavings
are tried (150 by default).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from edgeswarm.node.digest import Tree
from edgeswarm.node import Config, Node
from edgeswarm.node.store import Frame
from edgeswarm.shared.envelope import decode
from edgeswarm.shared.identity import Identity
from helpers import Network

REGION = "sim/line"
NODES = 3

write = st.tuples(st.just("write"), st.integers(0, NODES - 1), st.sampled_from(["a", "b"]),
                  st.sampled_from(["x", "y", "z"]), st.integers(0, 3))
deliver = st.tuples(st.just("deliver"), st.integers(0, NODES - 1), st.integers(0, 1000))
redeliver = st.tuples(st.just("redeliver"), st.integers(0, NODES - 1), st.integers(0, 1000))
send = st.tuples(st.just("send"), st.integers(0, NODES - 1))
compact = st.tuples(st.just("compact"), st.integers(0, NODES - 1))  # what a node's scheduled round does
actions = st.lists(st.one_of(write, write, deliver, deliver, deliver, redeliver, send, send, compact), min_size=10,
                   max_size=80)


@settings(max_examples=int(os.environ.get("EDGESWARM_SIM_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions, st.booleans())
# A late fork from before a settled consensus: fork choice reads the voters' votes in round
# order (dropping every superseded one split the swarm), so compaction keeps what it reads.
@example(steps=[("write", 0, "a", "x", 0)] * 11 + [("write", 0, "a", "x", 1), ("write", 1, "a", "x", 3),
                                                  ("write", 2, "a", "x", 0), ("write", 2, "a", "y", 0)], eager=True)
@example(steps=[("write", 0, "a", "x", 0)] * 11 + [("write", 0, "a", "x", 1), ("send", 0), ("deliver", 1, 0),
                                                  ("deliver", 1, 0), ("send", 1), ("deliver", 0, 0), ("compact", 0),
                                                  ("compact", 1), ("write", 1, "a", "x", 3), ("write", 2, "a", "x", 0),
                                                  ("compact", 0), ("write", 2, "a", "y", 0)], eager=False)
def test_any_interleaving_converges_and_loses_nothing(steps, eager):
    """`eager`: every node compacts its vote history after every step, not only when told."""
    with tempfile.TemporaryDirectory() as tmp:
        homes = [Path(tmp) / f"n{i}" for i in range(NODES)]
        # Fixed keys: hashes (and so tie-breaks) are the same each time an example is replayed.
        identities = [Identity(SigningKey(bytes([i + 1]) * 32)) for i in range(NODES)]
        for identity, home in zip(identities, homes):
            identity.save(home / "node.key")
        members = [i.node_id for i in identities]
        nodes = [Node(Config(home=h, regions=["sim"], members=members)) for h in homes]
        for node in nodes:
            node.sync.tree("sim")  # kept in memory from here on, following the store's changes
        net = Network(nodes)
        written: set[str] = set()
        try:
            # The steps twice: the second time on a settled history that compaction trims,
            # with forks from before what each node has compacted.
            for phase in range(2):
                for step in steps:
                    if step[0] == "write":
                        _, i, key, field, value = step
                        written.add(nodes[i].patch(REGION, key, set={field: value + 4 * phase}))
                    elif step[0] == "deliver":
                        net.deliver(step[1], step[2])
                    elif step[0] == "redeliver":
                        net.redeliver(step[1], step[2])
                    elif step[0] == "compact":
                        nodes[step[1]].compact_votes()
                    else:
                        net.send(step[1])
                    if eager:
                        for node in nodes:
                            node.compact_votes()
                event(f"settled in {min(net.settle(), 5)}+ rounds")
                check_converged(nodes, written)
                check_pulled_alike(nodes, Path(tmp) / f"observer{phase}")
            stats = sum((n.counters for n in nodes), start=Counter())
            for name in ("merges", "pending", "fork-resolutions", "rejected.duplicate", "votes-compacted"):
                event(f"{name}: {'yes' if stats[name] else 'no'}")
        finally:
            for node in nodes:
                node.stop()


def check_converged(nodes: list[Node], written: set[str]) -> None:
    for node in nodes:
        assert node.counters["rejected.internal"] == 0
        versions = {fv.version for key in ("a", "b") for fv in node.history(REGION, key)}
        assert written <= versions, "an accepted version was lost"
    for key in ("a", "b"):
        views = [n.status(REGION, key) for n in nodes]
        assert len({(v["head"], v["consensus"], tuple(v["forks"])) for v in views}) == 1, views
        event(f"forks: {'yes' if views[0]['forks'] else 'no'}")
        if any(fv_key == key for fv_key in nodes[0].keys(REGION)):
            assert views[0]["consensus"] == views[0]["head"] is not None
            values = {repr(n.get(REGION, key, consensus=True)) for n in nodes}
            assert len(values) == 1
    # What anti-entropy compares: kept with every version and vote, equal to the sums
    # computed from scratch, and the same on every node once they agree.
    digests = set()
    for node in nodes:
        kept = node.store.read_sums("sim", list)[1]
        followed = node.sync.tree("sim")
        assert (list(followed.pos), list(followed.hashes)) == ([r[0] for r in kept], [r[1] for r in kept])
        assert followed.counts() == Tree(kept).counts()
        node.store.rebuild_sums()
        assert node.store.read_sums("sim", list)[1] == kept
        digests.add(node.sync.digest("sim")["hashes"])
    assert len(digests) == 1, "settled nodes whose digests differ would sync forever"


def check_pulled_alike(nodes: list[Node], home: Path) -> None:
    """A node that learns the frames by anti-entropy alone (each version's signed diff and
    each member's latest signed vote, as a pull brings them) decides them as the swarm did."""
    observer = Node(Config(home=home, regions=["sim"], members=[n.node_id for n in nodes]))
    try:
        for key in ("a", "b"):
            versions, votes = nodes[0].store.frame_items(REGION, key)
            observer.handle_many([decode(raw) for raw in [d for _, d in versions] + [v for _, _, v in votes]])
            theirs, mine = nodes[0].status(REGION, key), observer.status(REGION, key)
            assert (mine["head"], mine["consensus"], mine["forks"]) == (theirs["head"], theirs["consensus"],
                                                                       theirs["forks"]), (key, mine, theirs)
    finally:
        observer.stop()


def test_a_fork_inside_a_branch_is_decided_by_the_votes_after_it_and_stays_as_it_grows():
    """An old fork is kept (X1 beside the main line B-M1-M2); later the main line forks
    again at M2 (P, Q). The members' first votes after the old fork all lie on the main
    line, so they cannot tell P from Q: the votes after M2 do (two for P, one for Q), and
    writing on Q (a new leaf with a lower hash) does not move the head."""
    from edgeswarm.node.store import VersionMeta
    from edgeswarm.node.voter import Dag, choose_head

    def v(byte: int, parents: tuple[bytes, ...], gen: int) -> VersionMeta:
        return VersionMeta(bytes([byte]) * 32, parents, "author", gen, gen, True)

    B = v(0x10, (), 1)
    X1, M1 = v(0x01, (B.version,), 2), v(0x30, (B.version,), 2)
    M2 = v(0x40, (M1.version,), 3)
    P, Q = v(0x90, (M2.version,), 4), v(0x80, (M2.version,), 4)
    Q2 = v(0x02, (Q.version,), 5)
    votes = {"v1": [B, M1, M2, P], "v2": [B, M1, M2, P], "v3": [B, M1, M2, Q], "v4": [B, X1]}
    history = lambda: {n: [m.version for m in ms] for n, ms in votes.items()}  # noqa: E731
    no_merge = lambda parents: None  # noqa: E731
    for versions in ([B, X1, M1, M2, P, Q], [B, X1, M1, M2, P, Q, Q2]):
        dag = Dag({m.version: m for m in versions})
        head, order = choose_head(dag, set(dag.versions), history, no_merge)
        assert head == P.version and order[-1] == X1.version


def test_compaction_keeps_the_votes_fork_choice_reads(tmp_path):
    """A frame settled on C, B - M1 - C - D with E beside D: a member that voted B, M1, C,
    D keeps D alone; one that voted D then E keeps both (it moved to another branch); one
    with a vote for a version not held (U) between keeps every vote (U may lie on a branch
    from before C, arriving later); one with a single vote keeps it."""
    members = [Identity.generate() for _ in range(2)]
    node = Node(Config(home=tmp_path, regions=["sim"], members=[m.node_id for m in members]),
                identity=members[0])
    store, author = node.store, members[1].node_id
    try:
        v = {name: bytes([i + 1]) * 32 for i, name in enumerate(["B", "M1", "C", "D", "E"])}
        with store.transaction():
            for name, parent, gen in [("B", None, 1), ("M1", "B", 2), ("C", "M1", 3), ("D", "C", 4), ("E", "C", 4)]:
                store.add_version(REGION, "a", v[name], (v[parent],) if parent else (), {"n": name}, author, gen, gen)
            store.set_frame(REGION, "a", Frame(v["D"], v["C"], 0, settled=True))
            votes = {"p": ["B", "M1", "C", "D"], "q": ["B", "U", "D"], "r": ["D", "E"], "s": ["M1"]}
            for voter, names in votes.items():
                for round_, name in enumerate(names, start=1):
                    store.add_vote(REGION, "a", voter, round_, v.get(name, bytes(32)), b"vote %s" % name.encode())
        store.set_frame(REGION, "b", Frame(None, None, 0))  # decided after "a"
        latest = store.latest_votes(REGION, "a")
        assert node._compactable(REGION, "a") == [("p", 1), ("p", 2), ("p", 3)]
        assert node.compact_votes(limit=1) == 3  # "b" waits for the next round
        assert store.decided_frames(10) == [(REGION, "b")] and node.compact_votes() == 0
        assert store.votes_in_order(REGION, "a") == {
            "p": [v["D"]], "q": [v["B"], bytes(32), v["D"]], "r": [v["D"], v["E"]], "s": [v["M1"]]}
        assert store.latest_votes(REGION, "a") == latest  # what decisions and digests read is untouched
        assert [(voter, r, raw) for voter, r, raw in store.frame_items(REGION, "a")[1] if voter == "r"] == [
            ("r", 1, b"vote D"), ("r", 2, b"vote E")]  # anti-entropy sends what fork choice reads
    finally:
        node.stop()
