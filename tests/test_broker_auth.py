"""The embedded broker of a swarm with a roster: only admitted nodes (and the admin's tools)
connect, each publishing and reading only in its certificate's region trees."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeswarm.broker.embedded import EmbeddedBroker, free_port
from edgeswarm.broker.mosquitto import MosquittoProcess, find_mosquitto
from edgeswarm.node import Config, Node
from edgeswarm.node.cli import main
from edgeswarm.node.transport import Transport, TransportError
from edgeswarm.shared import roster
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.topics import node_topic, region_topic

from helpers import certificate, watch_one

TIMEOUT = 20.0


@pytest.fixture
def roster_broker(admin):
    with EmbeddedBroker(admin=admin.public_key.hex()) as broker:
        yield broker


@pytest.fixture
def nodes(tmp_path, admin, roster_broker, region):
    started: list[Node] = []

    def make(name: str, regions: list[str] | None = None) -> Node:
        home = tmp_path / name
        identity = Identity.load_or_create(home / "node.key")
        (home / "admission.cert").write_bytes(certificate(admin, identity, regions or [region]))
        node = Node(Config(home=home, regions=regions or [region], broker_port=roster_broker.port, protocol="3.1.1",
                           swarm_admin=admin.public_key.hex(), certificate="admission.cert"))
        started.append(node.start())
        return node

    yield make
    for n in started:
        n.stop()


class Client:
    """A plain MQTT client logging in as it is told."""

    def __init__(self, broker, username: str | None = None, password: str | None = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.got: list[str] = []
        self.changed = threading.Condition()
        self.refused: str | None = None
        connected = threading.Event()

        def on_connect(client, userdata, flags, reason_code, properties) -> None:
            self.refused = str(reason_code) if reason_code.is_failure else None
            connected.set()

        def on_message(client, userdata, message) -> None:
            with self.changed:
                self.got.append(message.topic)
                self.changed.notify_all()

        self.client.on_connect, self.client.on_message = on_connect, on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert connected.wait(TIMEOUT)

    def wait_for(self, topic: str) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: topic in self.got, TIMEOUT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def assert_kept_to_its_region(d: Client, watcher: Client, region: str, elsewhere: str) -> None:
    """d, logged in and admitted for `elsewhere` only, publishes in `region` and then in
    `elsewhere`: the watcher (the admin, reading everything) gets the second, not the first."""
    assert d.refused is None and watcher.refused is None
    watcher.client.subscribe("es/v1/#", qos=1)
    watcher.client.publish(node_topic("ready", "birth"), b"", qos=1).wait_for_publish(TIMEOUT)
    assert watcher.wait_for(node_topic("ready", "birth"))
    d.client.publish(region_topic("diff", region), b"not for d", qos=1).wait_for_publish(TIMEOUT)
    d.client.publish(region_topic("diff", elsewhere), b"d's own region", qos=1).wait_for_publish(TIMEOUT)
    assert watcher.wait_for(region_topic("diff", elsewhere))  # published after the one dropped
    assert region_topic("diff", region) not in watcher.got


def test_a_client_without_credentials_is_refused(roster_broker, admin):
    anonymous = Client(roster_broker)
    stranger_key = Identity.generate()
    forged = roster.broker_password(stranger_key, certificate(Identity.generate(), stranger_key, ["plant"]))
    stranger = Client(roster_broker, stranger_key.node_id, forged)  # a certificate not from this swarm's admin
    try:
        assert anonymous.refused and stranger.refused
    finally:
        anonymous.close()
        stranger.close()
    transport = Transport([(roster_broker.host, roster_broker.port, False)], "es-nobody", protocol="3.1.1")
    with pytest.raises(TransportError, match="refused"):
        transport.connect()


def test_admitted_nodes_work_and_each_is_kept_to_its_regions(nodes, roster_broker, admin, region):
    a, b = nodes("a"), nodes("b")
    v = a.put(region, "valve", {"open": True})
    assert b.wait_until(lambda: (f := b.head(region, "valve")) is not None and f.version == v, TIMEOUT)
    # a node with valid credentials for another region publishes here: the broker drops it
    elsewhere = f"{region}-elsewhere"
    d_key = Identity.generate()
    d = Client(roster_broker, d_key.node_id, roster.broker_password(d_key, certificate(admin, d_key, [elsewhere])))
    watcher = Client(roster_broker, roster.ADMIN_USERNAME, roster.admin_password(admin))
    try:
        assert_kept_to_its_region(d, watcher, region, elsewhere)
        # and it may not subscribe to this region either
        granted: list = []
        done = threading.Event()
        d.client.on_subscribe = lambda client, userdata, mid, codes, props: (granted.extend(codes), done.set())
        d.client.subscribe(f"es/v1/+/{region}/#", qos=1)
        assert done.wait(TIMEOUT) and granted[0].is_failure
    finally:
        d.close()
        watcher.close()


def test_admitted_nodes_vote_and_sync_through_the_roster_broker(nodes, roster_broker, region):
    """The broker lets a node send what is addressed to another node (its votes to a version's
    author, sync and trace exchanges) on that node's topic, and nothing else there."""
    a, b = nodes("a"), nodes("b")
    assert a.wait_until(lambda: b.node_id in a.relay.authors, TIMEOUT)
    assert b.wait_until(lambda: a.node_id in b.relay.authors, TIMEOUT)
    v = a.put(region, "valve", {"open": True})  # b's vote goes to a, which passes it on
    for n in (a, b):
        assert n.wait_until(lambda n=n: (f := n.consensus(region, "valve")) is not None and f.version == v, TIMEOUT)
    late = nodes("late")  # pulls what it missed from a peer (sync-req and sync-resp on node topics)
    assert late.wait_until(lambda: (f := late.consensus(region, "valve")) is not None and f.version == v, TIMEOUT), \
        late.counters
    assert late.counters["sync.pulls"] + late.counters["sync.deferred"] >= 1


