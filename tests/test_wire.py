"""The wire format: identity, envelope, topics, diffs, clock."""

import hashlib
import os
import stat
import zlib

import cbor2
import pytest

from edgeswarm.shared import diff, packing, shortening
from edgeswarm.shared.clock import HybridClock, wall_ms
from edgeswarm.shared.envelope import (WINDOW, BadSignatureError, DuplicateError, MalformedError,
                                       OversizeError, ReplayError, TopicMismatchError,
                                       UnsupportedVersionError, accept_seq, canonical, decode, decode_many,
                                       decode_relay, encode, encode_batch, encode_relay, is_relay, rebatch)
from edgeswarm.shared.merkle import MAX_LEAVES
from edgeswarm.shared.identity import Identity, IdentityError, node_id_of
from edgeswarm.shared.topics import (TopicError, node_topic, parse_topic, region_filter, region_topic,
                                     validate_region)


@pytest.fixture
def me():
    return Identity.generate()


# -- identity ------------------------------------------------------------------------------

def test_key_file_is_private_and_round_trips(tmp_path):
    path = tmp_path / "node.key"
    ident = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identity.load(path)
    assert again.public_key == ident.public_key
    assert again.node_id == node_id_of(ident.public_key)
    assert len(ident.node_id) == 16 and ident.node_id.isalnum()


def test_key_file_refused_when_others_can_read_it(tmp_path):
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)


def test_key_file_never_overwritten_and_bad_seed_refused(tmp_path):
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    with pytest.raises(IdentityError, match="already exists"):
        Identity.generate().save(path)
    path.write_bytes(b"short")
    with pytest.raises(IdentityError, match="32-byte"):
        Identity.load(path)


# -- envelope ------------------------------------------------------------------------------

def test_a_batch_carries_many_messages_under_one_signature_and_each_travels_alone(me):
    topic = "es/v1/vote/plant/line1"
    for n in (2, 3, 7, 64, MAX_LEAVES):
        envs = [encode(me, "vote", "plant/line1", i + 1, 1000 + i, {"key": f"k{i}"}) for i in range(n)]
        got = decode_many(encode_batch(me, envs), topic=topic)
        assert [(e.seq, e.body, e.msg_id) for e in got] == [(e.seq, e.body, e.msg_id) for e in envs]
        for e in got:  # each payload with its path: a message on its own, checked alone
            alone = decode(e.raw, topic=topic)
            assert (alone.msg_id, alone.body, alone.sender) == (e.msg_id, e.body, me.public_key)
            assert decode_many(e.raw, topic=topic)[0].raw == e.raw
    with pytest.raises(ValueError):
        encode_batch(me, envs[:1])
    with pytest.raises(ValueError):
        encode_batch(Identity.generate(), envs[:2])


def test_a_tampered_batch_or_item_is_rejected(me):
    envs = [encode(me, "diff", "plant/line1", i + 1, 1000 + i, {"key": f"k{i}"}) for i in range(5)]
    payloads, sig = cbor2.loads(encode_batch(me, envs))
    other = encode(Identity.generate(), "diff", "plant/line1", 9, 9, {"key": "x"})
    with pytest.raises(BadSignatureError):  # a payload swapped for another of the signer's
        decode_many(cbor2.dumps([payloads[:4] + [encode(me, "diff", "plant/line1", 9, 9, {}).payload], sig]))
    with pytest.raises(BadSignatureError):  # one left out
        decode_many(cbor2.dumps([payloads[:4], sig]))
    with pytest.raises(MalformedError, match="one sender"):
        decode_many(cbor2.dumps([payloads[:4] + [other.payload], sig]))
    with pytest.raises(MalformedError, match="2 to"):
        decode_many(cbor2.dumps([payloads[:1], sig]))
    with pytest.raises(MalformedError, match="where one message"):
        decode(cbor2.dumps([payloads, sig]))
    with pytest.raises(TopicMismatchError):
        decode_many(cbor2.dumps([payloads, sig]), topic="es/v1/vote/plant/line1")
    item = cbor2.loads(decode_many(cbor2.dumps([payloads, sig]))[2].raw)
    assert item[2:4] == [5, 2]
    for bad, error in ((item[:3] + [3] + item[4:], (BadSignatureError, MalformedError)),  # another place
                       (item[:2] + [6] + item[3:], (BadSignatureError, MalformedError)),  # another size
                       (item[:4] + [item[4][:-1]], (BadSignatureError, MalformedError)),  # a hash left out
                       (item[:4] + [[bytes(32)] + item[4][1:]], BadSignatureError),
                       ([payloads[3]] + item[1:], BadSignatureError),  # a sibling's payload on this path
                       (item[:2] + [1] + item[3:], MalformedError),
                       (item[:4] + [["x"]], MalformedError)):
        with pytest.raises(error):
            decode(cbor2.dumps(bad))


