"""Votes through their version's author (node/relay.py), on a real broker."""

from __future__ import annotations

import threading

import cbor2

from edgeswarm.node import Config, Node
from edgeswarm.shared.envelope import decode_many, encode, encode_relay, is_relay
from edgeswarm.shared.topics import node_topic, region_filter, region_topic

from test_consensus import TIMEOUT, consensus_everywhere

QUIET = 2.0  # seconds without a message on the vote topic once every node holds every vote


def relaying(nodes, among=None):
    """Wait until each node knows which of the others pass votes on: those `among` them (all
    by default), and no other node of the test's regions (nodes of earlier tests on the same
    broker are another matter: test_presence checks that one killed without a goodbye is
    down for a node that comes later)."""
    among = {n.node_id for n in (among or nodes)}

    def authors(n) -> set[str]:
        return {a for a in n.relay.authors.copy()  # (a copy: the network thread changes it)
                if set(n.config.regions) & set((n.store.peer(a) or {}).get("regions") or ())}
    for n in nodes:
        assert n.wait_until(lambda n=n: authors(n) == among - {n.node_id}, TIMEOUT), \
            {a: n.store.peer(a) for a in n.relay.authors.copy() ^ (among - {n.node_id})}


class VoteTopic:
    """What an ordinary MQTT client subscribed to a region's votes sees."""

    def __init__(self, attacker, region):
        self.messages: list[bytes] = []
        self.arrived = threading.Event()
        subscribed = threading.Event()
        client = attacker.client
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_message = lambda c, u, m: (self.messages.append(m.payload), self.arrived.set())
        client.subscribe(region_filter(region, "vote"), qos=1)
        assert subscribed.wait(TIMEOUT)

    def quiet(self) -> None:
        while self.arrived.wait(QUIET):
            self.arrived.clear()

    def voters(self, region) -> tuple[list[str], list[str]]:
        """Senders of the votes sent as themselves, and of those passed on in relays."""
        direct, relayed = [], []
        for data in self.messages:
            for env in decode_many(data, topic=region_topic("vote", region)):
                (relayed if is_relay(data) else direct).append(env.sender_id)
        return direct, relayed


def supported_everywhere(nodes, region, key, version):
    for n in nodes:
        assert n.wait_until(lambda n=n: n.status(region, key)["support"].get(version) == len(nodes), TIMEOUT), \
            n.status(region, key)


def test_votes_go_to_the_author_which_passes_them_on(make_swarm, region, attacker):
    nodes, _ = make_swarm(4)
    relaying(nodes)
    seen = VoteTopic(attacker, region)
    writer, others = nodes[0], nodes[1:]
    version = writer.put(region, "line", {"speed": 1})
    consensus_everywhere(nodes, region, "line", version)
    supported_everywhere(nodes, region, "line", version)
    assert writer.counters["votes-relayed"] == 3 and writer.counters["relays-out"] >= 1
    assert all(n.counters["votes-relayed"] == 0 for n in others)
    seen.quiet()
    direct, relayed = seen.voters(region)
    # On the region's vote topic: every other vote as the writer passed it on (its own is in its diff).
    assert direct == []
    assert sorted(relayed) == sorted(n.node_id for n in others)

    # The next version is another node's: its votes go to it.
    seen.messages.clear()
    v2 = nodes[2].patch(region, "line", set={"speed": 2})
    consensus_everywhere(nodes, region, "line", v2)
    supported_everywhere(nodes, region, "line", v2)
    seen.quiet()
    direct, relayed = seen.voters(region)
    assert direct == [] and sorted(relayed) == sorted(n.node_id for n in nodes if n is not nodes[2])
    assert nodes[2].counters["votes-relayed"] == 3
    assert all(n.wait_published(TIMEOUT) and not n.store.unpublished() for n in nodes)  # own votes cleared too


def test_the_votes_of_a_batch_are_passed_on_as_that_batch(make_swarm, region, attacker):
    """A batch of writes draws from each voter one batch of votes to the author; the author
    passes each on whole (one signature check for every reader, no paths), unless a live
    peer says it reads no batch in a relay: then each vote goes alone, in its item form."""
    nodes, _ = make_swarm(4)
    relaying(nodes)
    seen = VoteTopic(attacker, region)
    writer, others = nodes[0], nodes[1:]
    for round_, unbatched in enumerate((False, True)):
        writer.presence._heard(others[0].node_id, {"relay": True, "packs": True,  # (what its births would say)
                                                   **({} if unbatched else {"relay-batches": True})})
        seen.messages.clear()
        with writer.batch():
            versions = {f"k{i}": writer.put(region, f"k{i}", {"round": round_}) for i in range(6)}
        for key, version in versions.items():
            consensus_everywhere(nodes, region, key, version)
            supported_everywhere(nodes, region, key, version)
        seen.quiet()
        forms = [len(cbor2.loads(raw)) for data in seen.messages if is_relay(data)
                 for raw in cbor2.loads(data)["relay"]]
        direct, relayed = seen.voters(region)
        assert direct == [] and sorted(relayed) == sorted(n.node_id for n in others for _ in versions)
        # (a whole batch: [payloads, signature]; a vote in item form: [payload, signature, n, index, path])
        assert forms == ([5] * 3 * len(versions) if unbatched else [2] * 3), forms
        assert writer.counters["votes-relayed"] == 3 * len(versions) * (round_ + 1)


