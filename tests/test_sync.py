"""Anti-entropy: a node that missed traffic gets exactly what it lacks from its peers."""

from __future__ import annotations

import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import reduce
from operator import xor

import cbor2
import pytest

from edgeswarm.node import Config, Node, sync
from edgeswarm.node.digest import FANOUT_BITS, POS_BITS, position, version_item
from edgeswarm.shared import diff, packing, shortening
from edgeswarm.shared.envelope import canonical, decode, decode_many, encode, message_id
from edgeswarm.shared.identity import node_id_of
from edgeswarm.shared.topics import node_topic
from helpers import Network, restored, sync_body
from test_relay import relaying

TIMEOUT = 20.0


def consensus_map(node, region, keys):
    return {k: (c.version if (c := node.consensus(region, k)) else None) for k in keys}


def level1(region: str, key: str) -> int:
    """The level-1 node of the digest tree that a frame lies in."""
    return position(region, key) >> (POS_BITS - FANOUT_BITS)


def digests_meet(x, y, region, timeout):
    """x's digest equal to y's, checked again as either handles a message (the last change
    may be y's, after x handled its last one)."""
    deadline = time.monotonic() + timeout
    same = lambda: x.sync.digest(region) == y.sync.digest(region)  # noqa: E731
    while time.monotonic() < deadline:
        if x.wait_until(same, 0.5) or y.wait_until(same, 0.5):
            return True
    return False


def test_late_joiner_and_cut_off_node_catch_up_by_sync(member_configs, region):
    configs = member_configs(4, sync_interval=0)
    a, b, c = (Node(cfg).start() for cfg in configs[:3])
    late = Node(configs[3])
    try:
        keys = [f"sensor-{i}" for i in range(30)]
        for i, k in enumerate(keys):
            a.put(region, k, {"reading": i})
        b.patch(region, "sensor-0", set={"unit": "C"})
        assert a.wait_until(lambda: None not in consensus_map(a, region, keys).values()
                            and a.get(region, "sensor-0", consensus=True) == {"reading": 0, "unit": "C"}, TIMEOUT)
        expected = consensus_map(a, region, keys)
        for n in (b, c):
            assert n.wait_until(lambda n=n: consensus_map(n, region, keys) == expected, TIMEOUT)

        # A node that was never there: no broker session holds anything for it.
        late.start()
        assert late.keys(region) == []
        late.sync_now()
        assert late.wait_until(lambda: consensus_map(late, region, keys) == expected, TIMEOUT), late.stats()
        assert late.get(region, "sensor-0", consensus=True) == {"reading": 0, "unit": "C"}
        assert late.counters["rejected.internal"] == 0
        first_catch_up = late.counters["sync.envelopes"]
        assert first_catch_up >= 31  # every diff, plus votes
        # (consensus comes with a quorum: the other votes, those the responder left to their
        # voters to send, come after it)
        assert digests_meet(late, a, region, TIMEOUT)

        # Cut off, and its broker session lost: it misses one change, and sync brings only that.
        late.stop()
        late = Node(configs[3])
        late.transport.persistent = False  # reconnect with a clean session: nothing queued for it
        a.patch(region, "sensor-7", set={"reading": 70})
        for n in (a, b, c):
            assert n.wait_until(lambda n=n: n.get(region, "sensor-7", consensus=True) == {"reading": 70}, TIMEOUT)
        late.start()
        before = late.counters["sync.envelopes"]
        assert before == 0 and late.get(region, "sensor-7", consensus=True) == {"reading": 7}
        late.sync_now()
        assert late.wait_until(lambda: late.get(region, "sensor-7", consensus=True) == {"reading": 70}, TIMEOUT)
        # One pull (the three peers' answers do not start three), walking down to the one
        # differing frame, and only what the asker lacks there: the new diff and the three
        # new votes, not the 31 versions it holds.
        moved = late.counters["sync.envelopes"]
        assert late.counters["sync.pulls"] == 1, late.stats()
        assert 1 <= moved <= 4, moved
        assert consensus_map(late, region, keys) == consensus_map(a, region, keys)
    finally:
        for n in (a, b, c, late):
            n.stop()


def test_a_pull_is_answered_packed_and_a_node_that_reads_no_packs_gets_lists(member_configs, region, attacker):
    """What a pull brings travels packed (shared/packing.py) to a node that says in its
    sync-reqs it reads packs, in well under the bytes of the envelopes; a node that does
    not say so (one before packs) is sent lists, and both catch up alike."""
    configs = member_configs(5, sync_interval=0, snapshot_interval=0)
    a, b, c = (Node(cfg).start() for cfg in configs[:3])
    late, old = Node(configs[3]), Node(configs[4])
    old.sync._request = lambda peer, body: old.sync._send(peer, "sync-req", body)  # (as a node before packs)
    seen: dict[str, list[dict]] = {late.node_id: [], old.node_id: []}
    subscribed = threading.Event()
    attacker.client.on_subscribe = lambda *a_: subscribed.set()
    attacker.client.on_message = lambda c, u, m: seen.setdefault(m.topic.split("/")[3], []).append(
        sync_body(m.payload))
    attacker.client.subscribe("es/v1/node/+/sync-resp", qos=1)
    assert subscribed.wait(TIMEOUT)
    try:
        keys = [f"sensor-{i}" for i in range(40)]
        with a.batch():
            for i, k in enumerate(keys):
                a.put(region, k, {"reading": i, "unit": "C", "place": "line 1, cabinet 4"})
        assert a.wait_until(lambda: None not in consensus_map(a, region, keys).values(), TIMEOUT)
        expected = consensus_map(a, region, keys)
        for n in (b, c):
            assert n.wait_until(lambda n=n: consensus_map(n, region, keys) == expected, TIMEOUT)
        for n in (late, old):
            n.start()
            n.sync_now()
            assert n.wait_until(lambda n=n: consensus_map(n, region, keys) == expected, TIMEOUT), n.stats()
            assert not any(k.startswith("rejected.") for k in n.counters), n.stats()
        assert late.wait_until(lambda: len([r for r in seen[late.node_id] if "last" in r]) >= 1, TIMEOUT)
        carried = [r for r in seen[late.node_id] if "packed" in r or "envelopes" in r]
        assert carried and all("packed" in r and "envelopes" not in r for r in carried), carried
        raws = [raw for r in carried for raw in packing.unpack(r["packed"], 1 << 20)]
        items = [env.raw for raw in raws for env in decode_many(restored(raw, late))]  # (whole batches opened)
        assert len(items) == late.counters["sync.envelopes"] >= len(keys)
        assert sum(len(r["packed"]) for r in carried) < sum(map(len, items)) / 2
        assert old.wait_until(lambda: len([r for r in seen[old.node_id] if "last" in r]) >= 1, TIMEOUT)
        carried = [r for r in seen[old.node_id] if "packed" in r or "envelopes" in r]
        assert carried and all("envelopes" in r and "packed" not in r for r in carried), carried
        # (nor a whole batch: it said nothing of batches either)
        assert all(type(cbor2.loads(raw)[0]) is bytes for r in carried for raw in r["envelopes"])

        # A member's pack that would unfold beyond a message's limit is refused, counted.
        bomb = zlib.compress(canonical([bytes(4 * late.config.max_message_bytes)]))
        attacker.send(node_topic(late.node_id, "sync-resp"), encode(
            c.identity, "sync-resp", None, 10**6, c.clock.now(), {"region": region, "packed": bomb}).raw)
        assert late.wait_until(lambda: late.counters["rejected.bad-sync"] == 1, TIMEOUT), late.stats()
    finally:
        for n in (a, b, c, late, old):
            n.stop()