def test_a_relay_passes_on_messages_under_their_own_signatures(me):
    topic, other = "es/v1/vote/plant/line1", Identity.generate()
    classic = encode(other, "vote", "plant/line1", 1, 1000, {"key": "a"})
    items = decode_many(encode_batch(me, [encode(me, "vote", "plant/line1", i + 1, 1000, {"key": f"k{i}"})
                                          for i in range(3)]), topic=topic)
    relay = encode_relay([classic.raw, *(e.raw for e in items)])
    assert is_relay(relay) and not is_relay(classic.raw) and not is_relay(encode_batch(me, list(items)))
    got = decode_many(relay, topic=topic)
    assert [(e.sender, e.msg_id, e.raw) for e in got] == [(e.sender, e.msg_id, e.raw) for e in [classic, *items]]
    with pytest.raises(MalformedError, match="not an envelope"):  # a relay is not one message
        decode(relay)
    with pytest.raises(TopicMismatchError):  # each is checked against the topic it arrives on
        decode_many(relay, topic="es/v1/vote/plant/line2")
    forged = cbor2.loads(classic.raw)
    forged[0] = encode(other, "vote", "plant/line1", 1, 1000, {"key": "b"}).payload
    with pytest.raises(BadSignatureError):  # one forged among honest ones spoils the message
        decode_many(encode_relay([items[0].raw, cbor2.dumps([forged[0], classic.raw[-64:]])]), topic=topic)
    for bad in ({"relay": []}, {"relay": [classic.raw], "x": 1}, {"relay": classic.raw}, {"relay": ["x"]},
                {"relay": [classic.raw] * (MAX_LEAVES + 1)}, {"other": [classic.raw]}):
        with pytest.raises(MalformedError):
            decode_many(cbor2.dumps(bad), topic=topic)
    with pytest.raises(OversizeError):
        decode_many(relay, max_bytes=len(relay) - 1, topic=topic)
    with pytest.raises(ValueError):
        encode_relay([])


def test_a_relay_puts_a_batch_back_together_when_all_of_it_goes(me):
    """An author passing on every vote of a batch sends the batch again (one signature, no
    paths); the reader opens it into the same item forms, checked once."""
    topic, other = "es/v1/vote/plant/line1", Identity.generate()
    batch = encode_batch(me, [encode(me, "vote", "plant/line1", i + 1, 1000, {"key": f"k{i}"}) for i in range(5)])
    items = decode_many(batch, topic=topic)
    part = decode_many(encode_batch(other, [encode(other, "vote", "plant/line1", i + 1, 1000, {"key": f"k{i}"})
                                            for i in range(3)]), topic=topic)[:2]  # (one of three missing)
    classic = encode(other, "vote", "plant/line1", 9, 1000, {"key": "a"})
    raws = [part[0].raw, items[3].raw, classic.raw, *(e.raw for e in items[:3]), items[4].raw, part[1].raw]
    again = rebatch(raws)
    assert again == [part[0].raw, batch, classic.raw, part[1].raw]
    assert rebatch([items[0].raw]) == [items[0].raw] and rebatch([]) == []
    assert rebatch(raws, max_bytes=len(batch) - 1) == raws  # (a batch too big for a relay stays in items)
    odd = cbor2.loads(items[1].raw)
    odd[0] = classic.payload  # (another sender's payload under the batch's signature and place)
    mixed = [items[0].raw, cbor2.dumps(odd), *(e.raw for e in items[2:])]
    assert rebatch(mixed) == mixed
    relay = encode_relay(again)
    assert len(relay) < len(encode_relay(raws)) - 4 * 64  # (the paths and the repeated signatures)
    got = decode_many(relay, topic=topic)
    assert sorted((e.msg_id, e.raw) for e in got) == sorted((e.msg_id, e.raw) for e in [*part, *items, classic])
    got, skipped = decode_relay(relay, topic=topic, skip=me.public_key)
    assert skipped == 5 and {e.sender for e in got} == {other.public_key}
    with pytest.raises(TopicMismatchError):  # (an own batch left unchecked is still on its topic)
        decode_relay(encode_relay([batch]), topic="es/v1/vote/plant/line2", skip=me.public_key)
    forged = cbor2.loads(batch)
    forged[0][2] = encode(me, "vote", "plant/line1", 3, 1000, {"key": "forged"}).payload
    with pytest.raises(BadSignatureError):  # a batch in a relay is checked as one coming alone
        decode_many(encode_relay([classic.raw, cbor2.dumps(forged)]), topic=topic)
    mixed = cbor2.loads(batch)
    mixed[0][1] = classic.payload
    with pytest.raises(MalformedError, match="one sender"):
        decode_relay(encode_relay([cbor2.dumps(mixed)]), topic=topic, skip=me.public_key)
    with pytest.raises(TopicMismatchError):
        decode_many(encode_relay([batch]), topic="es/v1/vote/plant/line2")