def test_votes_an_author_could_not_pass_on_reach_the_others_with_anti_entropy(make_swarm, region):
    nodes, _ = make_swarm(3, sync_interval=1.0)
    relaying(nodes)
    author, others = nodes[0], nodes[1:]
    author.relay._publish = lambda region, votes: None  # what it took is lost, as if it lost power then
    version = author.put(region, "line", {"speed": 1})
    for n in others:  # each holds its own vote alone, until a round brings the others' from their voters
        assert n.wait_until(lambda n=n: n.store.has_version(bytes.fromhex(version)), TIMEOUT)
    consensus_everywhere(others, region, "line", version)
    supported_everywhere(nodes, region, "line", version)
    assert author.counters["relays-out"] == 0 and all(n.counters["sync.envelopes"] for n in others)


def test_a_node_that_does_not_relay_gets_its_votes_on_the_region_topic(member_configs, region, attacker):
    configs = member_configs(3)
    configs[0].relay_votes = False  # (as a swarm with nodes older than 0.3 runs)
    nodes = [Node(c).start() for c in configs]
    try:
        relaying(nodes[1:], among=nodes[1:])
        assert not any(nodes[0].node_id in n.relay.authors for n in nodes[1:])
        assert not nodes[0].relay.authors
        seen = VoteTopic(attacker, region)
        version = nodes[0].put(region, "line", {"speed": 1})
        consensus_everywhere(nodes, region, "line", version)
        supported_everywhere(nodes, region, "line", version)
        v2 = nodes[1].patch(region, "line", set={"speed": 2})  # node 0 sends its vote straight on too
        consensus_everywhere(nodes, region, "line", v2)
        supported_everywhere(nodes, region, "line", v2)
        seen.quiet()
        direct, relayed = seen.voters(region)
        # the others' votes on node 0's version (its own is in its diff), node 0's on node 1's,
        # and node 2's passed on by node 1 (whose own is in its diff)
        assert sorted(direct) == sorted(n.node_id for n in nodes)
        assert relayed == [nodes[2].node_id]
        assert nodes[0].counters["votes-relayed"] == 0 and nodes[1].counters["votes-relayed"] == 1
    finally:
        for n in nodes:
            n.stop()


def test_an_author_passes_on_member_votes_only_and_a_relay_carries_votes_only(make_swarm, make_node, region,
                                                                             attacker):
    nodes, _ = make_swarm(3)
    relaying(nodes)
    version = nodes[0].put(region, "line", {"speed": 1})
    consensus_everywhere(nodes, region, "line", version)
    supported_everywhere(nodes, region, "line", version)
    outsider = make_node("outsider", start=False)
    vote = encode(outsider.identity, "vote", region, 1, outsider.clock.now(),
                  {"key": "line", "version": bytes.fromhex(version), "round": 1})
    diff_ = encode(nodes[1].identity, "diff", region, 10**6, nodes[1].clock.now(), {"key": "x"})
    before = [dict(n.counters) for n in nodes]
    relayed = nodes[0].counters["votes-relayed"]
    attacker.send(node_topic(nodes[0].node_id, "vote"), vote.raw)  # to the author, from a non-member
    attacker.send(region_topic("vote", region), encode_relay([vote.raw]))
    attacker.send(region_topic("vote", region), encode_relay([diff_.raw]))  # a relay of something else

    def grew(n, i, name, by):
        return n.counters[name] - before[i].get(name, 0) >= by
    for i, n in enumerate(nodes):
        assert n.wait_until(lambda n=n, i=i: grew(n, i, "rejected.topic-mismatch", 1) and (
            grew(n, i, "votes", 1) and grew(n, i, "votes.known", 1) if i == 0 else grew(n, i, "votes", 1)),
            TIMEOUT), n.counters
        assert n.status(region, "line")["support"].get(version) == 3  # (an outsider's vote counts nowhere)
    assert nodes[0].counters["votes-relayed"] == relayed  # stored, as any vote, but not passed on


def test_an_own_vote_waiting_to_be_passed_on_is_kept_in_the_outbox(tmp_path):
    """Until the broker has the relay carrying it: a node that loses power first sends it
    alone (on the region topic) at its next start, as any message of its outbox. (A write's
    vote travels in its diff; a vote of its own follows only with node.votes_in_diffs off.)"""
    for apart in (False, True):
        node = Node(Config(home=tmp_path / f"n{apart}", regions=["plant"], sync_interval=0, votes_in_diffs=not apart))
        try:
            version = node.put("plant/a", "k", {"a": 1})
            assert node.consensus("plant/a", "k").version == version  # (a swarm of one)
            held = node.store.unpublished()
            assert sorted(item.topic for item in held) == [region_topic("diff", "plant/a")] + (
                [region_topic("vote", "plant/a")] if apart else [])
            assert node.counters["relays-out"] == apart  # (tried: this node is not connected)
        finally:
            node.stop()
