"""Shared fixtures: real brokers on real sockets, nodes with real keys and SQLite files."""

from __future__ import annotations

import os
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeswarm.broker.embedded import EmbeddedBroker, is_listening
from edgeswarm.node import Config, Node

# A Mosquitto to run the broker-parametrised tests on: EDGESWARM_TEST_MOSQUITTO=host:port
# (.ci/run sets it when it starts one), else the usual 127.0.0.1:1883.
_host, _, _port = os.environ.get("EDGESWARM_TEST_MOSQUITTO", "127.0.0.1:1883").rpartition(":")
MOSQUITTO = (_host, int(_port))


class BrokerAddress:
    def __init__(self, name: str, host: str, port: int, protocol: str) -> None:
        self.name, self.host, self.port, self.protocol = name, host, port, protocol


def _stop_all(nodes: list[Node]) -> None:
    for node in nodes:
        try:
            node.stop()
        except Exception:  # a test may have stopped (or crashed) it already
            pass


@pytest.fixture(scope="session")
def embedded_broker():
    with EmbeddedBroker() as broker:  # a free port, never 1883
        yield broker


@pytest.fixture(params=["embedded", "mosquitto"])
def broker(request, embedded_broker):
    """Every integration test runs on the embedded broker and, when one is running, on Mosquitto."""
    if request.param == "embedded":
        return BrokerAddress("embedded", embedded_broker.host, embedded_broker.port, "3.1.1")
    if not is_listening(*MOSQUITTO):
        pytest.skip(f"no Mosquitto listening on {MOSQUITTO[0]}:{MOSQUITTO[1]} (install and start mosquitto, "
                    "or set EDGESWARM_TEST_MOSQUITTO=host:port, to run this case)")
    return BrokerAddress("mosquitto", *MOSQUITTO, "auto")


@pytest.fixture
def admin():
    """A swarm admin key (in memory; see admin_dir for the admin's commands)."""
    from edgeswarm.shared.identity import Identity
    return Identity.generate()


@pytest.fixture
def admin_dir(tmp_path, admin):
    """The directory holding the admin key, as `--admin-dir` takes it."""
    admin.save(tmp_path / "admin" / "swarm.key")
    return tmp_path / "admin"


@pytest.fixture
def region():
    """A region no other test (or other user of a shared broker) writes to."""
    return f"test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def offline_pair(tmp_path):
    """Nodes a and b that never connect (a test hands b what a sent); a has written six
    frames of plant/a, so its trace holds a few entries (one per write)."""
    a, b = (Node(Config(home=tmp_path / name, regions=["plant"], sync_interval=0)) for name in "ab")
    try:
        for i in range(6):
            a.put("plant/a", f"k{i}", {"i": i})
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def make_node(tmp_path, broker, region):
    nodes: list[Node] = []

    def make(name: str | None = None, start: bool = True, **overrides) -> Node:
        home = tmp_path / (name or f"node{len(nodes)}")
        config = Config(home=home, regions=[region], broker_host=broker.host, broker_port=broker.port,
                        protocol=broker.protocol, **overrides)
        node = Node(config)
        nodes.append(node)
        return node.start() if start else node

    yield make
    _stop_all(nodes)


@pytest.fixture
def make_swarm(tmp_path, broker, region):
    """make_swarm(n, extra_members=0, **config) -> (nodes, identities of extra members that run
    no node). Every node knows the full member list; consensus needs a majority."""
    from edgeswarm.shared.identity import Identity

    nodes: list[Node] = []

    def make(n: int, extra_members: int = 0, **overrides):
        homes = [tmp_path / f"node{i}" for i in range(n)]
        identities = [Identity.load_or_create(h / "node.key") for h in homes]
        extras = [Identity.generate() for _ in range(extra_members)]
        members = [i.node_id for i in identities + extras]
        for home in homes:
            config = Config(home=home, regions=[region], broker_host=broker.host, broker_port=broker.port,
                            protocol=broker.protocol, members=members, **overrides)
            nodes.append(Node(config).start())
        return list(nodes), extras

    yield make
    _stop_all(nodes)


@pytest.fixture
def member_configs(tmp_path, broker, region):
    """member_configs(n, **config) -> n configs on the broker whose keys (created now) make
    the member list, for tests that start, stop and restart nodes themselves."""
    from edgeswarm.shared.identity import Identity

    def make(n: int, **overrides) -> list[Config]:
        homes = [tmp_path / f"n{i}" for i in range(n)]
        members = [Identity.load_or_create(h / "node.key").node_id for h in homes]
        return [Config(home=h, regions=[region], broker_host=broker.host, broker_port=broker.port,
                       protocol=broker.protocol, members=members, **overrides) for h in homes]

    return make


class Attacker:
    """A plain MQTT client, as anyone with access to the broker could run."""

    def __init__(self, broker):
        protocol = mqtt.MQTTv311 if broker.protocol == "3.1.1" else mqtt.MQTTv5
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic, payload):
        self.client.publish(topic, payload, qos=1).wait_for_publish(10.0)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def attacker(broker):
    a = Attacker(broker)
    yield a
    a.close()