def test_own_votes_passed_on_go_under_one_new_signature_as_the_same_messages(me):
    """A node sending its own votes that would go one by one (classic, or items of a batch
    not all there) puts them under one batch signature of its own, after the rest: the
    same payloads, so a reader gets the very messages it would have got, checked once;
    others' messages and its own diffs stay as they came, and a single vote stays alone."""
    topic, other = "es/v1/vote/plant/line1", Identity.generate()
    mine = [encode(me, "vote", "plant/line1", i + 1, 1000, {"key": f"k{i}"}) for i in range(4)]
    items = decode_many(encode_batch(me, [encode(me, "vote", "plant/line1", 10 + i, 1000, {"key": f"b{i}"})
                                          for i in range(3)]), topic=topic)
    diff = encode(me, "diff", "plant/line1", 20, 1000, {"key": "d"})
    theirs = encode(other, "vote", "plant/line1", 1, 1000, {"key": "k0"})
    raws = [mine[0].raw, theirs.raw, items[0].raw, diff.raw, *(e.raw for e in mine[1:]), items[2].raw]
    out = rebatch(raws, own=me)
    assert out[:2] == [theirs.raw, diff.raw] and len(out) == 3
    got = decode_many(out[2], topic=topic)  # (checked against the one new signature)
    assert [e.payload for e in got] == [e.payload for e in (mine[0], items[0], *mine[1:], items[2])]
    assert len(out[2]) < sum(len(r) for r in raws if r not in (theirs.raw, diff.raw)) - 4 * 64
    assert rebatch(raws) == raws  # (without `own`: as they came)
    assert rebatch([mine[0].raw, theirs.raw], own=me) == [theirs.raw, mine[0].raw]
    chunks = rebatch([e.raw for e in mine], max_bytes=2 * len(mine[0].payload) + 90, own=me)
    assert [len(decode_many(c)) for c in chunks] == [2, 2]  # (each batch within the size given)


def test_a_relay_leaves_out_its_readers_own_messages_unchecked(me):
    """A node's own votes come back in the relays of their authors: neither opened as news
    nor paid for with a signature check; everyone else's are checked as ever."""
    topic, other = "es/v1/vote/plant/line1", Identity.generate()
    mine = [encode(me, "vote", "plant/line1", i + 1, 1000, {"key": f"k{i}"}) for i in range(2)]
    theirs = encode(other, "vote", "plant/line1", 1, 1000, {"key": "a"})
    spoilt = cbor2.loads(mine[1].raw)
    spoilt[1] = bytes(64)  # (what a check would refuse: proof that none was made)
    relay = encode_relay([mine[0].raw, theirs.raw, cbor2.dumps(spoilt)])
    got, skipped = decode_relay(relay, topic=topic, skip=me.public_key)
    assert [e.raw for e in got] == [theirs.raw] and skipped == 2
    with pytest.raises(BadSignatureError):
        decode_relay(relay, topic=topic)
    with pytest.raises(BadSignatureError):  # another's message is checked whoever reads it
        decode_relay(relay, topic=topic, skip=other.public_key)
    with pytest.raises(MalformedError):  # the shape is checked all the same
        decode_relay(encode_relay([mine[0].raw, b"\xa0"]), topic=topic, skip=me.public_key)


