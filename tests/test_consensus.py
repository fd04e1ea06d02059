"""Five nodes on a real broker: consensus, merges, forks, crashes, rogues and coherence."""

from __future__ import annotations

import pytest
from helpers import same_digest

from edgeswarm.node import Node
from edgeswarm.node.bodies import MAX_ROUND
from edgeswarm.node.coherence import CoherenceError, Rule
from edgeswarm.node.store import Frame
from edgeswarm.shared import diff
from edgeswarm.shared.envelope import decode, encode
from edgeswarm.shared.topics import region_topic

TIMEOUT = 15.0


def at_consensus(node, region, key, version):
    c = node.consensus(region, key)
    return c is not None and c.version == version


def wait_all(nodes, condition):
    for n in nodes:
        assert n.wait_until(lambda n=n: condition(n), TIMEOUT), (n.node_id, n.status(*condition.frame))


def consensus_everywhere(nodes, region, key, version):
    cond = lambda n: at_consensus(n, region, key, version)  # noqa: E731
    cond.frame = (region, key)
    wait_all(nodes, cond)


def agreed_everywhere(nodes, region, key, version, forks=()):
    """Every node has `version` as head and consensus, and `forks` as its forks."""
    def settled(n):
        status = n.status(region, key)
        return status["consensus"] == version and status["head"] == version and status["forks"] == list(forks)
    settled.frame = (region, key)
    wait_all(nodes, settled)
    return nodes[0].consensus(region, key)


def test_sequential_writes_reach_consensus_everywhere(make_swarm, region):
    nodes, _ = make_swarm(5)
    version = None
    for i, writer in enumerate(nodes):
        if version is not None:
            assert writer.wait_until(lambda w=writer, v=version: at_consensus(w, region, "line", v), TIMEOUT)
        version = writer.patch(region, "line", set={f"station{i}": i})
    consensus_everywhere(nodes, region, "line", version)
    for n in nodes:
        assert n.get(region, "line", consensus=True) == {f"station{i}": i for i in range(5)}
        assert n.wait_until(lambda n=n: n.status(region, "line")["support"].get(version) == 5, TIMEOUT)
        status = n.status(region, "line")
        assert status["quorum"] == 3 and not status["forks"]
        assert [fv.state for fv in n.history(region, "line")] == ["consensus"] * 5


def _offline_edit(nodes, region, key, offline_change, online_change):
    """nodes[1] edits while cut off from the broker; nodes[0] edits the same version online;
    nodes[1] comes back. Returns the two versions."""
    a, b = nodes[0], nodes[1]
    b.transport.close()  # cut off; its persistent session keeps collecting messages
    vb = offline_change(b)
    va = online_change(a)
    consensus_everywhere([n for n in nodes if n is not b], region, key, va)  # 4 of 5 is a quorum
    b.start()  # sends its outbox, receives what it missed
    return va, vb


def test_concurrent_disjoint_edits_merge_to_one_hash(make_swarm, region):
    nodes, _ = make_swarm(5)
    v0 = nodes[0].put(region, "cfg", {"x": 0, "y": 0, "limits": {"lo": 1, "hi": 9}})
    consensus_everywhere(nodes, region, "cfg", v0)
    va, vb = _offline_edit(nodes, region, "cfg",
                           lambda b: b.patch(region, "cfg", set={"x": 1, ("limits", "hi"): 8}),
                           lambda a: a.patch(region, "cfg", set={"y": 2, ("limits", "lo"): 2}))
    value = {"x": 1, "y": 2, "limits": {"lo": 2, "hi": 8}}
    expected = diff.merge_hash(region, "cfg", [bytes.fromhex(va), bytes.fromhex(vb)], value).hex()
    merged = agreed_everywhere(nodes, region, "cfg", expected)
    assert set(merged.parents) == {va, vb} and merged.author == "" and merged.value == value
    for n in nodes:
        assert n.get(region, "cfg") == merged.value
        assert {fv.version: fv.state for fv in n.history(region, "cfg")} == {
            v0: "consensus", va: "consensus", vb: "consensus", merged.version: "consensus"}


def test_conflicting_edits_keep_both_forks_and_agree(make_swarm, region):
    nodes, _ = make_swarm(5)
    v0 = nodes[0].put(region, "valve", {"open": False, "note": "start"})
    consensus_everywhere(nodes, region, "valve", v0)
    va, vb = _offline_edit(nodes, region, "valve",
                           lambda b: b.patch(region, "valve", set={"open": True}),
                           lambda a: a.patch(region, "valve", set={"open": "half"}))
    agreed_everywhere(nodes, region, "valve", va, forks=[vb])  # four votes against one
    for n in nodes:
        forks = n.forks(region, "valve")
        assert [f.version for f in forks] == [vb] and forks[0].value == {"open": True, "note": "start"}
        states = {fv.version: fv.state for fv in n.history(region, "valve")}
        assert states == {v0: "consensus", va: "consensus", vb: "fork"}


