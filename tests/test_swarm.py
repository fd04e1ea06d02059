"""Nodes exchanging signed frame diffs through a real broker, and rejecting tampered input."""

from __future__ import annotations

import asyncio
import time

import cbor2
import pytest

from edgeswarm.node import Config
from edgeswarm.node.config import ConfigError
from edgeswarm.shared import diff
from edgeswarm.shared.clock import pack, wall_ms
from edgeswarm.shared.envelope import BATCH_STATEMENT, canonical, decode, encode
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.topics import region_topic

TIMEOUT = 10.0


def same_head(node, region, key, version):
    head = node.head(region, key)
    return head is not None and head.version == version


def test_frames_converge_with_the_same_version_hash(make_node, region):
    a, b, c = make_node(), make_node(), make_node()
    v1 = a.put(region, "conveyor", {"speed": 1.2, "limits": {"max": 3.0}})
    for n in (b, c):
        assert n.wait_until(lambda n=n: same_head(n, region, "conveyor", v1), TIMEOUT)
        assert n.get(region, "conveyor") == {"speed": 1.2, "limits": {"max": 3.0}}

    v2 = b.patch(region, "conveyor", set={("limits", "max"): 4.0}, delete=["speed"])
    for n in (a, c):
        assert n.wait_until(lambda n=n: same_head(n, region, "conveyor", v2), TIMEOUT)
    assert a.get(region, "conveyor") == {"limits": {"max": 4.0}}

    v3 = c.delete(region, "conveyor")
    for n in (a, b):
        assert n.wait_until(lambda n=n: same_head(n, region, "conveyor", v3), TIMEOUT)
        assert n.get(region, "conveyor") is None
        assert [fv.version for fv in n.history(region, "conveyor")] == [v1, v2, v3]
    assert a.regions() == b.regions() == [region]
    assert a.history(region, "conveyor")[1].author == b.node_id


def test_subregions_and_subscriptions(make_node, region):
    a, b = make_node(), make_node()
    seen = []
    b.subscribe(seen.append, region=f"{region}/vision")
    a.put(f"{region}/vision", "camera", {"fps": 30})
    v = a.put(f"{region}/audio", "mic", {"gain": 2})
    assert b.wait_until(lambda: same_head(b, f"{region}/audio", "mic", v), TIMEOUT)
    # b follows vision only: the camera frame's new head, then its new consensus
    assert b.wait_until(lambda: len(seen) == 2, TIMEOUT)
    assert [(fv.region, fv.key, fv.value) for fv in seen] == [(f"{region}/vision", "camera", {"fps": 30})] * 2
    assert seen[-1].state == "consensus"


def test_async_iterator_of_changes(make_node, region):
    a, b = make_node(), make_node()

    async def main():
        changes = b.changes(region)
        first = asyncio.ensure_future(changes.__anext__())
        await asyncio.sleep(0)  # let the iterator subscribe before the write
        version = a.put(region, "k", {"x": 1})
        fv = await asyncio.wait_for(first, TIMEOUT)
        await changes.aclose()
        return version, fv

    version, fv = asyncio.run(main())
    assert (fv.version, fv.value, fv.author) == (version, {"x": 1}, a.node_id)


def test_with_batches_off_a_node_sends_every_change_on_its_own(make_node, region):
    """node.batch = false: what a swarm with nodes older than 0.2 needs, which read only
    single messages."""
    a, b = make_node(batch=False), make_node()
    with a.batch():
        versions = [a.put(region, f"k{i}", {"i": i}) for i in range(5)]
    assert b.wait_until(lambda: all(same_head(b, region, f"k{i}", v) for i, v in enumerate(versions)), TIMEOUT)
    assert a.counters["batches-out"] == 0 and b.counters["received"] >= 5


def test_the_batch_setting_is_kept_and_checked(tmp_path):
    Config(home=tmp_path, batch=False).save()
    assert Config.load(tmp_path).batch is False
    (tmp_path / "config.toml").write_text((tmp_path / "config.toml").read_text().replace("batch = false", 'batch = "no"'))
    with pytest.raises(ConfigError, match="node.batch"):
        Config.load(tmp_path)


def test_outbox_sends_what_was_written_before_start(make_node, region):
    b = make_node()
    a = make_node(start=False)
    v = a.put(region, "offline", {"written": "before connecting"})
    assert a.store.unpublished()
    a.start()
    assert b.wait_until(lambda: same_head(b, region, "offline", v), TIMEOUT)
    assert a.wait_published(TIMEOUT)
    assert not a.store.unpublished()