def test_envelope_round_trip(me):
    env = encode(me, "diff", "plant/line1", 7, 123456, {"a": [1, 2.5, "x", b"\x00", None, True]})
    got = decode(env.raw, topic="es/v1/diff/plant/line1")
    assert (got.kind, got.region, got.seq, got.hlc, got.body) == ("diff", "plant/line1", 7, 123456, env.body)
    assert got.sender_id == me.node_id
    assert got.msg_id == env.msg_id and len(got.msg_id) == 32


def test_payload_is_canonical_cbor(me):
    env = encode(me, "diff", "r", 1, 1, {"b": 1, "a": 2})
    payload, _ = cbor2.loads(env.raw)
    assert canonical(cbor2.loads(payload)) == payload


def _resign(me, payload_map):
    payload = cbor2.dumps(payload_map, canonical=True)
    return cbor2.dumps([payload, me.sign(payload)])


def test_tampered_payload_fails_signature(me):
    env = encode(me, "diff", "r", 1, 1, {"x": 1})
    payload, sig = cbor2.loads(env.raw)
    m = cbor2.loads(payload)
    m["b"] = {"x": 2}
    with pytest.raises(BadSignatureError):
        decode(cbor2.dumps([canonical(m), sig]))
    with pytest.raises(BadSignatureError):
        decode(cbor2.dumps([payload, bytes(64)]))


@pytest.mark.parametrize("data, error", [
    (b"", MalformedError),
    (b"\xff\xfe", MalformedError),
    (cbor2.dumps({"not": "an envelope"}), MalformedError),
    (cbor2.dumps([b"x", b"short-signature"]), MalformedError),
    (cbor2.dumps([cbor2.dumps([1, 2]), bytes(64)]), MalformedError),
    (b"\x81" * 5000, MalformedError),                       # nesting bomb
    (bytes.fromhex("d81c81d81d00"), MalformedError),         # self-referencing shared value
    (bytes.fromhex("c11a514b67b0"), MalformedError),         # tagged datetime
    (cbor2.dumps(2**70), MalformedError),                    # bignum
    (bytes.fromhex("a2616101616102"), MalformedError),       # duplicate map key
])
def test_garbage_is_a_typed_error(data, error):
    with pytest.raises(error):
        decode(data)


def test_wrong_field_types_and_versions(me):
    base = {"v": 1, "k": "diff", "r": "r", "s": me.public_key, "n": 1, "t": 1, "b": None}
    assert decode(_resign(me, base)).seq == 1
    for change in ({"n": 0}, {"n": "1"}, {"t": -1}, {"k": "nope"}, {"r": "a/+/b"}, {"r": 5},
                   {"s": b"x" * 31}, {"extra": 1}):
        with pytest.raises(MalformedError):
            decode(_resign(me, {**base, **change}))
    with pytest.raises(UnsupportedVersionError):
        decode(_resign(me, {**base, "v": 2}))


def test_size_limit(me):
    env = encode(me, "diff", "r", 1, 1, {"blob": b"x" * 5000})
    assert decode(env.raw, max_bytes=len(env.raw)).seq == 1
    with pytest.raises(OversizeError):
        decode(env.raw, max_bytes=len(env.raw) - 1)


def test_envelope_must_arrive_on_its_own_topic(me):
    env = encode(me, "diff", "plant/a", 1, 1, None)
    with pytest.raises(TopicMismatchError):
        decode(env.raw, topic="es/v1/diff/plant/b")
    with pytest.raises(TopicMismatchError):
        decode(env.raw, topic="es/v1/vote/plant/a")
    with pytest.raises(TopicMismatchError):
        decode(env.raw, topic="somewhere/else")


def test_replay_window():
    top, mask = accept_seq(0, 0, 1)
    top, mask = accept_seq(top, mask, 3)
    top, mask = accept_seq(top, mask, 2)  # reordered: accepted once
    with pytest.raises(DuplicateError):
        accept_seq(top, mask, 2)
    with pytest.raises(DuplicateError):
        accept_seq(top, mask, 3)
    top, mask = accept_seq(top, mask, 3 + WINDOW + 5)
    with pytest.raises(ReplayError):
        accept_seq(top, mask, 4)
    top2, _ = accept_seq(top, mask, top - 1)
    assert top2 == top


