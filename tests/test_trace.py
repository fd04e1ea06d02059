"""The trace: every node's signed hash chain, fetched and checked by its peers."""

from __future__ import annotations

from edgeswarm.node import Config, Node
from edgeswarm.node.trace import EVENTS_PER_ENTRY, entry_hash, parse, verify_chain
from edgeswarm.shared import packing
from edgeswarm.shared.envelope import canonical, encode
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.topics import node_topic, region_topic

from test_relay import relaying

TIMEOUT = 15.0


def test_traces_chain_spread_and_rewrites_are_caught(make_swarm, region, attacker):
    nodes, _ = make_swarm(3, sync_interval=0)
    a, b, c = nodes
    v = a.put(region, "door", {"locked": True})
    assert b.wait_until(lambda: b.head(region, "door") is not None and b.head(region, "door").version == v, TIMEOUT)
    b.patch(region, "door", set={"locked": False})
    for n in nodes:
        assert n.wait_until(lambda n=n: n.get(region, "door", consensus=True) == {"locked": False}, TIMEOUT)

    own = a.trace.entries(a.node_id)
    events = [(event, data) for e in own for event, _, data in e.events]
    # a write and the vote on it are one transaction: one event holds both (the vote's round)
    assert verify_chain(own) and own[0].event == "wrote" and own[0].data["round"] == 1
    assert "voted" not in {ev for ev, _ in events}  # (every vote here was on a version written or taken)
    assert {"accepted", "consensus"} <= {ev for ev, _ in events}
    assert any(ev == "wrote" and data["version"] == bytes.fromhex(v) for ev, data in events)

    for n in nodes:  # every vote is in: the traces stop growing
        assert n.wait_until(lambda n=n: n.status(region, "door")["support"].get(n.status(region, "door")["head"]) == 3,
                            TIMEOUT)
    for n in nodes:
        n.trace.settle()  # (the decisions waiting for a next entry: written now, as a round would)
    heads = {n.node_id: n.store.trace_head(n.node_id) for n in nodes}
    for n in nodes:
        n.sync_now()  # publishes trace heads: every node fetches the others' traces
    for n in nodes:
        for other in nodes:
            assert n.wait_until(lambda n=n, o=other: n.store.trace_head(o.node_id) == heads[o.node_id], TIMEOUT)
    copy = b.trace.entries(a.node_id)
    assert verify_chain(copy) and [e.hash for e in copy] == [e.hash for e in a.trace.entries(a.node_id)]

    # a "rewrites" its first entry: a validly signed, different entry at seq 1
    forged = canonical([1, None, 1, "wrote", {"region": region, "key": "door", "version": bytes(32)}])
    assert entry_hash(forged) != own[0].hash
    attacker.send(node_topic(b.node_id, "trace-resp"), encode(
        a.identity, "trace-resp", None, 10**9, 10**9, {"entries": [[forged, a.identity.sign(forged)]]}).raw)
    assert b.wait_until(lambda: b.counters["trace.forks"] == 1, TIMEOUT)
    assert a.node_id in b.store.flagged()
    assert b.trace.entries(b.node_id)[-1].events[-1][0] == "flagged"

    # a modified entry under the original signature is refused
    raw, sig = c.store.trace_range(a.node_id, 1, 1)[0]
    bad = raw[:-1] + bytes([raw[-1] ^ 1])
    attacker.send(node_topic(c.node_id, "trace-resp"), encode(
        a.identity, "trace-resp", None, 10**9 + 1, 10**9, {"entries": [[bad, sig]]}).raw)
    assert c.wait_until(lambda: c.counters["rejected.trace-signature"] == 1, TIMEOUT)
    assert c.store.trace_entry(a.node_id, 1)[1] == raw