def test_changes_made_together_go_as_one_message_and_reach_a_late_node_one_by_one(member_configs, region,
                                                                                   attacker):
    """A batch of writes leaves as one signed message (and the votes on it as one per
    node); a peer keeps each change with its path to the batch's signature, so a node that
    was not there pulls exactly the changes it lacks, each checked on its own, and when it
    lacks all of a batch, as that batch (one signature, no paths)."""
    configs = member_configs(3, sync_interval=0)
    a, b = (Node(cfg).start() for cfg in configs[:2])
    late = Node(configs[2])
    pulled: list[bytes] = []
    subscribed = threading.Event()
    attacker.client.on_subscribe = lambda *a_: subscribed.set()
    attacker.client.on_message = lambda c, u, m: pulled.extend(
        raw for body in [decode(m.payload).body] if "packed" in body for raw in packing.unpack(body["packed"], 1 << 20))
    attacker.client.subscribe(node_topic(late.node_id, "sync-resp"), qos=1)
    assert subscribed.wait(TIMEOUT)
    try:
        keys = [f"k{i}" for i in range(40)]
        with pytest.raises(RuntimeError):  # a batch is all or nothing
            with a.batch():
                a.put(region, "abandoned", {"x": 1})
                raise RuntimeError("the sensor read failed")
        assert a.get(region, "abandoned") is None and not a.store.unpublished()
        heads = []
        a.subscribe(lambda fv: fv.state == "shadow" and heads.append(fv.key), region)
        with a.batch():
            for i, k in enumerate(keys):
                a.put(region, k, {"reading": i})
            for k in keys[:10]:  # changed again: decided once, when the batch ends
                a.patch(region, k, set={"unit": "C"})
                assert a.get(region, k) == {"reading": int(k[1:]), "unit": "C"}  # (read inside: its own writes)
        # the 50 diffs; a's vote on each frame in the diff of its last change: 40 votes, none apart
        assert a.counters["batches-out"] == 1 and a.counters["bytes-out.vote"] == 0
        assert a.store.db.execute("SELECT COUNT(*) FROM votes WHERE voter = ?", [a.node_id]).fetchone()[0] == 40
        assert sorted(heads) == sorted(keys)  # one notice per frame, for its last version
        assert a.wait_until(lambda: None not in consensus_map(a, region, keys).values(), TIMEOUT), a.stats()
        expected = consensus_map(a, region, keys)
        assert expected == {k: a.head(region, k).version for k in keys}
        assert b.wait_until(lambda: consensus_map(b, region, keys) == expected, TIMEOUT), \
            {k: (v, expected[k]) for k, v in consensus_map(b, region, keys).items() if v != expected[k]}
        assert b.counters["rejected.replay"] == 0 and b.counters["batches-out"] >= 1
        a.stop()  # the late node can only pull from b, which holds a's diffs as item forms

        late.start()
        late.sync_now()
        assert late.wait_until(lambda: consensus_map(late, region, keys) == expected, TIMEOUT), late.stats()
        assert not any(k.startswith("rejected.") for k in late.counters), late.stats()
        # a's 50 diffs came from b as a's batch again: [[payloads], signature]
        assert late.wait_until(lambda: any(len(cbor2.loads(raw)[0]) == 50 for raw in pulled
                                           if type(cbor2.loads(raw)[0]) is list), TIMEOUT)
        assert sum(len(decode_many(restored(raw, late))) for raw in pulled) == late.counters["sync.envelopes"]
    finally:
        for n in (a, b, late):
            n.stop()


def _vote_batches(pulled: list[tuple[bytes, bytes]], node: Node) -> dict[bytes, list]:
    """signer -> the votes of the whole batches among what a node was sent."""
    out: dict[bytes, list] = {}
    for _, raw in pulled:
        if type(cbor2.loads(raw)[0]) is list:
            envs = decode_many(restored(raw, node))
            if all(e.kind == "vote" for e in envs):
                out.setdefault(envs[0].sender, []).extend(envs)
    return out


def _pulled_by(attacker, node) -> list[tuple[bytes, bytes]]:
    """What the node's sync responses bring it, as (sender, envelope), from now on."""
    pulled: list[tuple[bytes, bytes]] = []
    subscribed = threading.Event()
    attacker.client.on_subscribe = lambda *a_: subscribed.set()
    attacker.client.on_message = lambda c, u, m: pulled.extend(
        (env.sender, raw) for env in [decode(m.payload)]  # (packed or not: a chunk that packing
        for raw in sync.carried(env.body, 1 << 20))       # would not make smaller goes as it is)
    attacker.client.subscribe(node_topic(node.node_id, "sync-resp"), qos=1)
    assert subscribed.wait(TIMEOUT)
    return pulled


def _written_in_turn(writers, keys, region, others=()):
    """Each key written by the writers in turn, one at a time, each at consensus on every
    node before the next: every other member's vote on it is a message signed alone. Each
    write's relay (the others' votes, which its writer passes on as it reaches consensus)
    has come back to every other node before the next write, and before a node started
    next subscribes: else that node could take the last one live instead of in its pull."""
    nodes = (*writers, *others)
    relaying(nodes)  # (every vote goes through its writer)
    for i, k in enumerate(keys):
        writer = writers[i % len(writers)]
        voters = [n for n in nodes if n is not writer]
        before = {n: n.counters["own.relayed"] for n in voters}
        writer.put(region, k, {"reading": i})
        version = writer.head(region, k).version
        assert all(n.wait_until(lambda n=n: (c := n.consensus(region, k)) and c.version == version, TIMEOUT)
                   for n in nodes)
        assert all(n.wait_until(lambda n=n: n.counters["own.relayed"] > before[n], TIMEOUT) for n in voters)


def test_a_responders_own_votes_reach_a_puller_under_one_signature(member_configs, region, attacker):
    """The votes a responder cast itself, each signed alone as it voted, go to a puller
    under one batch signature it makes as it answers (the same messages: the puller holds
    them as if they had come one by one); to a puller that does not ask voters for their
    own (as before 0.9.3), the other voters' votes go as they were signed."""
    configs = member_configs(3, sync_interval=0, snapshot_interval=0)
    a, b = Node(configs[0]).start(), Node(configs[1]).start()
    late = Node(configs[2])
    late.sync._request = lambda peer, body: late.sync._send(peer, "sync-req", body | {"packed": True,
                                                                                     "batches": True})
    pulled = _pulled_by(attacker, late)  # (responder, envelope)
    try:
        keys = [f"k{i}" for i in range(20)]
        _written_in_turn([a, b], keys, region)  # (the other votes alone on each)
        expected = consensus_map(a, region, keys)
        late.start()
        late.sync_now()
        assert late.wait_until(lambda: consensus_map(late, region, keys) == expected, TIMEOUT), late.stats()
        assert digests_meet(late, a, region, TIMEOUT) and digests_meet(late, b, region, TIMEOUT)
        assert not any(k.startswith("rejected.") for k in late.counters), late.stats()
        responder = {sender for sender, _ in pulled}
        assert len(responder) == 1, "one pull"
        responder = responder.pop()
        other = ({a.identity.public_key, b.identity.public_key} - {responder}).pop()
        batches = [raw for _, raw in pulled if type(cbor2.loads(raw)[0]) is list]
        votes = [e for raw in batches for e in decode_many(restored(raw, late))]
        assert len(batches) == 1 and len(votes) == 10, [len(cbor2.loads(raw)[0]) for raw in batches]
        assert {(e.sender, e.kind) for e in votes} == {(responder, "vote")}
        alone = [decode(restored(raw, late)) for _, raw in pulled if type(cbor2.loads(raw)[0]) is not list]
        assert sorted((e.sender == other, e.kind) for e in alone) == sorted(
            [(True, "diff")] * 10 + [(True, "vote")] * 10 + [(False, "diff")] * 10), (  # (a write's vote is its diff)
            Counter((e.sender == other, e.kind, e.body.get("key")) for e in alone), _sync_counters(late))
        # held as the very messages the responder cast (same ids), each in its item form
        held = {bytes(row[0]) for row in late.store.db.execute(
            "SELECT envelope FROM votes WHERE voter = ? AND length(envelope) != 32",  # (not a diff's id)
            [node_id_of(responder)]).fetchall()}
        assert {message_id(cbor2.loads(raw)[0]) for raw in held} == {e.msg_id for e in votes}
    finally:
        for n in (a, b, late):
            n.stop()