def test_node_crashing_mid_vote_restarts_into_the_same_state(make_swarm, region):
    nodes, _ = make_swarm(5)
    a, e = nodes[0], nodes[4]
    v0 = a.put(region, "pump", {"rpm": 100})
    consensus_everywhere(nodes, region, "pump", v0)
    e.transport.close()  # e's link goes down...
    v1 = a.patch(region, "pump", set={"rpm": 200})
    consensus_everywhere(nodes[:4], region, "pump", v1)
    # ...just after the diff reached it: e stores v1 and its vote, but dies before sending it.
    raw = a.store.db.execute("SELECT envelope FROM diffs WHERE version = ?", [bytes.fromhex(v1)]).fetchone()[0]
    e.receive(region_topic("diff", region), raw)
    assert e.head(region, "pump").version == v1 and e.store.unpublished()
    e.store.close()  # crash: no clean stop

    restarted = Node(e.config).start()
    try:
        consensus_everywhere([restarted], region, "pump", v1)
        assert restarted.wait_published(TIMEOUT) and not restarted.store.unpublished()
        for n in nodes[:4]:
            assert n.wait_until(lambda n=n: n.status(region, "pump")["votes"].get(e.node_id) == v1, TIMEOUT)
        assert {n.status(region, "pump")["support"][v1] for n in nodes[:4]} == {5}
        assert restarted.wait_until(lambda: restarted.status(region, "pump")["support"].get(v1) == 5, TIMEOUT)
    finally:
        restarted.stop()


def test_rogue_outsider_cannot_move_consensus(make_swarm, make_node, region):
    nodes, _ = make_swarm(4)
    rogue = make_node("rogue")  # a valid key, but not in anyone's member list
    v0 = nodes[0].put(region, "door", {"locked": True})
    consensus_everywhere(nodes, region, "door", v0)
    assert rogue.wait_until(lambda: rogue.head(region, "door") is not None, TIMEOUT)
    vr = rogue.patch(region, "door", set={"locked": False})  # built on the consensus, and voted for
    for n in nodes:
        assert n.wait_until(lambda n=n: n.store.has_version(bytes.fromhex(vr))
                            and n.status(region, "door")["votes"].get(rogue.node_id) == vr, TIMEOUT)
        status = n.status(region, "door")
        assert status["consensus"] == v0 and status["head"] == v0
        assert n.store.version(bytes.fromhex(vr)).state == "ineligible"
        assert vr not in status["support"]
        assert n.get(region, "door") == {"locked": True}


def test_equivocating_member_is_flagged_and_ignored(make_swarm, region, attacker):
    nodes, (mallory,) = make_swarm(4, extra_members=1)
    v0 = nodes[0].put(region, "door", {"locked": True})
    consensus_everywhere(nodes, region, "door", v0)
    topic = region_topic("vote", region)
    other = diff.version_hash(region, "door", bytes.fromhex(v0), {"locked": False})
    attacker.send(topic, encode(mallory, "vote", region, 1, 1,
                                {"key": "door", "version": bytes.fromhex(v0), "round": 1}).raw)
    for n in nodes:
        assert n.wait_until(lambda n=n: n.status(region, "door")["support"].get(v0) == 5, TIMEOUT)
    attacker.send(topic, encode(mallory, "vote", region, 2, 2,
                                {"key": "door", "version": other, "round": 1}).raw)
    for n in nodes:
        assert n.wait_until(lambda n=n: n.counters["equivocations"] == 1, TIMEOUT)
        status = n.status(region, "door")
        assert status["flagged"] == [mallory.node_id] and status["support"][v0] == 4
    attacker.send(topic, encode(mallory, "vote", region, 3, 3,
                                {"key": "door", "version": other, "round": 2}).raw)
    for n in nodes:
        assert n.wait_until(lambda n=n: n.counters["ignored.flagged-vote"] == 1, TIMEOUT)
        assert n.status(region, "door")["consensus"] == v0


def _diffs_and_votes(node, region, key, voter):
    """The bodies of a frame's diffs this node holds, and `voter`'s vote envelopes on it."""
    versions, votes = node.store.frame_items(region, key)
    return [decode(raw).body for _, raw in versions], [raw for v, _, raw in votes if v == voter]