# -- topics --------------------------------------------------------------------------------

def test_topic_scheme():
    assert region_topic("diff", "plant/line1") == "es/v1/diff/plant/line1"
    assert region_filter("plant/line1") == "es/v1/+/plant/line1/#"
    assert node_topic("abc", "birth") == "es/v1/node/abc/birth"
    t = parse_topic("es/v1/diff/plant/line1/vision")
    assert (t.kind, t.region, t.node_id) == ("diff", "plant/line1/vision", None)
    t = parse_topic("es/v1/node/abc/birth")
    assert (t.kind, t.node_id) == ("birth", "abc")


@pytest.mark.parametrize("bad", ["", "a//b", "/a", "a/", "a/+/b", "a/#", "$SYS/x", "a\x00b",
                                 "x" * 65, "/".join("a" * 17), "é" * 200])
def test_bad_region_names(bad):
    with pytest.raises(TopicError):
        validate_region(bad)


# -- diffs ---------------------------------------------------------------------------------

def test_diff_round_trip_and_nested_paths():
    old = {"speed": 1, "limits": {"max": 3, "min": 0}, "tags": ["a"]}
    new = {"limits": {"max": 4, "min": 0}, "tags": ["a", "b"], "mode": {"auto": True}}
    ops = diff.make(old, new)
    assert diff.apply(old, ops) == new
    assert ["del", ["speed"]] in ops and ["set", ["limits", "max"], 4] in ops
    assert old["limits"]["max"] == 3  # input unchanged
    assert diff.make(new, new) == []


def test_diff_distinguishes_int_float_bool():
    assert diff.make({"a": 1}, {"a": True}) == [["set", ["a"], True]]
    assert diff.make({"a": 1}, {"a": 1.0}) == [["set", ["a"], 1.0]]


def test_diff_errors():
    with pytest.raises(diff.DiffError):
        diff.apply({"a": 1}, [["del", ["b"]]])
    with pytest.raises(diff.DiffError):
        diff.apply({"a": 1}, [["set", ["a", "b"], 1]])
    with pytest.raises(diff.DiffError):
        diff.apply({}, [["mv", ["a"]]])
    with pytest.raises(diff.DiffError):
        diff.apply({}, [["set", [], [1, 2]]])
    with pytest.raises(diff.DiffError):
        diff.apply({}, [])


def test_version_hash_binds_parent_frame_and_value():
    h = diff.version_hash("r", "k", None, {"a": 1})
    assert len(h) == 32
    assert h != diff.version_hash("r", "k", h, {"a": 1})
    assert h != diff.version_hash("r", "k2", None, {"a": 1})
    assert h != diff.version_hash("r", "k", None, {"a": 1.0})


@pytest.mark.parametrize("region, key, value", [("r", "k", {"a": 1}), ("plant/" + "x" * 300, "k" * 30, None),
                                                ("r", "ü" * 200, {"deep": [{"x": -1.5}], "b": b"\0" * 70})])
def test_a_version_hash_is_the_hash_of_the_canonical_array(region, key, value):
    """What every node computes and checks, old and new: BLAKE2b-256 of the canonical CBOR
    of [region, key, parent, value] (a node hashes the value's encoding it stores)."""
    for parent in (None, b"p" * 32):
        expected = hashlib.blake2b(canonical([region, key, parent, value]), digest_size=32).digest()
        assert diff.version_hash(region, key, parent, value) == expected
        assert diff.version_hash_of(region, key, parent, canonical(value)) == expected


# -- clock ---------------------------------------------------------------------------------

def test_hybrid_clock_is_monotonic_and_follows_remote():
    wall = [1000.0]
    clock = HybridClock(wall=lambda: wall[0])
    a = clock.now()
    wall[0] = 999.0  # wall clock stepped back
    b = clock.now()
    assert b > a and wall_ms(b) == 1_000_000
    clock.observe(b + 10_000_000)
    assert clock.now() > b + 10_000_000