def test_a_puller_gets_each_voters_votes_from_that_voter_under_one_signature(member_configs, region, attacker):
    """The votes of voters other than the responder are left to them: the puller asks
    each (named in the reply) for its own votes on those frames, and gets them as one
    batch of its signature; the voters' votes on the frames are then all held, as if
    they had come one by one."""
    configs = member_configs(4, sync_interval=0, snapshot_interval=0)
    a, b, c = (Node(cfg).start() for cfg in configs[:3])
    late = Node(configs[3])
    try:
        keys = [f"k{i}" for i in range(12)]
        _written_in_turn([a], keys, region, (b, c))  # (a's vote is each diff; b and c vote alone)
        expected = consensus_map(a, region, keys)
        late.start()
        assert late.wait_until(lambda: late.presence.saying("own-votes") >= {a.node_id, b.node_id, c.node_id},
                               TIMEOUT)
        pulled = _pulled_by(attacker, late)
        late.sync_now()
        assert late.wait_until(lambda: consensus_map(late, region, keys) == expected, TIMEOUT), late.stats()
        for n in (a, b, c):
            assert digests_meet(late, n, region, TIMEOUT)
        assert not any(k.startswith("rejected.") for k in late.counters), late.stats()
        assert late.wait_until(lambda: len(_vote_batches(pulled, late)) == 2, TIMEOUT), late.stats()
        batches = _vote_batches(pulled, late)  # b's and c's: each from the one who cast them, or the responder's own
        assert set(batches) == {b.identity.public_key, c.identity.public_key}
        assert all(len(votes) == len(keys) for votes in batches.values())
        assert [raw for _, raw in pulled if decode_many(restored(raw, late))[0].kind == "vote"
                and type(cbor2.loads(raw)[0]) is not list] == []  # (none signed alone)
        responder = {sender for sender, raw in pulled if decode_many(restored(raw, late))[0].kind == "diff"}
        assert len(responder) == 1 and late.counters["sync.pulls"] == 1  # (one pull)
        assert late.counters["sync.asked"] == (2 if responder == {a.identity.public_key} else 1)
    finally:
        for n in (a, b, c, late):
            n.stop()


def test_votes_a_voter_does_not_send_when_asked_come_from_the_responder_next_time(member_configs, region,
                                                                                   monkeypatch):
    """A voter asked for its votes that does not answer (busy, or gone without a death yet)
    is named as such in the puller's next request, and the responder then sends its votes
    itself: the puller still gets everything."""
    monkeypatch.setattr(sync, "ASK_WAIT", 0.5)
    configs = member_configs(4, sync_interval=0, snapshot_interval=0)
    a, b, c = (Node(cfg).start() for cfg in configs[:3])
    late = Node(configs[3])
    try:
        keys = [f"k{i}" for i in range(8)]
        _written_in_turn([a], keys, region, (b, c))
        expected = consensus_map(a, region, keys)
        for n in (b, c):  # they answer nothing (a is the responder), and no request for their own votes
            n.sync.on_request = n.sync.on_digest = lambda env: None
        late.start()
        assert late.wait_until(lambda: late.presence.saying("own-votes") >= {a.node_id, b.node_id, c.node_id},
                               TIMEOUT)
        late.sync_now()  # (then, ASK_WAIT after asking, a pull again of its own)
        assert late.wait_until(lambda: consensus_map(late, region, keys) == expected, TIMEOUT), late.stats()
        assert digests_meet(late, a, region, TIMEOUT)
        assert late.counters["sync.asked"] == 2 and late.counters["sync.pulls"] == 2  # (b's and c's votes from a)
        assert late.counters["votes"] >= 2 * len(keys)
    finally:
        for n in (a, b, c, late):
            n.stop()


def _same_short_name(region, key, parent):
    """Two values of a frame whose versions from `parent` share their first 4 bytes: the
    name a short form gives them (shared/shortening.py)."""
    seen: dict[bytes, int] = {}
    i = 0
    while (name := diff.version_hash(region, key, parent, {"x": i})[:shortening.SHORT]) not in seen:
        seen[name] = i
        i += 1
    return {"x": seen[name]}, {"x": i}


def test_a_pull_sends_short_names_and_one_the_puller_cannot_tell_apart_comes_again_in_full(member_configs,
                                                                                           region, attacker):
    """A pull's votes name their versions, and its diffs their parents, by 4 bytes, which
    the puller restores from what it holds; when it holds two versions of the frame with
    that name (a fork of its own, written while away), it cannot, leaves that message,
    and pulls again at once asking for full forms: it still gets everything."""
    configs = member_configs(3, sync_interval=0, snapshot_interval=0)
    a, b, late = (Node(cfg).start() for cfg in configs)
    try:
        a.put(region, "k", {"x": -1})
        version = a.head(region, "k").version
        assert all(n.wait_until(lambda n=n: (c := n.consensus(region, "k")) and c.version == version, TIMEOUT)
                   for n in (a, b, late))
        late.stop()
        mine, theirs = _same_short_name(region, "k", bytes.fromhex(version))
        keys = [f"s{i}" for i in range(6)]
        for i, k in enumerate(keys):
            a.put(region, k, {"reading": i})
        a.put(region, "k", theirs)
        heads = {k: a.head(region, k).version for k in [*keys, "k"]}
        assert a.wait_until(lambda: consensus_map(a, region, [*keys, "k"]) == heads, TIMEOUT)
        expected = heads
        assert b.wait_until(lambda: consensus_map(b, region, [*keys, "k"]) == expected, TIMEOUT)
        late = Node(configs[2])
        late.transport.persistent = False  # (nothing queued for it: all it lacks comes by sync)
        late.put(region, "k", mine)  # a fork, written while away, with the name of a's version
        assert late.head(region, "k").version[:8] == a.head(region, "k").version[:8]  # (hex)
        pulled = _pulled_by(attacker, late)
        late.start()
        late.sync_now()
        assert late.wait_until(lambda: late.counters["sync.unrestored"] >= 1, TIMEOUT), late.stats()
        assert late.wait_until(lambda: consensus_map(late, region, keys) == consensus_map(a, region, keys),
                               TIMEOUT), late.stats()
        for n in (a, b):
            assert digests_meet(late, n, region, TIMEOUT), (late.stats(), n.stats(), a.stats())
        assert late.counters["sync.pulls"] >= 2 and not any(k.startswith("rejected.") for k in late.counters)
        # the first pull's came short: the new diffs' parents (none for a first version), the votes' versions
        short = [raw for _, raw in pulled if shortening.restore(raw, shortening.Names(lambda *a_: [])) is None]
        assert short, "no short forms"
        assert all(len(e.body["version"]) == 32 for _, raw in pulled if raw not in short for e in decode_many(raw)
                   if e.kind == "vote")  # (and, once full forms were asked for, in full)
    finally:
        for n in (a, b, late):
            n.stop()