def test_a_write_is_also_its_authors_vote(make_swarm, region):
    """A diff carries its writer's vote (a round in its body): no vote of the writer's own
    follows, and every node counts the one in the diff. With every member in the quorum, no
    node reaches consensus without it."""
    nodes, _ = make_swarm(3, quorum=3)
    a = nodes[0]
    v1 = a.put(region, "valve", {"open": True})
    consensus_everywhere(nodes, region, "valve", v1)
    v2 = a.patch(region, "valve", set={"open": False})
    consensus_everywhere(nodes, region, "valve", v2)
    for n in nodes:
        bodies, own = _diffs_and_votes(n, region, "valve", a.node_id)
        assert [b["round"] for b in bodies] == [1, 2] and n.status(region, "valve")["votes"][a.node_id] == v2
        assert decode(own[-1]).kind == "diff" and decode(own[-1]).body["version"].hex() == v2
    assert a.counters["bytes-out.vote"] == 0


def test_a_batch_votes_in_the_diff_of_each_frames_last_change(make_swarm, region):
    """A frame a batch changes three times: only the diff of its last change carries the
    writer's vote, in one round after the frame's last (none spent on the versions between,
    no vote apart), and every node counts it. With every member in the quorum, no node
    reaches consensus without it."""
    nodes, _ = make_swarm(3, quorum=3)
    a = nodes[0]
    v0 = a.put(region, "valve", {"n": 0})
    consensus_everywhere(nodes, region, "valve", v0)
    with a.batch():
        v1, v2, v3 = (a.put(region, "valve", {"n": n}) for n in (1, 2, 3))
        other = a.put(region, "pump", {"on": True})
    assert a.counters["batches-out"] == 1
    consensus_everywhere(nodes, region, "valve", v3)
    consensus_everywhere(nodes, region, "pump", other)
    for n in nodes:
        bodies, own = _diffs_and_votes(n, region, "valve", a.node_id)
        rounds = {b["version"].hex(): b.get("round") for b in bodies}
        assert rounds == {v0: 1, v1: None, v2: None, v3: 2}
        assert decode(own[-1]).kind == "diff" and n.status(region, "valve")["votes"][a.node_id] == v3
        assert _diffs_and_votes(n, region, "pump", a.node_id)[0][0]["round"] == 1
    assert a.counters["bytes-out.vote"] == 0


def decided_alike(node, region, key):
    """What the node holds of a frame (head, consensus, every version's state) is what
    deciding it afresh gives."""
    with node.store.transaction():  # (nothing else decided meanwhile)
        frame = node.store.frame(region, key)
        d = node._decide(region, key, readonly=True, frame=frame)
        assert (frame.head, frame.consensus) == (d.head, d.consensus)
        assert {v: meta.state for v, meta in d.dag.versions.items()} == d.states


def test_own_writes_on_a_single_leaf_move_the_head_alone(make_swarm, region):
    """A node's writes on a frame whose last decision found its head the single leaf skip
    the decision (their versions are shadows, and nothing else moves): what they leave is
    what deciding gives. Once the frame has forks, a write is decided in full."""
    nodes, _ = make_swarm(3)
    a, b, _ = nodes
    v0 = a.put(region, "k", {"n": 0})
    consensus_everywhere(nodes, region, "k", v0)
    skipped = a.counters["decisions-skipped"]
    with a._working, b._working:  # (neither takes the other's messages meanwhile)
        with a.batch():
            for n in (1, 2, 3):
                a.put(region, "k", {"n": n})
            a.put(region, "other", {"n": 1})  # (a new frame: decided)
        last = a.put(region, "k", {"n": 4})
        assert a.counters["decisions-skipped"] == skipped + 2
        assert a.status(region, "k")["head"] == last and a.status(region, "k")["consensus"] == v0
        decided_alike(a, region, "k")
        b.put(region, "k", {"m": 1})  # conflicts with a's branch (n changed / deleted)
    assert a.wait_until(lambda: a.forks(region, "k"), TIMEOUT)  # (either branch may win)
    skipped = a.counters["decisions-skipped"]
    a.put(region, "k", {"n": 5})
    assert a.counters["decisions-skipped"] == skipped
    decided_alike(a, region, "k")


def test_votes_apart_from_diffs_for_older_nodes(member_configs, region):
    """node.votes_in_diffs = false (for a swarm that still has nodes older than 0.5, which
    reject a diff with a round): that node's diffs carry no round and its votes go apart; a
    swarm of both kinds agrees, on every frame and digest."""
    configs = member_configs(3, sync_interval=0)
    configs[0].votes_in_diffs = False
    nodes = []
    try:
        nodes = [Node(c).start() for c in configs]
        apart, inside = nodes[0], nodes[1]
        va = apart.put(region, "a", {"n": 1})
        vb = inside.put(region, "b", {"n": 2})
        consensus_everywhere(nodes, region, "a", va)
        consensus_everywhere(nodes, region, "b", vb)
        for n in nodes:
            bodies, own = _diffs_and_votes(n, region, "a", apart.node_id)
            assert "round" not in bodies[0] and decode(own[-1]).kind == "vote"
            bodies, own = _diffs_and_votes(n, region, "b", inside.node_id)
            assert bodies[0]["round"] == 1 and decode(own[-1]).kind == "diff"
        assert same_digest(nodes, region, TIMEOUT)
    finally:
        for n in nodes:
            n.stop()


