"""A swarm on RabbitMQ's MQTT plugin (a private RabbitMQ node): MQTT 3.1.1 only, QoS 1,
retained messages, wills and persistent sessions, which is all the swarm asks of a broker."""

from __future__ import annotations

import pytest

from edgeswarm.node import Config, Node
from edgeswarm.shared.identity import Identity

from helpers import same_digest
from rabbitmq import RabbitMQ, find_rabbitmq

pytestmark = pytest.mark.skipif(find_rabbitmq() is None, reason="RabbitMQ with its MQTT plugin is not installed "
                                                              "(Debian: apt-get install rabbitmq-server)")

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory):
    with RabbitMQ(tmp_path_factory.mktemp("rabbitmq")) as r:
        yield r


def _configs(tmp_path, rabbit, region, n, **overrides):
    homes = [tmp_path / f"n{i}" for i in range(n)]
    members = [Identity.load_or_create(h / "node.key").node_id for h in homes]
    return [Config(home=h, regions=[region], broker_urls=[rabbit.url], members=members, snapshot_interval=0,
                   **overrides) for h in homes]


def test_a_swarm_on_rabbitmq_converges_on_concurrent_writes(tmp_path, rabbit, region):
    nodes = [Node(c).start() for c in _configs(tmp_path, rabbit, region, 3, sync_interval=0)]
    try:
        assert all(n.transport.mqtt_version == "3.1.1" for n in nodes)  # (it refuses MQTT 5 at once)
        versions = [n.put(region, "shared", {"by": i}) for i, n in enumerate(nodes)]  # three concurrent edits
        versions += [n.put(region, f"own{i}", {"i": i}) for i, n in enumerate(nodes)]
        for n in nodes:
            assert n.wait_until(lambda n=n: all(n.store.has_version(bytes.fromhex(v)) for v in versions), TIMEOUT)
        keys = ["shared", "own0", "own1", "own2"]
        for n in nodes:
            assert n.wait_until(lambda n=n: all(n.consensus(region, k) for k in keys), TIMEOUT), n.stats()
        assert len({tuple(n.consensus(region, k).version for k in keys) for n in nodes}) == 1
        assert same_digest(nodes, region, TIMEOUT)
    finally:
        for n in nodes:
            n.stop()


def test_births_wills_and_a_returning_node_on_rabbitmq(tmp_path, rabbit, region):
    a_config, b_config = _configs(tmp_path, rabbit, region, 2, sync_interval=2)
    a = Node(a_config).start()
    b = Node(b_config).start()
    try:
        # A retained birth: a node that connects later learns of the earlier one at once.
        assert b.wait_until(lambda: (b.store.peer(a.node_id) or {}).get("alive") == 1, TIMEOUT)
        session = b.presence.session
        b.transport._client.socket().close()  # the board vanishes: no DISCONNECT, the broker sends its will
        b.transport.close()
        assert a.wait_until(lambda: (a.store.peer(b.node_id) or {}).get("alive") == 0, TIMEOUT), a.stats()
        b.stop()

        missed = a.put(region, "while-away", {"v": 1})  # queued in b's persistent session, or pulled later
        b = Node(b_config).start()
        assert b.presence.session > session  # (each connection is a new session)
        assert b.wait_until(lambda: b.store.has_version(bytes.fromhex(missed)), TIMEOUT), b.stats()
        assert a.wait_until(lambda: (a.store.peer(b.node_id) or {}).get("alive") == 1, TIMEOUT)
    finally:
        a.stop()
        b.stop()
