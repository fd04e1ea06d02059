"""Birth, death (clean and by will) and fingerprints."""

from __future__ import annotations

import socket
import subprocess
import sys

from edgeswarm.node import Config
from edgeswarm.node.cli import _bytes
from edgeswarm.node.harness import NodeProcess
from edgeswarm.shared.topics import node_topic

TIMEOUT = 15.0


def peer(node, other):
    return node.store.peer(other.node_id) or {}


def test_births_deaths_and_fingerprints(make_node, region):
    a, b = make_node(), make_node()
    assert b.wait_until(lambda: peer(b, a).get("alive") == 1 and peer(b, a).get("regions") == [region], TIMEOUT)
    assert a.wait_until(lambda: peer(a, b).get("alive") == 1, TIMEOUT)

    a.put(region, "k", {"x": 1})
    assert a.wait_until(lambda: a.consensus(region, "k") is not None, TIMEOUT)
    a.sync_now()  # publishes a's fingerprint with the digests
    assert b.wait_until(lambda: (peer(b, a).get("fingerprint") or {}).get("frames") == 1, TIMEOUT)
    assert peer(b, a)["fingerprint"]["agreement"] == 1.0
    assert b.swarm()[a.node_id]["alive"] == 1 and b.swarm()[b.node_id]["self"]
    assert peer(b, a)["fingerprint"]["broker"] == f"{a.transport.host}:{a.transport.port}"
    b.config.config_path.write_text(b.config.to_toml())  # (for the command, which reads b's home)
    status = subprocess.run([sys.executable, "-m", "edgeswarm.node.cli", "--home", str(b.config.home), "status"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    row = next((line for line in status.stdout.splitlines() if line.startswith(a.node_id)), status.stderr)
    assert f"{a.transport.host}:{a.transport.port}" in row and " yes " in row, status.stdout
    free = peer(b, a)["fingerprint"]["disk_free"]  # (the bytes free on the disk of a's store)
    assert free > 0 and f" {_bytes(free)} " in row, status.stdout

    # The link drops without a goodbye: the broker publishes the will; paho reconnects and
    # the node is born again, in a new session (its will re-armed for it).
    # (b's counters include what the broker retained of nodes of earlier tests)
    session, deaths, births = peer(b, a)["session"], b.counters["presence.death"], b.counters["presence.birth"]
    a.transport._client.socket().shutdown(socket.SHUT_RDWR)
    assert b.wait_until(lambda: b.counters["presence.death"] > deaths, TIMEOUT)
    assert b.wait_until(lambda: peer(b, a).get("alive") == 1 and b.counters["presence.birth"] > births, TIMEOUT)
    assert peer(b, a)["session"] == a.presence.session > session
    # A node that comes now gets a's retained death of the old session and birth of the new
    # one: alive.
    c = make_node()
    a.sync_now()  # a fingerprint, delivered to c after what the broker retained
    assert c.wait_until(lambda: (peer(c, a).get("fingerprint") or {}).get("session") == a.presence.session, TIMEOUT)
    assert peer(c, a)["alive"] == 1 and a.node_id in c.relay.authors

    a.stop()  # a clean stop says goodbye
    assert b.wait_until(lambda: peer(b, a).get("alive") == 0, TIMEOUT)
    assert b.counters["rejected.internal"] == 0 and b.counters.get("rejected.bad-presence", 0) == 0


def test_a_fingerprint_tells_a_newcomer_that_missed_the_birth(make_node, region):
    """Brokers that deliver no retained birth to a wildcard subscription (RabbitMQ): the
    newcomer learns that the node runs from its next fingerprint."""
    a = make_node()
    for kind in ("birth", "fingerprint"):  # what the broker retained of a, gone
        assert a.transport.publish(node_topic(a.node_id, kind), b"", retain=True, wait=TIMEOUT) is not None
    b = make_node()
    assert peer(b, a).get("alive") != 1
    a.sync_now()  # a fingerprint
    assert b.wait_until(lambda: peer(b, a).get("alive") == 1, TIMEOUT)
    assert peer(b, a)["session"] == a.presence.session
    a.stop()  # and its death still counts
    assert b.wait_until(lambda: peer(b, a).get("alive") == 0, TIMEOUT)


def test_a_node_killed_without_a_goodbye_is_dead_to_a_node_that_comes_later(make_node, tmp_path, broker, region):
    """Its retained birth and fingerprint stay on the broker; so does its will."""
    a = make_node()
    victim = NodeProcess(Config(home=tmp_path / "victim", regions=[region], broker_host=broker.host,
                                broker_port=broker.port, protocol=broker.protocol)).start()
    try:
        assert a.wait_until(lambda: (a.store.peer(victim.node_id) or {}).get("alive") == 1, TIMEOUT)
        victim.sync_now()  # its fingerprint (retained)
        assert a.wait_until(lambda: (a.store.peer(victim.node_id) or {}).get("fingerprint") is not None, TIMEOUT)
    finally:
        victim.kill()  # a power cut
    assert a.wait_until(lambda: a.store.peer(victim.node_id)["alive"] == 0, TIMEOUT)
    assert victim.node_id not in a.relay.authors
    b = make_node()  # comes later: the broker holds the victim's birth, fingerprint and death
    a.sync_now()  # a's fingerprint, delivered to b after what the broker retained
    assert b.wait_until(lambda: peer(b, a).get("fingerprint") is not None, TIMEOUT)
    seen = b.store.peer(victim.node_id)
    assert seen is not None and seen["alive"] == 0 and seen["death_hlc"] is not None
    assert victim.node_id not in b.relay.authors
    assert b.counters["rejected.internal"] == 0


def test_a_clean_stop_whose_clearing_never_reaches_the_broker_still_ends_the_node(make_node, region):
    """The goodbye is a retained death, sent before the retained messages are cleared: should
    the clearing be lost as the connection closes, a newcomer finds the node's session ended
    rather than its birth alone."""
    a = make_node()
    publish = a.transport.publish
    a.transport.publish = lambda topic, payload, **kw: None if payload == b"" else publish(topic, payload, **kw)
    a.stop()
    b = make_node()
    assert b.wait_until(lambda: peer(b, a).get("death_hlc") is not None, TIMEOUT), peer(b, a)
    assert peer(b, a)["alive"] == 0 and a.node_id not in b.relay.authors


def test_a_fingerprint_is_made_while_other_threads_add_counters(make_node):
    """The network thread and the inbox worker count new things (a first rejection of a
    kind, a first answer spared) while a fingerprint is made, even as the node starts: the
    fingerprint reads a copy of the counters, never the dict that grows under it."""
    import threading
    node = make_node(start=False)
    counting = threading.Thread(target=lambda: [node.counters.update({f"rejected.kind-{i}": 1})
                                                for i in range(200_000)], daemon=True)
    counting.start()
    made = 0
    while counting.is_alive():
        assert node.presence.fingerprint()["rejected"] >= 0
        made += 1
    counting.join()
    assert made and node.presence.fingerprint()["rejected"] == 200_000