def test_the_admin_revokes_through_the_roster_broker(nodes, roster_broker, admin_dir, region):
    a, r = nodes("a"), nodes("r")
    assert a.wait_until(lambda: r.node_id in a.members(region), TIMEOUT)
    assert main(["revoke", Identity.load(r.config.key_path).public_key.hex(), "--admin-dir", str(admin_dir),
                 "--broker", roster_broker.url, "--protocol", "3.1.1"]) == 0
    assert a.wait_until(lambda: r.node_id not in a.members(region), TIMEOUT)
    assert a.admission.revoked() == {r.node_id}  # (what a broker a would host refuses from its start)
    # the broker refuses it from now on too
    r_identity = Identity.load(r.config.key_path)
    again = Client(roster_broker, r.node_id, roster.broker_password(r_identity, r.admission.own.raw))
    try:
        assert again.refused
    finally:
        again.close()


def test_watch_logs_in_with_the_node_credentials_of_its_home(nodes, roster_broker, admin, region, tmp_path):
    a = nodes("a")
    home = tmp_path / "watcher"
    identity = Identity.load_or_create(home / "node.key")
    (home / "admission.cert").write_bytes(certificate(admin, identity, [region]))
    Config(home=home, regions=[region], broker_port=roster_broker.port, protocol="3.1.1",
           swarm_admin=admin.public_key.hex(), certificate="admission.cert").save()
    out, _ = watch_one(["--home", str(home), "watch", region], lambda: a.put(region, "valve", {"open": True}),
                       TIMEOUT)
    assert f'"sender": "{a.node_id}"' in out


# -- a site's Mosquitto, configured by broker-config ------------------------------------------