def test_a_pack_carries_signed_messages_deflated_and_never_unfolds_beyond_its_limit(me):
    messages = [encode(me, "vote", "plant/line1", i + 1, 1000 + i, {"key": "k", "version": bytes(32), "round": i})
                .raw for i in range(200)]
    packed = packing.pack(messages)
    assert packing.unpack(packed, 1 << 20) == messages
    assert len(packed) < sum(map(len, messages)) / 2  # (what they share goes once)
    size = len(canonical(messages))
    assert packing.unpack(packed, size) == messages
    with pytest.raises(MalformedError, match="beyond"):
        packing.unpack(packed, size - 1)
    bomb = zlib.compress(canonical([bytes(10**6)]))  # ~1 KB that would inflate to 1 MB
    with pytest.raises(MalformedError, match="beyond"):
        packing.unpack(bomb, 256 * 1024)
    for bad in (b"", b"not deflate", packed[:-3], packed + b"x", "text", zlib.compress(canonical({"a": 1})),
                zlib.compress(canonical([b"x", 1])), zlib.compress(b"\xff")):
        with pytest.raises(MalformedError):
            packing.unpack(bad, 1 << 20)


def test_short_forms_restore_to_the_very_messages_signed_from_what_the_reader_holds(me):
    """Votes' versions and diffs' parents cut to 4 bytes (classic, batch and item forms) come
    back as the signed bytes from the versions a reader holds, or that diffs before them in
    the same response make; a name the reader cannot tell (none, or two) is no message, and
    a payload not encoded canonically is never cut."""
    region = "plant/line1"
    held = {k: [hashlib.blake2b(k.encode(), digest_size=32).digest()] for k in ("k0", "k1")}
    new = diff.version_hash(region, "k0", held["k0"][0], {"x": 1})

    def names() -> shortening.Names:
        return shortening.Names(lambda r, k, short: [v for v in held.get(k, []) if r == region and v[:4] == short])

    vote = encode(me, "vote", region, 1, 1000, {"key": "k1", "version": held["k1"][0], "round": 3})
    change = encode(me, "diff", region, 2, 1000, {"key": "k0", "parent": held["k0"][0], "version": new,
                                                  "ops": [["set", ["x"], 1]]})
    on_new = encode(me, "vote", region, 3, 1000, {"key": "k0", "version": new, "round": 4})
    batch = encode_batch(me, [change, on_new, vote])
    item = decode_many(batch)[2].raw
    for raw in (vote.raw, change.raw, batch, item):
        short = shortening.shorten(raw)
        assert len(short) <= len(raw) - 28 * (3 if raw is batch else 1)
        assert shortening.restore(short, names()) == raw
        assert [e.payload for e in decode_many(shortening.restore(short, names()))] == \
            [e.payload for e in decode_many(raw)]
    # a vote on a version a diff before it in the response makes
    got = names()
    assert shortening.restore(shortening.shorten(change.raw), got) == change.raw
    assert shortening.restore(shortening.shorten(on_new.raw), got) == on_new.raw
    assert shortening.restore(shortening.shorten(on_new.raw), names()) is None  # (alone: not held)
    # two versions of the frame with that name: none restored (full forms are asked for then)
    held["k1"].append(held["k1"][0][:4] + bytes(28))
    assert shortening.restore(shortening.shorten(vote.raw), names()) is None
    assert shortening.restore(shortening.shorten(vote.raw), shortening.Names(lambda *a: [])) is None
    # left as they are: other kinds, names of another length, a payload not encoded canonically
    for raw in (encode(me, "digest", None, 4, 1000, {"region": region, "hashes": b""}).raw,
                encode(me, "vote", region, 5, 1000, {"key": "k1", "version": b"\x01" * 31, "round": 1}).raw,
                cbor2.dumps([cbor2.dumps({"v": 1, "k": "vote", "r": region, "s": me.public_key, "n": 6, "t": 1000,
                                          "b": {"version": held["k1"][0], "key": "k1", "round": 1}}), bytes(64)]),
                encode_relay([vote.raw])):
        assert shortening.shorten(raw) == raw
    # what is no message at all is left for the envelope's checks to reject
    for bad in (b"", b"\xff", b"\xd8\x1c\x80", cbor2.dumps({"a": 1})):
        assert shortening.restore(bad, names()) == bad