def test_a_pulls_steps_name_hashes_salted_and_cut_short_to_a_peer_that_answers_them(member_configs, region,
                                                                                     attacker):
    """A pull walks down the digest tree naming each tree node's and each frame's hash by 4
    bytes of a hash of it salted anew for each pull, to a responder that says it answers
    that (`packed-walks`); to one that does not (before 0.9.4), by the hashes themselves.
    Both find the few frames that differ among hundreds."""
    configs = member_configs(3, sync_interval=0, snapshot_interval=0)
    a, b, late = (Node(cfg).start() for cfg in configs)
    requests: list[dict] = []
    subscribed = threading.Event()
    attacker.client.on_subscribe = lambda *a_: subscribed.set()
    attacker.client.on_message = lambda c, u, m: requests.append(sync_body(m.payload))
    attacker.client.subscribe([("es/v1/node/+/sync-req", 1), ("es/v1/node/+/sync-resp", 1)])  # (both ways)
    assert subscribed.wait(TIMEOUT)
    try:
        keys = [f"k{i}" for i in range(300)]
        # The frames changed lie in tree nodes holding more frames than are listed one by one
        # (sync.LEAF_FRAMES): the walk names such a node's children (`nodes`), then frames.
        held = Counter(level1(region, k) for k in keys)
        crowded = [k for k in keys if held[level1(region, k)] > sync.LEAF_FRAMES]
        assert len(crowded) >= 6
        with a.batch():
            for i, k in enumerate(keys):
                a.put(region, k, {"reading": i})
        expected = {k: a.head(region, k).version for k in keys}
        assert all(n.wait_until(lambda n=n: consensus_map(n, region, keys) == expected, TIMEOUT) for n in (a, b, late))
        for old in (False, True):
            late.stop()
            if old:  # (a and b as releases before salted walks: their births say nothing of them)
                for n in (a, b):
                    n.presence._abilities = lambda n=n: {k: v for k, v in type(n.presence)._abilities(n.presence)
                                                         .items() if k != "packed-walks"}
                    n.presence.announce()
            changed = crowded[3:6] if old else crowded[:3]
            for k in changed:
                a.patch(region, k, set={"old": old})
            expected = {k: a.head(region, k).version for k in keys}
            assert a.wait_until(lambda: consensus_map(a, region, keys) == expected, TIMEOUT)
            assert b.wait_until(lambda: consensus_map(b, region, keys) == expected, TIMEOUT)
            late = Node(configs[2])
            late.transport.persistent = False
            late.start()
            assert late.wait_until(lambda: late.presence.saying("own-votes") >= {a.node_id, b.node_id}, TIMEOUT)
            # (of a and b: the broker may still hold the retained birth of a node of another test)
            pair = {a.node_id, b.node_id}
            assert late.presence.saying("packed-walks") & pair == (set() if old else pair)
            del requests[:]
            late.sync_now()
            assert late.wait_until(lambda: consensus_map(late, region, keys) == expected, TIMEOUT), late.stats()
            for n in (a, b):
                assert digests_meet(late, n, region, TIMEOUT)
            walk = [r for r in requests if "nodes" in r or "frames" in r]
            assert walk and not any(k.startswith("rejected.") for k in late.counters), late.stats()
            width = 8 if old else 4
            assert all(len(e[2]) == 16 * width for r in walk for e in r.get("nodes", [])), walk
            assert any(r.get("nodes") for r in walk) and any(r.get("frames") for r in walk)
            hashes = [h for r in walk for e in r.get("frames", []) for _, h in e[2]]
            assert hashes and (max(hashes) >= 2**32 if old else max(hashes) < 2**32)
            salts = {r.get("salt") for r in walk if "want" not in r}  # (requests)
            assert salts == {None} if old else (len(salts) == late.counters["sync.pulls"] and None not in salts)
    finally:
        for n in (a, b, late):
            n.stop()


def test_the_largest_change_a_node_takes_can_still_be_pulled(member_configs, region):
    """A change must leave room for the sync response a pull wraps it in, and for the path
    a receiver keeps with it when it came in a batch: the largest one still reaches a node
    that was not there, from a peer that holds it in its item form."""
    configs = member_configs(3, sync_interval=0, snapshot_interval=0, max_message_bytes=8192)
    a, b = (Node(cfg).start() for cfg in configs[:2])
    late = Node(configs[2])
    try:
        with pytest.raises(ValueError, match="node.max_message_bytes"):
            a.put(region, "huge", {"blob": "x" * 7000})
        size = 6000
        while True:  # the largest value that goes
            try:
                with a.batch():
                    a.put(region, "big", {"blob": "x" * size})
                    a.put(region, "small", {"n": 1})
                break
            except ValueError:
                size -= 50
        keys = ["big", "small"]
        assert a.counters["batches-out"] == 1 and size > 5000  # (a's votes are in its diffs)
        assert a.wait_until(lambda: None not in consensus_map(a, region, keys).values(), TIMEOUT)
        expected = consensus_map(a, region, keys)
        assert b.wait_until(lambda: consensus_map(b, region, keys) == expected, TIMEOUT)
        a.stop()
        late.start()
        late.sync_now()
        assert late.wait_until(lambda: consensus_map(late, region, keys) == expected, TIMEOUT), late.stats()
        assert late.get(region, "big") == {"blob": "x" * size}
        assert not any(k.startswith("rejected.") for k in late.counters), late.stats()
    finally:
        for n in (a, b, late):
            n.stop()


def test_a_node_that_pulls_a_frame_with_a_fork_decides_it_as_the_swarm_did(member_configs, region, tmp_path):
    """Three members write one frame at once before hearing each other: two new roots (one
    written by two nodes alike), a version on one of them and a merge; the members' first
    votes after the fork differ from their latest, which are all for the merge. A node that
    was not there pulls the frame and ranks the branches from the votes the pull brings."""
    configs = member_configs(3, sync_interval=0)
    nodes = [Node(c) for c in configs]
    observer = Node(replace(configs[0], home=tmp_path / "observer"))  # not a member: it only follows
    try:
        nodes[0].patch(region, "a", set={"x": 0})
        nodes[0].patch(region, "a", set={"x": 1})
        nodes[1].patch(region, "a", set={"x": 3})
        nodes[2].patch(region, "a", set={"x": 0})
        nodes[2].patch(region, "a", set={"y": 0})
        Network(nodes).settle()  # (offline: the order above is the test's, not the broker's)
        swarm = {(s["head"], s["consensus"], tuple(s["forks"])) for s in (n.status(region, "a") for n in nodes)}
        assert len(swarm) == 1 and next(iter(swarm))[2], swarm  # agreed, with a fork kept
        voted = nodes[0].store.votes_in_order(region, "a")
        assert any(ws[0] != ws[-1] for ws in voted.values())  # a first vote that is not the latest

        for n in nodes + [observer]:
            n.start()
        observer.sync_now()
        assert observer.wait_until(lambda: (lambda s: (s["head"], s["consensus"], tuple(s["forks"])))(
            observer.status(region, "a")) in swarm, TIMEOUT), (observer.status(region, "a"), swarm)
        assert observer.counters["rejected.internal"] == 0
    finally:
        for n in nodes + [observer]:
            n.stop()


def test_store_of_the_previous_schema_is_brought_up_to_date_on_open(tmp_path):
    """A board updated in the field keeps its store: the sums anti-entropy compares are
    computed once from what the old store holds, and the outbox lets go of the envelopes
    the broker had acknowledged (schema 1 kept them, a second copy of each)."""
    from edgeswarm.node.store import SCHEMA_VERSION, Store

    home = tmp_path / "n"
    node = Node(Config(home=home, regions=["plant"], sync_interval=0, snapshot_interval=0))
    for i in range(5):
        node.put("plant/a", f"k{i}", {"i": i})
    node.patch("plant/a", "k0", set={"j": 1})
    kept = node.store.read_sums("plant", list)[1]
    digest = node.sync.digest("plant")
    node.stop()
    assert len(kept) == 5 and sum(r[2] for r in kept) == 6  # six authored versions
    old = Store(home / "store.db")
    unsent = old.unpublished()
    assert len(unsent) == 6  # (no broker: every write, with its vote in it, is still waiting)
    with old.transaction():  # the store as schema 1 left it
        for statement in ("DROP TABLE sums", "DROP INDEX idx_diffs_version", "ALTER TABLE outbox RENAME TO outbox_5",
                          "CREATE TABLE outbox (msg_id BLOB PRIMARY KEY, topic TEXT, envelope BLOB, seq INTEGER,"
                          " acked INTEGER NOT NULL DEFAULT 0)",
                          "INSERT INTO outbox (msg_id, topic, envelope, seq) SELECT msg_id, topic, envelope, seq"
                          " FROM outbox_5", "DROP TABLE outbox_5",
                          "CREATE INDEX idx_outbox_acked_seq ON outbox (acked, seq)",
                          "INSERT INTO outbox (msg_id, topic, envelope, seq, acked) VALUES (x'00', 't', x'00', 0, 1)",
                          "PRAGMA user_version=1"):
            old.db.execute(statement)
    old.close()
    reopened = Node(Config(home=home, regions=["plant"], sync_interval=0, snapshot_interval=0))
    try:
        assert reopened.store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert reopened.store.read_sums("plant", list)[1] == kept
        assert reopened.sync.digest("plant") == digest
        assert reopened.store.unpublished() == unsent  # the acknowledged copy went, the waiting ones stayed
        assert "acked" not in reopened.store.db["outbox"].columns_dict
    finally:
        reopened.stop()