def test_a_batch_is_signed_once_and_kept_in_its_item_forms(make_node, region, monkeypatch):
    """A batch's writes are signed together as it ends, once (no diff of it alone): its
    diffs are stored, and kept in the outbox, in their item forms, each checking alone
    against that one signature; a node that was not connected sends those as it starts,
    and its peer takes them."""
    b = make_node()
    a = make_node(start=False)
    signed = []
    sign = Identity.sign
    monkeypatch.setattr(Identity, "sign", lambda me, message: (me is a.identity and signed.append(message))
                        or sign(me, message))
    with a.batch():
        versions = {f"k{i}": a.put(region, f"k{i}", {"n": i}) for i in range(5)}
    monkeypatch.undo()
    assert sum(m.startswith(BATCH_STATEMENT) for m in signed) == 1
    assert not [m for m in signed if m[:1] == b"\xa7" and cbor2.loads(m).get("k") == "diff"]  # (a payload: 7 fields)
    stored = [row[0] for row in a.store.db.execute("SELECT envelope FROM diffs ORDER BY seq").fetchall()]
    forms = [cbor2.loads(raw) for raw in stored]
    assert len(forms) == 5 and all(len(f) == 5 and f[2] == 5 for f in forms) and len({f[1] for f in forms}) == 1
    assert [decode(raw).msg_id for raw in stored] == [q.msg_id for q in a.store.unpublished()]
    assert [q.envelope for q in a.store.unpublished()] == stored
    a.start()
    for key, version in versions.items():
        assert b.wait_until(lambda k=key, v=version: same_head(b, region, k, v), TIMEOUT)
    assert a.wait_published(TIMEOUT) and not a.store.unpublished()


def test_tampered_input_is_rejected_counted_and_harmless(make_node, region, attacker):
    a, b = make_node(), make_node()
    v1 = a.put(region, "valve", {"open": False})
    assert b.wait_until(lambda: same_head(b, region, "valve", v1), TIMEOUT)
    topic = region_topic("diff", region)
    genuine = a.store.db.execute("SELECT envelope FROM diffs").fetchone()[0]
    payload, sig = cbor2.loads(genuine)

    def expect(reason, raw, on=topic):
        before = b.counters[f"rejected.{reason}"]
        attacker.send(on, raw)
        assert b.wait_until(lambda: b.counters[f"rejected.{reason}"] == before + 1, TIMEOUT), b.stats()

    # garbage bytes, and CBOR that is not an envelope
    expect("malformed", b"\x00\xffnot cbor at all")
    expect("malformed", cbor2.dumps({"open": True}))
    # a genuine payload with a forged signature, and a modified payload under the genuine one
    expect("bad-signature", cbor2.dumps([payload, bytes(64)]))
    m = cbor2.loads(payload)
    m["b"]["ops"] = [["set", ["open"], True]]
    expect("bad-signature", cbor2.dumps([canonical(m), sig]))
    # the genuine message again (replay), and moved to another region's topic
    expect("duplicate", genuine)
    expect("topic-mismatch", genuine, on=region_topic("diff", region + "/other"))
    # oversize, even if validly signed
    mallory = Identity.generate()
    big = encode(mallory, "diff", region, 1, 1, {"blob": b"x" * (b.config.max_message_bytes + 1)})
    expect("oversize", big.raw)
    # a validly signed diff whose claimed version hash does not follow from parent + ops
    parent = bytes.fromhex(v1)
    lie = encode(mallory, "diff", region, 2, 2, {"key": "valve", "parent": parent,
                                                 "version": diff.version_hash(region, "valve", parent, {"open": "lie"}),
                                                 "ops": [["set", ["open"], True]]})
    expect("wrong-hash", lie.raw)
    # an old sequence number from that sender, now that it has sent 2
    expect("duplicate", lie.raw)
    # a diff that does not apply to its parent
    bad = encode(mallory, "diff", region, 3, 3, {"key": "valve", "parent": parent,
                                                 "version": bytes(32), "ops": [["del", ["missing"]]]})
    expect("bad-diff", bad.raw)

    # b kept its data and keeps working
    assert b.get(region, "valve") == {"open": False}
    assert [fv.version for fv in b.history(region, "valve")] == [v1]
    v2 = a.put(region, "valve", {"open": True})
    assert b.wait_until(lambda: same_head(b, region, "valve", v2), TIMEOUT)
    assert b.counters["rejected.internal"] == 0


def test_diff_with_missing_parent_waits_then_applies(make_node, region, attacker):
    b = make_node()
    other = Identity.generate()
    v1_value, v2_value = {"n": 1}, {"n": 2}
    v1 = diff.version_hash(region, "k", None, v1_value)
    v2 = diff.version_hash(region, "k", v1, v2_value)
    first = encode(other, "diff", region, 1, 10, {"key": "k", "parent": None, "version": v1,
                                                  "ops": [["set", [], v1_value]]})
    second = encode(other, "diff", region, 2, 11, {"key": "k", "parent": v1, "version": v2,
                                                   "ops": [["set", ["n"], 2]]})
    topic = region_topic("diff", region)
    attacker.send(topic, second.raw)  # the child arrives first
    assert b.wait_until(lambda: b.counters["pending"] == 1, TIMEOUT)
    assert b.get(region, "k") is None and b.store.count_pending() == 1
    attacker.send(topic, first.raw)
    assert b.wait_until(lambda: same_head(b, region, "k", v2.hex()), TIMEOUT)
    assert b.get(region, "k") == v2_value
    assert b.store.count_pending() == 0


