"""Sealed regions: diffs and votes cross the broker encrypted; only nodes (and watchers)
holding the region's key see values."""

from __future__ import annotations

import os
import threading
import time

from edgeswarm.node.cli import main
from edgeswarm.shared import diff
from edgeswarm.shared.envelope import encode
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.topics import region_topic

from helpers import watch_one

TIMEOUT = 20.0
SECRET = "TOPSECRET-4711"


def has_consensus(node, region, key, version) -> bool:
    return node.wait_until(lambda: (f := node.consensus(region, key)) is not None and f.version == version, TIMEOUT)


def key_file(tmp_path, name="region.key"):
    path = tmp_path / name
    assert main(["seal-key", "--out", str(path)]) == 0
    assert main(["seal-key", "--out", str(path)]) == 1  # never overwritten
    return path


def test_values_cross_the_broker_sealed(make_node, tmp_path, region, attacker):
    key = key_file(tmp_path)
    seen: list[bytes] = []
    arrived = threading.Event()

    def on_message(client, userdata, message) -> None:
        seen.append(message.payload)
        if message.topic == region_topic("vote", region):
            arrived.set()

    attacker.client.on_message = on_message
    attacker.client.subscribe(f"es/v1/+/{region}/#", qos=1)
    a = make_node("a", sealed={region: str(key)})
    b = make_node("b", sealed={region: str(key)})
    plain = make_node("plain")  # follows the region without the key
    v = a.put(region, "door", {"code": SECRET})
    assert has_consensus(b, region, "door", v) and b.get(region, "door") == {"code": SECRET}
    assert arrived.wait(TIMEOUT) and seen
    assert not any(SECRET.encode() in payload for payload in seen)
    assert plain.wait_until(lambda: plain.counters["ignored.sealed"] >= 1, TIMEOUT)
    assert plain.get(region, "door") is None
    # a plain diff signed by a stranger, into the sealed region: refused
    other = Identity.generate()
    version = diff.version_hash(region, "door", None, {"code": "open"})
    forged = encode(other, "diff", region, 1, int(time.time() * 1000) << 16,
                    {"key": "door", "parent": None, "version": version, "ops": [["set", [], {"code": "open"}]]})
    attacker.send(region_topic("diff", region), forged.raw)
    assert b.wait_until(lambda: b.counters["rejected.not-sealed"] >= 1, TIMEOUT)
    assert not b.store.has_version(version)


def test_a_batch_in_a_sealed_region_is_opened_one_change_at_a_time(make_node, tmp_path, region):
    key = key_file(tmp_path)
    a = make_node("a", sealed={region: str(key)})
    b = make_node("b", sealed={region: str(key)})
    plain = make_node("plain")
    with a.batch():
        versions = [a.put(region, f"door{i}", {"code": f"{SECRET}-{i}"}) for i in range(3)]
    assert a.counters["batches-out"] == 1  # the diffs, which are a's votes too
    for i, v in enumerate(versions):
        assert has_consensus(b, region, f"door{i}", v) and b.get(region, f"door{i}") == {"code": f"{SECRET}-{i}"}
    # without the key: each sealed change of the batch counted, none stored
    assert plain.wait_until(lambda: plain.counters["ignored.sealed"] >= 3, TIMEOUT)
    assert plain.keys(region) == []


def test_a_node_with_the_key_catches_up_through_anti_entropy(make_node, tmp_path, region):
    key = key_file(tmp_path)
    a = make_node("a", sealed={region: str(key)})
    v = a.put(region, "door", {"code": SECRET})
    assert a.wait_published(TIMEOUT)
    late = make_node("late", sealed={region: str(key)})  # pulls what it missed: sealed envelopes, opened here
    assert late.wait_until(lambda: late.store.has_version(bytes.fromhex(v)), TIMEOUT)
    assert late.get(region, "door") == {"code": SECRET}


def test_watch_opens_sealed_bodies_with_the_key(make_node, broker, tmp_path, region):
    key = key_file(tmp_path)
    a = make_node("a", sealed={region: str(key)})
    out, _ = watch_one(["watch", region, "--host", broker.host, "--port", str(broker.port), "--sealed-key", str(key)],
                       lambda: a.put(region, "door", {"code": SECRET}), TIMEOUT,
                       env={**os.environ, "EDGESWARM_HOME": str(tmp_path / "no-node-here")})
    assert SECRET in out