def test_store_of_schema_3_is_rebuilt_with_its_votes(tmp_path):
    """Opened now, a schema 3 store's vote tables are rebuilt (WITHOUT ROWID) with every
    vote, its envelope, and the same digest."""
    from edgeswarm.node.store import SCHEMA_VERSION, Store

    home = tmp_path / "n"
    node = Node(Config(home=home, regions=["plant"], sync_interval=0, snapshot_interval=0))
    for i in range(4):
        node.patch("plant/a", "k", set={"i": i})
    node.put("plant/a", "other", {"j": 1})
    history = node.store.votes_in_order("plant/a", "k")
    items = node.store.frame_items("plant/a", "k")[1]
    digest, status = node.sync.digest("plant"), node.status("plant/a", "k")
    node.stop()
    assert [len(ws) for ws in history.values()] == [4]

    old = Store(home / "store.db")
    with old.transaction():  # the vote tables as schema 3 made them
        for statement in (
                "ALTER TABLE votes RENAME TO votes_4", "ALTER TABLE latest RENAME TO latest_4",
                "DROP INDEX idx_votes_merges",
                "CREATE TABLE votes (region TEXT, key TEXT, voter TEXT, round INTEGER, version BLOB, merge_of BLOB,"
                " envelope BLOB, PRIMARY KEY (region, key, voter, round))",
                "CREATE INDEX idx_votes_region_key_merge_of ON votes (region, key, merge_of)",
                "CREATE TABLE latest (region TEXT, key TEXT, voter TEXT, round INTEGER, version BLOB,"
                " PRIMARY KEY (region, key, voter))",
                "INSERT INTO votes SELECT * FROM votes_4",
                "INSERT INTO latest SELECT * FROM latest_4", "DROP TABLE votes_4", "DROP TABLE latest_4",
                "PRAGMA user_version=3"):
            old.db.execute(statement)
    old.close()

    reopened = Node(Config(home=home, regions=["plant"], sync_interval=0, snapshot_interval=0))
    try:
        store = reopened.store
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.votes_in_order("plant/a", "k") == history
        assert store.frame_items("plant/a", "k")[1] == items
        assert reopened.sync.digest("plant") == digest and reopened.status("plant/a", "k") == status
        reopened.patch("plant/a", "k", set={"i": 9})  # and it goes on voting from there
        assert [len(ws) for ws in store.votes_in_order("plant/a", "k").values()] == [5]
    finally:
        reopened.stop()


def test_store_of_schema_5_gets_its_votes_by_round(tmp_path):
    """Schema 6 keeps a frame's votes in round order (a change's votes land side by side);
    a schema 5 store, voter first, is rebuilt on open with every vote and the same digest."""
    from edgeswarm.node.store import SCHEMA_VERSION, Store

    def key_columns(store):
        index = next(name for _, name, _, origin, _ in store.db.execute("PRAGMA index_list(votes)") if origin == "pk")
        return [row[2] for row in store.db.execute(f"PRAGMA index_info({index})")]

    home = tmp_path / "n"
    node = Node(Config(home=home, regions=["plant"], sync_interval=0, snapshot_interval=0))
    for i in range(3):
        node.patch("plant/a", "k", set={"i": i})
    node.put("plant/a", "other", {"j": 1})
    assert key_columns(node.store) == ["region", "key", "round", "voter"]
    history, items = node.store.votes_in_order("plant/a", "k"), node.store.frame_items("plant/a", "k")[1]
    digest, status = node.sync.digest("plant"), node.status("plant/a", "k")
    node.stop()
    old = Store(home / "store.db")
    with old.transaction():  # the vote table as schema 5 made it
        for statement in (
                "ALTER TABLE votes RENAME TO votes_6", "DROP INDEX idx_votes_merges",
                "CREATE TABLE votes (region TEXT NOT NULL, key TEXT NOT NULL, voter TEXT NOT NULL,"
                " round INTEGER NOT NULL, version BLOB NOT NULL, merge_of BLOB, envelope BLOB,"
                " PRIMARY KEY (region, key, voter, round)) WITHOUT ROWID",
                "CREATE INDEX idx_votes_merges ON votes (region, key) WHERE merge_of IS NOT NULL",
                "INSERT INTO votes SELECT * FROM votes_6", "DROP TABLE votes_6", "PRAGMA user_version=5"):
            old.db.execute(statement)
    assert key_columns(old) == ["region", "key", "voter", "round"]
    old.close()
    reopened = Node(Config(home=home, regions=["plant"], sync_interval=0, snapshot_interval=0))
    try:
        store = reopened.store
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert key_columns(store) == ["region", "key", "round", "voter"]
        assert store.votes_in_order("plant/a", "k") == history and len(history[reopened.node_id]) == 3
        assert store.frame_items("plant/a", "k")[1] == items
        assert reopened.sync.digest("plant") == digest and reopened.status("plant/a", "k") == status
        reopened.patch("plant/a", "k", set={"i": 9})
        assert [len(ws) for ws in store.votes_in_order("plant/a", "k").values()] == [4]
    finally:
        reopened.stop()


def test_store_of_schema_6_keeps_its_votes_envelopes_and_a_diffs_vote_is_its_message_id(tmp_path):
    """From schema 7 the vote a diff carries is stored as the diff's message id (the diffs
    table holds its envelope once) and read back as that envelope, and the outbox goes by
    sequence number alone; a schema 6 store's votes, each with its envelope, read as before,
    and its outbox keeps what waits."""
    from edgeswarm.node.store import SCHEMA_VERSION, Store

    home = tmp_path / "n"
    node = Node(Config(home=home, regions=["plant"], sync_interval=0, snapshot_interval=0))
    node.put("plant/a", "k", {"i": 0})
    (raw,) = [item.envelope for item in node.store.unpublished()]
    stored = node.store.db.execute("SELECT envelope FROM votes WHERE voter = ?", [node.node_id]).fetchone()[0]
    assert stored == decode(raw).msg_id and node.store.frame_items("plant/a", "k")[1] == [(node.node_id, 1, raw)]
    assert node.store.vote_at("plant/a", "k", node.node_id, 1)[1] == raw
    node.stop()
    old = Store(home / "store.db")
    waiting = old.unpublished()
    with old.transaction():  # as schema 6 kept them: the envelope itself, an outbox with its ids unique
        for statement in (
                "ALTER TABLE outbox RENAME TO outbox_7",
                "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, msg_id BLOB NOT NULL UNIQUE, topic TEXT NOT NULL,"
                " envelope BLOB NOT NULL)", "INSERT INTO outbox SELECT * FROM outbox_7", "DROP TABLE outbox_7",
                "PRAGMA user_version=6"):
            old.db.execute(statement)
        old.db.execute("UPDATE votes SET envelope = ?", [raw])
    assert old.db.execute("PRAGMA index_list(outbox)").fetchall()
    old.close()
    reopened = Node(Config(home=home, regions=["plant"], sync_interval=0, snapshot_interval=0))
    try:
        store = reopened.store
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
        assert store.unpublished() == waiting and not store.db.execute("PRAGMA index_list(outbox)").fetchall()
        assert store.frame_items("plant/a", "k")[1] == [(reopened.node_id, 1, raw)]
        reopened.put("plant/a", "k", {"i": 1})
        assert [r for _, r, _ in store.frame_items("plant/a", "k")[1]] == [1, 2]
        assert all(len(e) > 32 for _, _, e in store.frame_items("plant/a", "k")[1])
    finally:
        reopened.stop()