def test_acknowledgement_bookkeeping_empties_once_the_broker_has_everything(make_node, region):
    """Messages sent outside the outbox (digests, trace heads, fingerprints) are tracked
    like outbox ones: no acknowledgement is left over to match a later message once MQTT
    packet ids wrap (65,535), which would mark an unsent outbox entry as delivered."""
    a = make_node(sync_interval=0)
    for i in range(20):
        a.put(region, f"k{i}", {"i": i})
        a.sync_now()  # digest, trace head and fingerprint: acknowledged, never waited for
    assert a.wait_published(TIMEOUT) and not a.store.unpublished()
    assert a.transport.wait_acked(TIMEOUT)


def test_a_clock_far_ahead_is_rejected_and_does_not_drag_the_node_clock(make_node, region, attacker):
    b = make_node()
    other, skew = Identity.generate(), b.config.max_clock_skew
    topic = region_topic("diff", region)

    def signed_diff(seq: int, key: str, ahead_s: float):
        value = {"n": seq}
        version = diff.version_hash(region, key, None, value)
        hlc = pack(int((time.time() + ahead_s) * 1000), 0)
        return version, encode(other, "diff", region, seq, hlc, {"key": key, "parent": None, "version": version,
                                                                 "ops": [["set", [], value]]})

    far_version, far = signed_diff(1, "far", 10 * skew)
    near_version, near = signed_diff(2, "near", skew / 2)
    attacker.send(topic, far.raw)
    attacker.send(topic, near.raw)  # delivered after it: once this one is in, the first was handled
    assert b.wait_until(lambda: b.store.has_version(near_version), TIMEOUT)
    assert b.counters["rejected.clock-skew"] == 1 and not b.store.has_version(far_version)
    assert wall_ms(b.clock.now()) < (time.time() + skew) * 1000
    # the same check for envelopes a pull brings (they skip the live replay window)
    _, pulled = signed_diff(3, "pulled", 10 * skew)
    b.handle_many([decode(pulled.raw)])
    assert b.counters["rejected.clock-skew"] == 2 and b.head(region, "pulled") is None


def test_a_restarted_node_continues_its_sequence(make_node, region):
    from edgeswarm.node import Node
    from edgeswarm.shared.envelope import decode as open_envelope

    a, b = make_node("a"), make_node("b")
    v1 = a.put(region, "k", {"n": 1})
    assert b.wait_until(lambda: b.store.has_version(bytes.fromhex(v1)), TIMEOUT)
    last = a.store.meta("seq")
    a.stop()
    again = Node(a.config).start()
    try:
        v2 = again.put(region, "k", {"n": 2})
        raw = again.store.db.execute("SELECT envelope FROM diffs WHERE version = ?", [bytes.fromhex(v2)]).fetchone()[0]
        assert open_envelope(raw).seq > last
        assert b.wait_until(lambda: b.store.has_version(bytes.fromhex(v2)), TIMEOUT)
        assert b.counters["rejected.duplicate"] == 0 and b.counters["rejected.replay"] == 0
    finally:
        again.stop()


def test_a_live_change_is_handled_before_the_trace_copies_queued_ahead_of_it(offline_pair):
    """The inbox worker takes diffs and votes first, and what rounds bring (here a peer's
    trace entries, queued before the diff) once nothing live waits."""
    from edgeswarm.shared.topics import node_topic

    a, b = offline_pair
    rows = a.store.trace_range(a.node_id, 1, None)
    pushes = [(node_topic(a.node_id, "trace"), a.sign("trace", None, {"entries": [list(r) for r in rows[k:k + 2]]}).raw)
              for k in range(0, len(rows), 2)]
    a.put("plant/a", "live", {"now": True})
    diff_ = [i for i in a.store.unpublished() if "/diff/" in i.topic][-1]  # (oldest first)
    fetched_when_live: list[int] = []
    b.subscribe(lambda fv: fv.key == "live" and fetched_when_live.append(b.counters["trace.entries-fetched"]))
    for message in pushes + [(diff_.topic, diff_.envelope), None]:
        b._inbox.put(message)
    b._work()  # (here, in this thread: it returns at the None)
    assert fetched_when_live and set(fetched_when_live) == {0}  # (its head, then its consensus)
    assert b.counters["trace.entries-fetched"] == len(rows) and b.get("plant/a", "live") == {"now": True}