def test_new_entries_are_pushed_to_every_peer_and_a_late_one_fetches_the_rest(member_configs, region):
    """A round sends each peer the entries recorded since the last one, in one message to
    all, without being asked; a node that missed earlier ones asks for those alone."""
    configs = member_configs(3, sync_interval=0, snapshot_interval=0)
    a, b = Node(configs[0]).start(), Node(configs[1]).start()
    late = Node(configs[2])
    try:
        for i in range(20):
            a.put(region, f"k{i}", {"i": i})
        assert a.wait_until(lambda: all(a.status(region, f"k{i}")["support"].get(a.status(region, f"k{i}")["head"])
                                        == 2 for i in range(20)), TIMEOUT)
        a.trace.push()  # entries only, no head: b learns them from the push alone
        head = a.store.trace_head(a.node_id)
        assert b.wait_until(lambda: b.store.trace_head(a.node_id) == head, TIMEOUT), b.counters
        assert not b.counters["trace.requests-sent"] and b.counters["trace.entries-fetched"] == head[0]
        # both read packs (their births say so): the push came packed, in fewer bytes than its entries
        assert b.counters["bytes-in.trace"] < sum(len(r) + len(s) for r, s in a.store.trace_range(a.node_id, 1, None))

        late.start()
        a.put(region, "m1", {"i": 1})
        assert a.wait_until(lambda: a.status(region, "m1")["support"].get(a.status(region, "m1")["head"]) == 3,
                            TIMEOUT)
        a.trace.push()  # only what came since the first push: late fetches the beginning first
        head = a.store.trace_head(a.node_id)
        for n in (b, late):
            assert n.wait_until(lambda n=n: n.store.trace_head(a.node_id) == head, TIMEOUT), n.counters
            assert [e.hash for e in n.trace.entries(a.node_id)] == [e.hash for e in a.trace.entries(a.node_id)]
        assert not b.counters["trace.requests-sent"]
        assert late.counters["trace.requests-sent"] >= 1 and not late.counters["rejected.trace-chain"]
        # late asked for packs: the responses came packed too
        fetched = sum(len(r) + len(s) for r, s in late.store.trace_range(a.node_id, 1, None))
        assert 0 < late.counters["bytes-in.trace-resp"] + late.counters["bytes-in.trace"] < fetched
    finally:
        for n in (late, b, a):
            n.stop()


def test_metrics_reflect_the_swarm(make_swarm, region):
    nodes, _ = make_swarm(3, sync_interval=0)
    a = nodes[0]
    for i in range(4):
        a.put(region, f"k{i}", {"i": i})
    for n in nodes:
        assert n.wait_until(lambda n=n: all(
            n.status(region, f"k{i}")["support"].get(n.status(region, f"k{i}")["consensus"] or "") == 3
            for i in range(4)), TIMEOUT)
    for n in nodes:
        n.trace.settle()  # (the decisions waiting for a next entry: written now, as a round would)
    heads = {n.node_id: n.store.trace_head(n.node_id) for n in nodes}
    for n in nodes:
        n.sync_now()
    assert a.wait_until(lambda: all(a.store.trace_head(o.node_id) == heads[o.node_id] for o in nodes[1:]), TIMEOUT)
    m = a.metrics()
    assert m["frames"] == 4 and m["frames_at_consensus"] == 4
    assert m["convergence"] == 1.0 and m["conflict_rate"] == 0.0
    assert m["access_latency_ms"]["count"] == 4 and m["access_latency_ms"]["p50"] >= 0
    assert m["trace_depth"] == 3.0  # all three nodes' traces confirm every consensus version


def _chained(entries) -> bool:
    return all(e.seq == p.seq + 1 and e.prev == p.hash for p, e in zip(entries, entries[1:]))


def test_traces_are_kept_to_their_limit_and_a_late_peer_starts_from_what_is_left(member_configs, region):
    configs = member_configs(2, trace_kept=100, sync_interval=0, snapshot_interval=0)
    a = Node(configs[0]).start()
    b = Node(configs[1])
    try:
        for i in range(160):  # (a write and its vote: one entry)
            a.put(region, f"k{i}", {"i": i})
        head = a.store.trace_head(a.node_id)
        assert head[0] > 150 and a.trace.prune() == head[0] - 100
        kept = a.trace.entries(a.node_id)
        assert len(kept) == 100 and kept[0].seq == head[0] - 99 and _chained(kept)

        b.start()  # late: it never held the first entries, and a no longer has them
        announced = a.store.trace_head(a.node_id)  # (a's trace grows on as b's votes come in)
        a.sync_now()
        assert b.wait_until(lambda: b.store.trace_head(a.node_id) is not None
                            and b.store.trace_head(a.node_id)[0] >= announced[0], TIMEOUT), b.counters
        assert b.counters["trace.anchored"] == 1 and not b.counters["rejected.trace-chain"]
        copy = b.trace.entries(a.node_id)
        assert copy[0].seq >= kept[0].seq and _chained(copy)  # (a pruned again as it grew)
        assert all(a.store.trace_entry(a.node_id, e.seq)[0] == e.hash for e in copy)

        # Far behind (more than one response holds): one announced head is enough to catch up.
        for i in range(600):
            a.put(region, f"m{i}", {"i": i})
        target = a.store.trace_head(a.node_id)
        a.trace.publish_head()  # (the head alone: a round would prune a's trace first)
        assert b.wait_until(lambda: (h := b.store.trace_head(a.node_id)) is not None and h[0] >= target[0], TIMEOUT), \
            (b.store.trace_head(a.node_id), target)
        assert b.counters["trace.requests-sent"] >= 2 and b.counters["trace.anchored"] == 1
        copy = b.trace.entries(a.node_id)
        assert _chained(copy) and all(a.store.trace_entry(a.node_id, e.seq)[0] == e.hash for e in copy)
        b.trace.prune()
        assert len(b.trace.entries(a.node_id)) == 100 and len(b.trace.entries(b.node_id)) <= 100
    finally:
        b.stop()
        a.stop()


