"""A node given several brokers moves to the next when its broker goes away, and what it
wrote meanwhile is not lost."""

from __future__ import annotations

import pytest

from edgeswarm.broker.embedded import EmbeddedBroker
from edgeswarm.node import Config, Node
from edgeswarm.node.config import ConfigError, parse_broker_url

from netcut import Link

TIMEOUT = 30.0


def test_node_fails_over_to_the_next_broker_with_its_queued_writes(member_configs, region):
    first, second = EmbeddedBroker().start(), EmbeddedBroker().start()
    link = Link(first.host, first.port)  # the way to the first broker, which the test cuts
    configs = member_configs(2, sync_interval=0, snapshot_interval=0)
    for c in configs:
        c.protocol = "3.1.1"
    configs[0].broker_urls = [f"mqtt://127.0.0.1:{link.port}", f"mqtt://127.0.0.1:{second.port}"]
    configs[1].broker_urls = [f"mqtt://127.0.0.1:{second.port}"]
    mover, other = Node(configs[0]), Node(configs[1])
    try:
        mover.start()
        other.start()
        assert mover.transport.port == link.port
        before = mover.put(region, "k", {"i": 0})  # published on the first broker only

        link.cut()  # its broker is gone (and stays unreachable)
        during = mover.put(region, "k2", {"i": 1})  # stored; published once it is back on a broker
        t = mover.transport
        assert t.wait_state(lambda: t.connected and t.port == second.port, TIMEOUT), "no move to the second broker"
        assert other.wait_until(lambda: other.store.has_version(bytes.fromhex(during)), TIMEOUT), mover.stats()
        mover.sync_now()  # the write from before the move reaches the other side by anti-entropy
        assert other.wait_until(lambda: other.store.has_version(bytes.fromhex(before)), TIMEOUT), other.stats()
        assert mover.wait_published(TIMEOUT) and not mover.store.unpublished()
    finally:
        mover.stop()
        other.stop()
        link.close()
        second.stop()
        first.stop()


def test_broker_urls_are_checked():
    assert parse_broker_url("mqtts://broker.example") == ("broker.example", 8883, True)
    assert parse_broker_url("mqtt://[::1]:1884") == ("::1", 1884, False)
    for bad in ("http://h", "mqtt://h:0", "mqtt://h:70000", "mqtt://h/path", "mqtt://", "h:1883"):
        with pytest.raises(ConfigError, match="mqtt://host:port"):
            parse_broker_url(bad)
    with pytest.raises(ConfigError, match="not a mix"):
        Config(home="/tmp/x", broker_urls=["mqtt://a", "mqtts://b"])


def test_an_outbox_that_cannot_let_go_costs_the_writes_nothing(make_node, region, caplog):
    """Acknowledged outbox rows go with the node's next transaction: a store that refuses
    their DELETE fails neither that write nor the wait for the broker, and the rows stay,
    to be sent again at the next start (receivers drop them as known)."""
    node = make_node()

    def change(sql: str) -> None:  # (in a store transaction: the node's threads share the connection)
        with node.store.transaction():
            node.store.db.conn.execute(sql)
    change("CREATE TRIGGER keep BEFORE DELETE ON outbox BEGIN SELECT RAISE(ABORT, 'kept'); END")
    first = node.put(region, "k", {"n": 1})
    assert node.wait_published(TIMEOUT)
    second = node.put(region, "k", {"n": 2})  # (its transaction would take the first's rows along)
    assert node.wait_published(TIMEOUT)
    assert node.consensus(region, "k").version == second and node.store.version(bytes.fromhex(first))
    assert len(node.store.unpublished()) == 2 and "could not clear" in caplog.text
    change("DROP TRIGGER keep")
    node.put(region, "k", {"n": 3})
    assert node.wait_published(TIMEOUT)
    assert len(node.store.unpublished()) == 2  # (the ones let go before stay until the next start)