def test_store_of_schema_4_gets_indexes_of_merges_and_waiting_diffs_only(tmp_path, region):
    """Schema 5 indexes only the rows looked up by their index (merges, diffs waiting for a
    parent) and keeps the outbox in sequence order, so a COMMIT writes fewer pages; a
    schema 4 store gets them on open, with what its outbox held, and the lookups still use
    an index."""
    from edgeswarm.node.store import SCHEMA_VERSION, Store

    home = tmp_path / "n"
    node = Node(Config(home=home, regions=["plant"], sync_interval=0, snapshot_interval=0))
    node.put(region, "k", {"i": 1})
    node.put(region, "k", {"i": 2})
    node.stop()
    old = Store(home / "store.db")
    unsent = old.unpublished()
    assert len(unsent) == 2  # (no broker)
    with old.transaction():  # the indexes and outbox as schema 4 made them
        for statement in ("DROP INDEX idx_versions_merges", "DROP INDEX idx_diffs_pending",
                          "CREATE INDEX idx_versions_merge_of ON versions (merge_of)",
                          "CREATE INDEX idx_diffs_status_region_key ON diffs (status, region, key)",
                          "ALTER TABLE outbox RENAME TO outbox_5",
                          "CREATE TABLE outbox (msg_id BLOB PRIMARY KEY, topic TEXT, envelope BLOB, seq INTEGER)",
                          "CREATE INDEX idx_outbox_seq ON outbox (seq)",
                          "INSERT INTO outbox SELECT msg_id, topic, envelope, seq FROM outbox_5", "DROP TABLE outbox_5",
                          "PRAGMA user_version=4"):
            old.db.execute(statement)
    old.close()

    store = Store(home / "store.db")
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"idx_versions_merges", "idx_diffs_pending"} <= indexes
        assert not {"idx_versions_merge_of", "idx_diffs_status_region_key"} & indexes

        def plan(sql, params):
            return " ".join(r[-1] for r in store.db.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "idx_diffs_pending" in plan("SELECT msg_id, envelope FROM diffs WHERE status = 'pending'"
                                           " AND region = ? AND key = ? ORDER BY seq", [region, "k"])
        assert "idx_versions_merges" in plan("SELECT version FROM versions WHERE merge_of = ?", [b"x"])
        assert store.unpublished() == unsent and "idx_outbox_seq" not in indexes
        assert store.db["outbox"].pks == ["seq"]
        store.mark_published([unsent[0].seq])
        assert store.unpublished() == unsent[1:]
        assert store.count_pending() == 0 and store.merge_of((b"a" * 32, b"b" * 32)) is None
    finally:
        store.close()


def test_more_than_one_exchange_carries_goes_on_until_caught_up(member_configs, region):
    """With a small message size limit an exchange is cut short (descent and envelopes
    per step are bounded); the late node pulls again at once until nothing differs."""
    configs = member_configs(3, sync_interval=0, snapshot_interval=0, max_message_bytes=8192)
    a, b = Node(configs[0]).start(), Node(configs[1]).start()
    late = Node(configs[2])
    try:
        keys = [f"k{i:03d}" for i in range(200)]
        for k in keys:
            a.put(region, k, {"reading": k, "pad": "x" * 200})
        assert b.wait_until(lambda: all(b.consensus(region, k) for k in keys), TIMEOUT)
        late.start()
        late.sync_now()
        assert late.wait_until(lambda: all(late.consensus(region, k) for k in keys), TIMEOUT), repr(late.stats())
        assert consensus_map(late, region, keys) == consensus_map(a, region, keys)
        assert late.counters["sync.pulls"] >= 2, late.stats()  # 8 messages of 8 KiB per step: not in one
        assert digests_meet(late, a, region, TIMEOUT)
        # a's trace head goes out with its digests: its trace comes in pieces under the limit too.
        a.sync_now()
        assert late.wait_until(lambda: late.store.trace_head(a.node_id) is not None, TIMEOUT)
        assert late.counters["rejected.internal"] == late.counters["rejected.oversize"] == 0
    finally:
        for n in (a, b, late):
            n.stop()


def _written_while_away(a, d, region) -> list[bytes]:
    """Twenty writes of a's, at d too, and the swarm quiet again: d's votes went to a, which
    passed them on, and are back at d (nodes that come back must find one state, not one of
    them with the relay in flight)."""
    keys = [f"k{i:02d}" for i in range(20)]
    versions = [bytes.fromhex(a.put(region, k, {"i": i})) for i, k in enumerate(keys)]
    assert d.wait_until(lambda: all(d.store.has_version(v) for v in versions), TIMEOUT)
    assert d.wait_until(lambda: d.counters["own.relayed"] >= len(keys), TIMEOUT), d.counters
    return versions


@contextmanager
def _two_away(member_configs, region) -> Iterator[tuple[Node, list[bytes], list[Node]]]:
    """(a, versions, the two nodes away): four members; a writes twenty frames
    (_written_while_away) while two of them are away, for which no broker session kept
    anything (not started yet). All four stop as the block ends."""
    configs = member_configs(4, sync_interval=3600, snapshot_interval=0)
    nodes = [Node(configs[0]).start(), Node(configs[3]).start()]
    try:
        versions = _written_while_away(*nodes, region)
        away = [Node(cfg) for cfg in configs[1:3]]
        nodes += away
        for n in away:
            n.transport.persistent = False
        yield nodes[0], versions, away
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.parametrize("together", [False, True], ids=["one-after-the-other", "together"])
def test_nodes_rejoining_in_one_state_pull_once_and_forward(member_configs, region, monkeypatch, together):
    """Two nodes that missed the same writes come back: one pulls for both and forwards
    what it got; the other follows it instead of walking the tree itself. (Coming back
    together, each welcomed the other, and each followed the other.)"""
    from edgeswarm.node import sync
    monkeypatch.setattr(sync, "JOIN_SETTLE", 3.0)  # time for the second to join before the first decides
    with _two_away(member_configs, region) as (_, versions, (b, c)):
        starts = [threading.Thread(target=n.start) for n in (b, c)]  # each says hello (its digest) as it connects
        for t in starts:
            t.start()
            if not together:
                t.join(TIMEOUT)
        for t in starts:
            t.join(TIMEOUT)
        for n in (b, c):
            assert n.wait_until(lambda n=n: all(n.store.has_version(v) for v in versions), TIMEOUT), n.stats()
        leader, follower = (b, c) if b.counters["sync.pulls"] else (c, b)
        assert leader.counters["sync.pulls"] == 1 and follower.counters["sync.pulls"] == 0, \
            (b.counters, c.counters)
        assert follower.counters["sync.deferred"] == 1 and leader.counters["sync.forwarded"] == 1
        assert follower.counters["sync.envelopes"] >= len(versions)
        assert follower.counters["sync.already-held"] == 0


def test_a_node_that_rejoined_first_follows_one_whose_hello_came_in_its_state(member_configs, region,
                                                                              monkeypatch):
    """Two nodes that missed the same writes come back one after the other, and the first
    one's digest changes (a write of its own) before it decides: it still counts the second,
    whose hello came in its state, as in its state. The one first by node id pulls for both
    and the other follows; before 0.9.2 the first compared the second's hello with its own
    digest as it decided, and pulled for itself too."""
    from edgeswarm.node import sync
    monkeypatch.setattr(sync, "JOIN_SETTLE", 3.0)  # time for the second to join before the first decides
    with _two_away(member_configs, region) as (_, versions, away):
        rejoining = sorted(away, key=lambda n: n.node_id, reverse=True)
        first, second = rejoining  # (the first back is the later by node id: it is to follow the second)
        first.start()
        second.start()
        assert first.wait_until(lambda: second.node_id in first.sync._seen.get(region, {}), TIMEOUT)
        hello = _seen_by(first, region, second.node_id)  # (as its hello came: for a failure's message)
        first.put(region, "own", {"by": "first"})  # (its digest is no longer the one second said hello with)
        for n in rejoining:
            assert n.wait_until(lambda n=n: all(n.store.has_version(v) for v in versions), TIMEOUT), n.stats()
        assert second.counters["sync.pulls"] == 1 and first.counters["sync.pulls"] == 0, \
            (_sync_counters(first), _sync_counters(second), hello, _seen_by(first, region, second.node_id))
        assert first.counters["sync.deferred"] == 1


def _sync_counters(n: Node) -> dict:
    return {k: v for k, v in n.counters.items() if k.startswith("sync.")}


def _seen_by(n: Node, region: str, peer: str) -> dict:
    """What n remembers of peer's last digest for a region (for a failure's message)."""
    seen = n.sync._seen.get(region, {}).get(peer)
    return seen and {"welcome": seen.welcome, "pulling": seen.pulling is not None,
                     "age_s": round(time.monotonic() - seen.at, 2),
                     "in_state": seen.hashes == n.sync.digest(region)["hashes"]}


def test_a_node_that_rejoins_after_a_pull_for_its_state_ended_follows_that_pull(member_configs, region):
    """Two nodes missed the same writes; the second comes back after the first has pulled
    them: the first, still keeping what its pull brought, welcomes its hello as in the state
    it pulled from, and the second follows it and takes that, rather than pulling itself."""
    with _two_away(member_configs, region) as (a, versions, (first, second)):
        first.start()
        assert first.wait_until(lambda: all(first.store.has_version(v) for v in versions), TIMEOUT), first.stats()
        assert first.wait_until(lambda: region in first.sync._forwarded, TIMEOUT)  # (its pull ended)
        second.start()
        assert second.wait_until(lambda: all(second.store.has_version(v) for v in versions), TIMEOUT), \
            second.stats()
        assert first.counters["sync.pulls"] == 1 and second.counters["sync.pulls"] == 0, \
            (first.counters, second.counters)
        assert second.counters["sync.deferred"] == 1 and first.counters["sync.forwarded"] == 1
        for n in (a, first):
            assert digests_meet(second, n, region, TIMEOUT)


def test_a_rejoining_node_is_answered_by_one_or_two_of_a_state_not_by_each(member_configs, region, monkeypatch):
    """Every node whose digest differs from a (re)joining node's hello answers with its own,
    after a wait for each node before it by node id; a node that hears one of its state
    answer first keeps quiet. The joining node still learns where it differs, and pulls."""
    from edgeswarm.node import sync
    monkeypatch.setattr(sync, "ANSWER_STEP", 0.3)  # (waits far apart next to a delivery on a busy machine)
    monkeypatch.setattr(sync, "ANSWER_GAP", 0.0)  # (their own hellos just went out: else they answer it alone)
    configs = member_configs(5, sync_interval=3600, snapshot_interval=0)
    up = [Node(configs[i]).start() for i in range(4)]
    late = None
    try:
        versions = [bytes.fromhex(up[0].put(region, f"k{i}", {"i": i})) for i in range(5)]
        assert all(n.wait_until(lambda n=n: all(n.store.has_version(v) for v in versions), TIMEOUT) for n in up)
        assert all(n.wait_until(lambda n=n: n.sync.digest(region)["hashes"] == up[0].sync.digest(region)["hashes"],
                                TIMEOUT) for n in up)
        late = Node(configs[4])
        late.transport.persistent = False  # (no broker session kept anything for it)
        late.start()
        assert late.wait_until(lambda: all(late.store.has_version(v) for v in versions), TIMEOUT), late.stats()
        assert all(n.wait_until(lambda n=n: not n.sync._answering, TIMEOUT) for n in up)
        answered = sum(n.counters["sync.answers"] for n in up)
        spared = sum(n.counters["sync.answers-spared"] for n in up)
        assert answered >= 1 and spared >= 1 and answered < len(up), (answered, spared)
    finally:
        for n in (*up, late):
            if n is not None:
                n.stop()


@pytest.mark.parametrize("first_holds", ["more", "less-where-the-joining-node-is-in-step"])
def test_a_node_spares_its_answer_when_the_first_answer_tells_what_its_own_would(member_configs, region,
                                                                              monkeypatch, first_holds):
    """Nodes whose states have moved apart by a vote (live votes reach them at different
    moments) still need one answer to a (re)joining node. The first answer tells the joining
    node what theirs would, and they keep quiet, when the node that sent it holds a vote the
    others lack, or lacks a vote the others hold on a frame where the joining node holds the
    same as they do. (Before, each state answered: the others, all in one state, once more.)"""
    from edgeswarm.node import sync
    from edgeswarm.shared.identity import Identity
    from edgeswarm.shared.topics import region_topic
    monkeypatch.setattr(sync, "ANSWER_STEP", 0.3)  # (waits far apart next to a delivery on a busy machine)
    monkeypatch.setattr(sync, "ANSWER_GAP", 0.0)  # (their own hellos just went out: else they answer it alone)
    configs = member_configs(6, sync_interval=3600, snapshot_interval=0)  # (the sixth never starts)
    sixth = Identity.load_or_create(configs[5].key_path)
    up = [Node(configs[i]).start() for i in range(4)]
    first = min(up, key=lambda n: n.node_id)  # (the first of them to answer)
    others = [n for n in up if n is not first]
    keys = [f"k{i}" for i in range(5)]
    apart = next(f"far{i}" for i in range(1000)
                 if level1(region, f"far{i}") not in {level1(region, k) for k in keys})
    late = None
    try:
        if first_holds == "more":
            vote_to, late = [first], Node(configs[4])
        else:  # a frame the late node holds as the others do, and on it a vote that `first` lacks
            late = Node(configs[4]).start()
            far = bytes.fromhex(up[0].put(region, apart, {"far": True}))
            assert all(n.wait_until(lambda n=n: n.sync.digest(region)["hashes"] == late.sync.digest(region)["hashes"]
                                    and n.store.has_version(far), TIMEOUT) for n in up)
            late.stop()
            late = Node(configs[4])
            vote_to = [*others, late]
        versions = [bytes.fromhex(up[0].put(region, k, {"i": i})) for i, k in enumerate(keys)]
        assert all(n.wait_until(lambda n=n: all(n.store.has_version(v) for v in versions), TIMEOUT) for n in up)
        assert all(n.wait_until(lambda n=n: n.sync.digest(region)["hashes"] == up[0].sync.digest(region)["hashes"],
                                TIMEOUT) for n in up)
        key = "k0" if first_holds == "more" else apart
        version = versions[0] if first_holds == "more" else far
        vote = encode(sixth, "vote", region, 1, 1, {"key": key, "version": version, "round": 1}).raw
        for n in vote_to:
            n.receive(region_topic("vote", region), vote)  # (to it alone)
        assert first.sync.digest(region)["hashes"] != others[0].sync.digest(region)["hashes"]
        assert all(n.wait_until(lambda n=n: not n.sync._answering, TIMEOUT) for n in up)  # (their own hellos')
        before = {n.node_id: (n.counters["sync.answers"], n.counters["sync.answers-spared"]) for n in up}
        late.transport.persistent = False  # (no broker session kept anything for it)
        late.start()
        assert late.wait_until(lambda: all(late.store.has_version(v) for v in versions), TIMEOUT), late.stats()
        assert all(n.wait_until(lambda n=n: not n.sync._answering, TIMEOUT) for n in up)
        answered = {n.node_id: n.counters["sync.answers"] - before[n.node_id][0] for n in up}
        assert answered[first.node_id] == 1 and sum(answered.values()) == 1, answered
        assert sum(n.counters["sync.answers-spared"] - before[n.node_id][1] for n in up) == len(up) - 1
        assert late.wait_until(lambda: late.store.latest_round(region, key, sixth.node_id) == 1, TIMEOUT)
    finally:
        for n in (*up, late):
            if n is not None:
                n.stop()


def test_a_node_joining_just_after_an_answer_is_answered_by_that_node_alone(member_configs, region, monkeypatch):
    """Nodes reconnect one after another as a split heals, each with a hello. The nodes that
    kept quiet for the first answer leave the next hellos to the node that gave it (it
    answers each newcomer directly, as it answered within ANSWER_GAP): one answer on the
    region topic, not one more from the next node by id for each newcomer."""
    from edgeswarm.node import sync
    monkeypatch.setattr(sync, "ANSWER_STEP", 0.3)  # (waits far apart next to a delivery on a busy machine)
    monkeypatch.setattr(sync, "ANSWER_GAP", 4.0)  # (the next node joins within half of it)
    configs = member_configs(6, sync_interval=3600, snapshot_interval=0)
    up = [Node(configs[i]).start() for i in range(4)]
    late = []
    try:
        versions = [bytes.fromhex(up[0].put(region, f"k{i}", {"i": i})) for i in range(5)]
        assert all(n.wait_until(lambda n=n: all(n.store.has_version(v) for v in versions), TIMEOUT) for n in up)
        assert all(n.wait_until(lambda n=n: n.sync.digest(region)["hashes"] == up[0].sync.digest(region)["hashes"],
                                TIMEOUT) for n in up)
        deadline = time.monotonic() + TIMEOUT  # (their own hellos' answers out of the way)
        while (any(n.sync._answering or n.sync._published_lately(region) for n in up)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        before = {n.node_id: n.counters["sync.answers"] for n in up}
        answers = lambda: sum(n.counters["sync.answers"] - before[n.node_id] for n in up)  # noqa: E731
        for cfg in configs[4:]:
            node = Node(cfg)
            node.transport.persistent = False  # (no broker session kept anything for it)
            late.append(node.start())
            assert up[0].wait_until(lambda: answers() >= 1 and not any(n.sync._answering for n in up), TIMEOUT)
        first = next(n for n in up if n.counters["sync.answers"] > before[n.node_id])
        for node in late:
            assert node.wait_until(lambda node=node: all(node.store.has_version(v) for v in versions), TIMEOUT)
            assert first.node_id in node.sync._seen[region]  # (its answer reached each)
        assert all(n.wait_until(lambda n=n: not n.sync._answering, TIMEOUT) for n in up)
        assert answers() == 1, {n.node_id: n.counters["sync.answers"] - before[n.node_id] for n in up}
    finally:
        for n in (*up, *late):
            n.stop()


def _sync_bodies(attacker, kind: str) -> tuple[list[tuple[str, dict]], threading.Event]:
    """(topic's node id, body) of every `kind` message sent to any node, as the broker
    delivers them to a plain client."""
    seen: list[tuple[str, dict]] = []
    subscribed = threading.Event()
    attacker.client.on_subscribe = lambda *a_: subscribed.set()
    attacker.client.on_message = lambda c, u, m: seen.append((m.topic.split("/")[3], sync_body(m.payload)))
    attacker.client.subscribe(f"es/v1/node/+/{kind}", qos=1)
    assert subscribed.wait(TIMEOUT)
    return seen, subscribed


def test_a_frame_with_a_long_history_is_listed_by_its_newest_versions(member_configs, region, attacker):
    """A frame written 150 times differs on a node that missed its last 3 changes: the pull
    lists the newest LISTED_VERSIONS versions the node holds of it and a count and XOR of
    the others, not the whole history, and brings only the 3 diffs and their votes."""
    configs = member_configs(3, sync_interval=0, snapshot_interval=0)
    a, b, c = (Node(cfg) for cfg in configs)
    seen, _ = _sync_bodies(attacker, "sync-req")
    try:
        for i in range(150):
            a.patch(region, "k", set={"n": i})
        Network([a, b, c]).settle()
        for i in range(150, 153):
            a.patch(region, "k", set={"n": i})
        Network([a, b]).settle()  # (c misses them)
        assert c.get(region, "k", consensus=True) == {"n": 149}
        for n in (a, b, c):
            n.start()
        c.sync_now()
        assert c.wait_until(lambda: c.get(region, "k", consensus=True) == {"n": 152}, TIMEOUT), c.stats()
        assert digests_meet(c, a, region, TIMEOUT)
        assert 3 <= c.counters["sync.envelopes"] <= 9, c.stats()  # the 3 diffs and the others' votes
        items = [item for peer, body in seen if peer != c.node_id for item in body.get("items", [])]
        assert items, seen
        older = [v for v, _ in c.store.frame_versions(region, "k")[:150 - sync.LISTED_VERSIONS]]
        for item in items:
            assert len(item) == 4 and len(item[1]) == 4 * sync.LISTED_VERSIONS, item
            assert item[3] == [len(older) + 1, len(older), reduce(xor, map(version_item, older))], item[3]
        assert not any(k.startswith("rejected.") for n in (a, b, c) for k in n.counters)

        # Peers of a release before 0.9.2 (their sync-resps do not say `horizons`) are sent
        # the whole list, which they read.
        for n in (a, b):
            n.sync._send = lambda peer, kind, body, n=n: sync.Sync._send(
                n.sync, peer, kind, {k: v for k, v in body.items() if k != "horizons"})
        c.stop()
        c = Node(configs[2])
        c.transport.persistent = False  # (nothing queued for it while it was away)
        a.patch(region, "k", set={"n": 153})
        assert b.wait_until(lambda: b.get(region, "k", consensus=True) == {"n": 153}, TIMEOUT)
        seen.clear()
        c.start()
        c.sync_now()
        assert c.wait_until(lambda: c.get(region, "k", consensus=True) == {"n": 153}, TIMEOUT), c.stats()
        items = [item for peer, body in seen if peer != c.node_id for item in body.get("items", [])]
        assert items and all(len(item) == 3 and len(item[1]) == 4 * 153 for item in items), items
    finally:
        for n in (a, b, c):
            n.stop()


def test_an_old_branch_below_the_versions_listed_still_reaches_a_node_that_lacks_it(member_configs, region,
                                                                                   attacker):
    """Two members change a frame at once, and the third never hears one of the changes
    (it hears all that follows, its author's later votes too); the frame then grows a long
    history on the other branch. What the third node holds below the versions its pull
    lists is not what its peer holds there: the peer asks for more of the list until it
    holds the same below it (here all of it), and the old branch reaches the node."""
    configs = member_configs(3, sync_interval=0, snapshot_interval=0)
    a, b, c = (Node(cfg) for cfg in configs)
    seen, _ = _sync_bodies(attacker, "sync-resp")
    try:
        a.patch(region, "k", set={"x": 0})
        Network([a, b, c]).settle()
        a.patch(region, "k", set={"x": 1})
        branch = bytes.fromhex(b.patch(region, "k", set={"x": 2}))  # (the same field: a fork, kept)
        net = Network([a, b, c])
        net.send(0)
        held = len(net.queues[2])
        net.send(1)
        del net.queues[2][held:]  # (c never hears b's change: the diff that is b's vote for it)
        net.settle()
        for i in range(100):
            a.patch(region, "k", set={"n": i})
        Network([a, b, c]).settle()
        assert b.store.has_version(branch) and not c.store.has_version(branch)
        assert len(c.store.frame_versions(region, "k")) > 4 * sync.LISTED_VERSIONS
        branch_round = next(r for r, v, _ in b.store.vote_rows(region, "k")[b.node_id] if v == branch)
        assert c.store.latest_round(region, "k", b.node_id) > branch_round  # (so b's vote for it is not sent)
        for n in (a, b, c):
            n.start()
        c.sync_now()
        assert c.wait_until(lambda: c.store.has_version(branch), TIMEOUT), c.stats()
        assert digests_meet(c, a, region, TIMEOUT) and digests_meet(c, b, region, TIMEOUT)
        assert c.status(region, "k")["forks"] == a.status(region, "k")["forks"] != []
        asked = [body["deeper"] for peer, body in seen if peer == c.node_id and "deeper" in body]
        held, listed, times = len(c.store.frame_versions(region, "k")), sync.LISTED_VERSIONS, 0
        while listed < held:  # (4 versions listed, then 16, then 64, then all 102)
            listed, times = listed * sync.DEEPER, times + 1
        assert len(asked) == times, asked
        assert not any(k.startswith("rejected.") for n in (a, b, c) for k in n.counters)
    finally:
        for n in (a, b, c):
            n.stop()


def test_an_items_entry_with_a_generation_out_of_range_is_a_counted_rejection(member_configs, region):
    """What an items entry says of the versions it does not list is checked: numbers beyond
    what the store holds (a generation of 2^63) or a malformed summary are refused and
    counted, not a crash."""
    a, c = (Node(cfg) for cfg in member_configs(2))
    try:
        c.put(region, "k", {"n": 1})
        pos = position(region, "k")
        for seq, (horizon, bad) in enumerate(((([2, 1, 5]), False), ([2**63, 0, 0], True), ([0, 0, 0], True),
                                              ([1, 2], True), ([1, 0, -1], True)), start=1000):
            body = {"region": region, "items": [[pos, b"\x00\x01\x02\x03", b"", horizon]]}
            env = encode(a.identity, "sync-req", None, seq, a.clock.now(), body)
            before = c.counters["rejected.bad-sync"]
            c.receive(node_topic(c.node_id, "sync-req"), env.raw)
            assert c.counters["rejected.bad-sync"] - before == int(bad), (horizon, c.stats())
            assert c.counters["rejected.internal"] == 0, c.stats()
    finally:
        for n in (a, c):
            n.stop()