def test_a_response_is_checked_as_one_chain_under_its_last_signature(offline_pair):
    """Entries must link to each other and to the copy held, and the last one's signature,
    which covers all before it, must hold: a bad one keeps out the whole response."""
    a, b = offline_pair
    rows = a.store.trace_range(a.node_id, 1, None)
    assert len(rows) >= 4
    topic = node_topic(b.node_id, "trace-resp")

    def respond(seq: int, entries: list) -> None:
        b.receive(topic, encode(a.identity, "trace-resp", None, seq, seq, {"entries": entries}).raw)

    last_raw, last_sig = rows[3]
    respond(1, [list(r) for r in rows[:3]] + [[last_raw, bytes(64)]])
    assert b.counters["rejected.trace-signature"] == 1 and b.store.trace_head(a.node_id) is None
    respond(2, [list(r) for r in rows[1:4]])  # not from the start of the chain
    assert b.counters["rejected.trace-chain"] == 1 and b.store.trace_head(a.node_id) is None
    respond(3, [list(r) for r in rows[:4]])
    assert b.store.trace_head(a.node_id) == (4, a.store.trace_entry(a.node_id, 4)[0])
    assert [e.hash for e in b.trace.entries(a.node_id)] == [e.hash for e in a.trace.entries(a.node_id)][:4]
    assert b.counters["trace.entries-fetched"] == 4


def test_a_push_handled_after_its_senders_live_traffic_is_no_replay(offline_pair):
    """The inbox sets round traffic aside while live traffic goes first: a push handled
    after 70 newer votes of its sender is taken (its kind has a replay window of its own),
    and the same push again is a duplicate."""
    a, b = offline_pair
    rows = a.store.trace_range(a.node_id, 1, None)
    push = encode(a.identity, "trace", None, 1, 1, {"entries": [list(r) for r in rows]}).raw
    version = bytes.fromhex(a.head("plant/a", "k0").version)
    for seq in range(2, 72):
        b.receive(region_topic("vote", "plant/a"),
                  encode(a.identity, "vote", "plant/a", seq, seq, {"key": "k0", "version": version, "round": seq}).raw)
    b.receive(node_topic(a.node_id, "trace"), push)
    assert b.counters["rejected.replay"] == 0
    assert b.store.trace_head(a.node_id) == a.store.trace_head(a.node_id)
    b.receive(node_topic(a.node_id, "trace"), push)
    assert b.counters["rejected.duplicate"] == 1


def test_entries_travel_packed_to_nodes_that_read_packs(offline_pair):
    """A push goes packed while every live peer's birth or fingerprint says it reads packs,
    a response when its request says so; packed or not, the copy is the same, and a pack
    that is not one is refused with nothing stored."""
    a, b = offline_pair
    rows = [list(r) for r in a.store.trace_range(a.node_id, 1, None)]
    plain = sum(len(raw) + len(sig) for raw, sig in rows)
    packed = a.trace._carrying(rows, True)
    assert list(packed) == ["packed"] and len(packed["packed"]) < plain * 0.8
    assert a.trace._carrying(rows, False) == {"entries": rows}

    # what a push carries follows what the live peers say of themselves
    def presence(who, kind: str, seq: int, body: dict) -> None:
        a.receive(node_topic(who.node_id, kind), encode(who.identity, kind, None, seq, seq, body).raw)

    presence(b, "birth", 1, {"session": 1, "regions": ["plant"]})  # (an older release: no "packs")
    assert a.presence.without("packs") == {b.node_id}
    presence(b, "fingerprint", 2, {"session": 1, "packs": True})
    assert not a.presence.without("packs")
    presence(b, "fingerprint", 3, {"session": 1})
    assert a.presence.without("packs") == {b.node_id}
    presence(b, "death", 4, {"session": 1})
    assert not a.presence.without("packs")

    topic = node_topic(b.node_id, "trace-resp")

    def respond(seq: int, body: dict) -> None:
        b.receive(topic, encode(a.identity, "trace-resp", None, seq, seq, body).raw)

    respond(1, {"packed": packing.pack([x for pair in rows for x in pair][:-1])})  # a signature short
    respond(2, {"packed": packing.pack([bytes(a.config.max_message_bytes)] * 2)})  # inflates beyond the limit
    respond(3, {"packed": b"\x78\x9c not deflate"})
    assert b.counters["rejected.bad-sync"] == 3 and b.store.trace_head(a.node_id) is None
    respond(4, packed)
    assert [e.hash for e in b.trace.entries(a.node_id)] == [e.hash for e in a.trace.entries(a.node_id)]
    assert b.counters["trace.entries-fetched"] == len(rows)