def test_a_diff_and_a_vote_in_one_round_are_equivocation(make_swarm, region, attacker):
    """A member whose diff carries its vote for one version in a round, and who then votes
    for another in the same round, is flagged: the diff is one of the two signed pieces."""
    nodes, (mallory,) = make_swarm(3, extra_members=1)
    v0 = nodes[0].put(region, "door", {"locked": True})
    consensus_everywhere(nodes, region, "door", v0)
    parent = bytes.fromhex(v0)
    vm = diff.version_hash(region, "door", parent, {"locked": False})
    attacker.send(region_topic("diff", region), encode(mallory, "diff", region, 1, 1, {
        "key": "door", "parent": parent, "version": vm, "ops": [["set", ["locked"], False]], "round": 1}).raw)
    for n in nodes:
        assert n.wait_until(lambda n=n: n.status(region, "door")["votes"].get(mallory.node_id) == vm.hex(), TIMEOUT)
    attacker.send(region_topic("vote", region), encode(mallory, "vote", region, 2, 2,
                                                       {"key": "door", "version": parent, "round": 1}).raw)
    for n in nodes:
        assert n.wait_until(lambda n=n: n.counters["equivocations"] == 1, TIMEOUT)
        assert n.status(region, "door")["flagged"] == [mallory.node_id]


def test_incoherent_version_never_becomes_consensus(make_swarm, region, attacker):
    rule = Rule(region=region, required=("rpm",), types={"rpm": "int"})
    nodes, (member,) = make_swarm(4, extra_members=1, rules=[rule])
    a = nodes[0]
    a.add_validator(lambda r, k, v: "rpm above 3000" if v.get("rpm", 0) > 3000 else None, region)
    with pytest.raises(CoherenceError, match="missing required key 'rpm'"):
        a.put(region, "pump", {"speed": 1})
    with pytest.raises(CoherenceError, match="rpm above 3000"):
        a.put(region, "pump", {"rpm": 5000})
    assert a.head(region, "pump") is None and not a.store.unpublished()

    v0 = a.put(region, "pump", {"rpm": 100})
    consensus_everywhere(nodes, region, "pump", v0)
    # A member bypasses its own checks: a validly signed diff that breaks the rule, and a vote.
    bad_value = {"rpm": "fast"}
    bad = diff.version_hash(region, "pump", bytes.fromhex(v0), bad_value)
    attacker.send(region_topic("diff", region), encode(member, "diff", region, 1, 1, {
        "key": "pump", "parent": bytes.fromhex(v0), "version": bad, "ops": [["set", ["rpm"], "fast"]]}).raw)
    attacker.send(region_topic("vote", region), encode(member, "vote", region, 2, 2,
                                                       {"key": "pump", "version": bad, "round": 1}).raw)
    for n in nodes:
        assert n.wait_until(lambda n=n: n.status(region, "pump")["votes"].get(member.node_id) == bad.hex(), TIMEOUT)
        fv = n.store.version(bad)
        assert fv is not None and fv.state == "rejected"
        assert "'rpm' must be int" in n.store.rejection_reason(bad)
        assert n.status(region, "pump")["consensus"] == v0 and n.get(region, "pump") == {"rpm": 100}


def test_a_node_whose_rounds_on_a_frame_are_spent_still_writes_it(make_swarm, region):
    """A node's vote rounds on a frame end at MAX_ROUND: its next write of the frame goes out
    with no vote in it (a round beyond would have every peer refuse the diff), and the other
    members bring it to consensus."""
    nodes, _ = make_swarm(3)
    a = nodes[0]
    v1 = a.put(region, "hot", {"n": 1})
    consensus_everywhere(nodes, region, "hot", v1)
    with a.store.transaction():
        f = a.store.frame(region, "hot")
        a.store.set_frame(region, "hot", Frame(f.head, f.consensus, MAX_ROUND, f.settled))
    v2 = a.put(region, "hot", {"n": 2})
    consensus_everywhere(nodes, region, "hot", v2)
    assert "round" not in _diffs_and_votes(a, region, "hot", a.node_id)[0][-1]
    assert a.counters["votes.rounds-spent"] >= 1
    assert not any(n.counters["rejected.bad-diff"] for n in nodes)