@pytest.mark.skipif(find_mosquitto() is None, reason="no mosquitto executable (apt-get install mosquitto)")
def test_broker_config_makes_mosquitto_enforce_the_roster(tmp_path, admin, admin_dir, region, capsys):
    port = free_port()
    configs = []
    for name in ("a", "b"):
        home = tmp_path / name
        identity = Identity.load_or_create(home / "node.key")
        (home / "admission.cert").write_bytes(certificate(admin, identity, [region]))
        configs.append(Config(home=home, regions=[region], broker_port=port, swarm_admin=admin.public_key.hex(),
                              certificate="admission.cert"))
        configs[-1].save()
    logins = tmp_path / "logins"
    for c in configs:
        assert main(["--home", str(c.home), "id", "--broker-password"]) == 0
        logins.open("a").write(capsys.readouterr().out)
    site = tmp_path / "site"
    assert main(["broker-config", "mosquitto", "--logins", str(logins), "--out", str(site), "--port", str(port),
                 "--host", "127.0.0.1", "--admin-dir", str(admin_dir)]) == 0
    with MosquittoProcess(tmp_path / "run", port=port, config_file=site / "edgeswarm.conf") as broker:
        assert Client(broker).refused  # no anonymous clients
        a, b = (Node(c).start() for c in configs)
        try:
            assert a.wait_until(lambda: b.node_id in a.relay.authors, TIMEOUT)
            assert b.wait_until(lambda: a.node_id in b.relay.authors, TIMEOUT)
            v = a.put(region, "valve", {"open": True})  # b's vote goes to a (on a's topic), which passes it on
            for n in (a, b):
                assert n.wait_until(lambda n=n: (f := n.consensus(region, "valve")) is not None and f.version == v,
                                    TIMEOUT)
            # a node admitted elsewhere, with its right password, may not write here
            elsewhere = f"{region}-elsewhere"
            d_key = Identity.generate()
            d_password = roster.broker_password(d_key, certificate(admin, d_key, [elsewhere]))
            d_logins = tmp_path / "d-logins"
            d_logins.write_text(json.dumps({"node": d_key.node_id, "broker_password": d_password}) + "\n")
            assert Client(broker, d_key.node_id, d_password).refused  # not in this broker's password file yet
        finally:
            a.stop()
            b.stop()
    assert main(["broker-config", "mosquitto", "--logins", str(d_logins), "--out", str(site), "--port", str(port),
                 "--host", "127.0.0.1", "--admin-dir", str(admin_dir)]) == 0
    with MosquittoProcess(tmp_path / "run", port=port, config_file=site / "edgeswarm.conf") as broker:
        d = Client(broker, d_key.node_id, d_password)
        watcher = Client(broker, roster.ADMIN_USERNAME, roster.admin_password(admin))
        try:
            assert_kept_to_its_region(d, watcher, region, elsewhere)
        finally:
            d.close()
            watcher.close()


def test_a_broker_started_with_revocations_refuses_those_nodes_from_the_start(tmp_path, admin, admin_dir):
    """An embedded broker keeps nothing across restarts: `edgeswarm broker --revocation`
    (and a node hosting the bus, from what it knows) enforces revocations from the start."""
    revoked, kept = Identity.generate(), Identity.generate()
    out = tmp_path / "r.revocation"
    assert main(["revoke", revoked.public_key.hex(), "--admin-dir", str(admin_dir), "--out", str(out)]) == 0
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgeswarm.node.cli", "broker", "--port", str(port),
                             "--admin", admin.public_key.hex(), "--revocation", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in proc.stdout.readline(), proc.stderr.read()
        broker = SimpleNamespace(host="127.0.0.1", port=port)
        refused = Client(broker, revoked.node_id, roster.broker_password(revoked, certificate(admin, revoked, ["p"])))
        accepted = Client(broker, kept.node_id, roster.broker_password(kept, certificate(admin, kept, ["p"])))
        try:
            assert refused.refused and accepted.refused is None
        finally:
            refused.close()
            accepted.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_every_message_reaches_every_subscriber_while_others_subscribe(roster_broker, admin):
    """With a roster, the broker asks its topic check about each subscriber of a message, and
    waits for the answer in the middle of its walk over the subscriptions; a subscription to
    a new filter by another client meanwhile used to end that walk, and the subscribers after
    that point did not get the message."""
    login = (roster.ADMIN_USERNAME, roster.admin_password(admin))
    keeper, receiver, adder, publisher = (Client(roster_broker, *login) for _ in range(4))
    got: set[bytes] = set()
    everything = threading.Event()
    count = 300
    def on_message(client, userdata, message) -> None:
        got.add(message.payload)
        if len(got) == count:
            everything.set()
    receiver.client.on_message = on_message
    adding = threading.Event()
    def subscribe_new() -> None:  # (one at a time: each SUBACK awaited)
        acked = threading.Semaphore(1)
        adder.client.on_subscribe = lambda *a: acked.release()
        j = 0
        while not adding.is_set() and acked.acquire(timeout=5):
            adder.client.subscribe(f"es/v1/node/n{j}/birth", qos=0)
            j += 1
    try:
        for client, topic in ((keeper, "es/v1/node/flood/#"), (receiver, "es/v1/node/flood/birth")):
            done = threading.Event()
            client.client.on_subscribe = lambda *a, e=done: e.set()
            client.client.subscribe(topic, qos=1)
            assert done.wait(TIMEOUT)
        thread = threading.Thread(target=subscribe_new)
        thread.start()
        try:
            for i in range(count):
                publisher.client.publish("es/v1/node/flood/birth", str(i).encode(), qos=1).wait_for_publish(TIMEOUT)
            assert everything.wait(TIMEOUT), f"{count - len(got)} of {count} messages never reached the subscriber"
        finally:
            adding.set()
            thread.join(TIMEOUT)
    finally:
        for client in (keeper, receiver, adder, publisher):
            client.close()