def test_what_a_node_did_with_others_versions_waits_for_its_next_entry(tmp_path):
    """Diffs taken, the votes cast on them and the consensus the others' votes reach write no
    entry of their own: they ride in the node's next entry (its own write, or one once LINGER
    is up or EVENTS_PER_ENTRY wait), so a member taking change after change writes one entry
    for many; reading the trace (or a push, or a stop) writes what still waits."""
    homes = [tmp_path / name for name in "abcd"]
    ids = [Identity.load_or_create(h / "node.key") for h in homes]
    members = [i.node_id for i in ids]
    a, b = (Node(Config(home=h, regions=["plant"], members=members, sync_interval=0)) for h in homes[:2])
    c = ids[2]

    def change(i: int) -> None:  # a writes; b takes the diff and votes (2 of 4: no quorum), then c's vote decides
        version = bytes.fromhex(a.put("plant/x", f"k{i}", {"i": i}))
        for item in a.store.unpublished():
            a.store.mark_published([item.seq])
            b.receive(item.topic, item.envelope)
        assert b.consensus("plant/x", f"k{i}") is None
        b.receive(region_topic("vote", "plant/x"),
                  encode(c, "vote", "plant/x", i + 1, i + 1, {"key": f"k{i}", "version": version, "round": 1}).raw)
        assert b.consensus("plant/x", f"k{i}").version == version.hex()

    try:
        for i in range(5):
            change(i)
        assert b.store.trace_head(b.node_id) is None  # ten events wait
        b.put("plant/x", "own", {"by": "b"})
        own = b.trace.entries(b.node_id)
        assert len(own) == 1 and verify_chain(own)
        assert [event for event, _, _ in own[0].events] == ["accepted", "consensus"] * 5 + ["wrote"]
        assert all(data["round"] == 1 for event, _, data in own[0].events if event == "accepted")
        hlcs = [hlc for _, hlc, _ in own[0].events]
        assert hlcs == sorted(hlcs)  # (each event keeps the time it happened)

        for i in range(5, 5 + EVENTS_PER_ENTRY // 2 + 1):  # one event more than an entry holds: written
            change(i)
        assert b.store.trace_head(b.node_id)[0] == 3
        own = b.trace.entries(b.node_id)
        assert [len(e.events) for e in own] == [11, EVENTS_PER_ENTRY, 1, 1] and verify_chain(own)
    finally:
        a.stop()
        b.stop()


def test_a_waiting_decision_is_written_by_the_worker_in_time(member_configs, region):
    configs = member_configs(4, sync_interval=0, snapshot_interval=0)  # quorum 3; the fourth never runs
    a, b, c = (Node(config).start() for config in configs[:3])
    try:
        relaying([a, b, c])  # (each knows the others pass votes on)
        head = b.store.trace_head(b.node_id)
        version = a.put(region, "k", {"x": 1})
        assert b.wait_until(lambda: (fv := b.consensus(region, "k")) is not None and fv.version == version, TIMEOUT)

        def decided() -> bool:
            rows = b.store.trace_range(b.node_id, (head[0] if head else 0) + 1, None)
            return any(event == "consensus" for raw, _ in rows for event, _, _ in parse(b.node_id, raw).events)
        assert b.wait_until(decided, TIMEOUT)  # nothing else happens: written once LINGER is up
    finally:
        for n in (c, b, a):
            n.stop()
