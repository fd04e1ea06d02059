"""Mutation fuzzing of the envelope decoder and a node's receive path.

    python bench/fuzz.py [--inputs 1000000] [--seed 1] [--batch 32] [--crashes DIR]
    python bench/fuzz.py --engine atheris [--inputs N]     (coverage-guided; pip install atheris)

A node with its own SQLite store, holding frames that two honest members (the node and a
peer) brought to consensus, is fed hostile messages through `Node.receive_many`, as its
inbox worker feeds it: the full receive path (decode, replay window, every kind's handler,
the store), without a broker in between. Each input is one of
  - a valid envelope of any kind with bytes flipped, set, inserted, deleted, duplicated,
    truncated, or spliced with another envelope;
  - a valid body with one part replaced by a hostile value (wrong type, integers at and
    beyond 64 bits, NaN, bytes of the wrong length, deep nesting, a long list...), a key
    dropped or added, or a part of another body spliced in, signed again by a hostile key
    so that it reaches the kind's handler;
  - an envelope whose CBOR is rewritten: non-minimal heads, declared lengths up to 2^64,
    indefinite-length items, tags (shared and string references among them), duplicate map
    keys, nesting 100,000 deep, signed again;
  - a fresh, well-formed message of a hostile key (new frames, votes, traces, births...),
    a replay of an honest one, or a message on a topic it does not belong to;
  - a batch of such messages under one signature, whole, with bytes changed, or one of its
    messages in its item form with its place, the batch's size or its path changed;
  - a relay of such messages, batches and honest ones (as an author passes votes on), on
    the region's vote topic or the node's vote inbox, whole or with bytes changed;
  - a sync response carrying the peer's honest messages again as a batch of its own.
A crash is an exception out of `receive_many` (decode may raise only EnvelopeError, which
the node counts) or an increase of rejected.internal (a handler failed). At the end the
consensus state of the honest frames must be what it was, the store must pass SQLite's
integrity check, and the node must still take an honest change to consensus. Prints
inputs/s, crashes, peak RSS; exits 1 on a crash or a changed store.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import hashlib
import logging
import math
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
from nacl.signing import SigningKey

from edgeswarm.node import Config, Node
from edgeswarm.node.trace import entry_hash
from edgeswarm.shared import diff, packing, shortening
from edgeswarm.shared.clock import MAX_TIMESTAMP, pack
from edgeswarm.shared.envelope import Envelope, canonical, encode_batch, encode_relay
from edgeswarm.shared.merkle import root_and_paths
from edgeswarm.shared.identity import Identity
from edgeswarm.shared.topics import node_topic, region_topic

REGION = "plant/line1"
HONEST_KEYS = ("conveyor", "oven", "camera")
FIELDS = ("key", "parent", "version", "ops", "merge", "round", "region", "hashes", "counts", "nodes", "frames",
          "items", "want", "deeper", "horizons", "envelopes", "last", "digest", "cut", "follow", "hello", "answer",
          "welcome", "own", "ask", "asks", "direct", "salt", "short", "deflated",
          "pulling", "seq", "hash", "from", "to", "entries", "session", "regions", "software", "v", "k", "r",
          "s", "n", "t", "b")
KINDS = ("diff", "vote", "digest", "sync-req", "sync-resp", "trace", "trace-head", "trace-req", "trace-resp",
         "birth", "death", "fingerprint", "revoke", "snapshot")
INTS = (0, 1, -1, 2, 15, 16, 23, 24, 255, 256, 65535, 65536, 2**31 - 1, 2**32 - 1, 2**32, 2**53, 2**60,
        2**62 - 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**63) - 1, -(2**64), 2**64, 2**100, -(2**100))
TEXTS = ("", "a", "\x00", "/", "+", "#", "$", "es/v1", "plant", "plant/line1", "plant/line1/", "plant//line1",
         "plant/line1/x", "a" * 65, "x" * 300, "ü" * 200, "\ud7ff", "set", "del", "conveyor")
TAGS = (0, 1, 2, 3, 4, 5, 21, 24, 25, 28, 29, 30, 32, 35, 36, 37, 52, 54, 100, 256, 258, 259, 260, 261, 1004,
        55799, 2**16, 2**32, 2**64 - 1)
# Raw items no honest encoder writes; the two large ones check that memory stays bounded.
HOSTILE_RAW = (
    b"\x5b" + (2**60).to_bytes(8, "big") + b"ab",  # a byte string that says it holds 2^60 bytes
    b"\x7b\xff\xff\xff\xff\xff\xff\xff\xff",  # text of 2^64 - 1 bytes
    b"\x9b" + (2**60).to_bytes(8, "big") + b"\x00",  # an array of 2^60 items
    b"\xbb" + (2**60).to_bytes(8, "big") + b"\x61a\x00",
    b"\x81" * 100_000 + b"\x00",  # nesting 100,000 deep
    b"\x9f" * 100_000,
    b"\xa1\x61a" * 50_000 + b"\x00",
    b"\xd8\x1c" * 1000 + b"\x00",
    b"\x5f" + b"\x41\x00" * 20_000 + b"\xff",  # 20,000 one-byte chunks
    b"\x9f" + b"\x00" * 100_000 + b"\xff",
    b"\xf9\x7e\x00", b"\xfa\x7f\xc0\x00\x01", b"\xfb\x7f\xf0\x00\x00\x00\x00\x00\x01", b"\xf9\x7c\x00",
    b"\xf7", b"\xf8\x20", b"\xf8\x00", b"\xf0", b"\xff", b"\x1c", b"\x3d", b"\x5e", b"\x9c", b"\xfe",
    b"\x18\x00", b"\x19\x00\x01", b"\x1b\x00\x00\x00\x00\x00\x00\x00\x01", b"\x3b\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x62\xc3\x28", b"\x61\xff", b"\xc2\x49\x01" + b"\x00" * 8, b"\xd8\x1c\x81\xd8\x1d\x00",
    b"\xd9\x01\x00\x82\x63abc\xd8\x19\x00",
)


def _shared_graph(depth: int) -> bytes:
    """Shared references (tags 28, 29) making 2^depth paths out of about 4 * depth bytes."""
    data = b"\xd8\x1c\x81\x00"
    for i in range(1, depth):
        data = b"\xd8\x1c\x82" + data + b"\xd8\x1d" + cbor2.dumps(depth - i)
    return data


def _string_refs(size: int, count: int) -> bytes:
    """String references (tags 256, 25): `count` copies of one `size`-byte text."""
    return cbor2.dumps(cbor2.CBORTag(256, ["x" * size] + [cbor2.CBORTag(25, 0)] * count))


HOSTILE_RAW += (_shared_graph(30), _string_refs(20_000, 2_000))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _identity(rng: random.Random) -> Identity:
    return Identity(SigningKey(rng.randbytes(32)))


# -- raw CBOR ----------------------------------------------------------------------------

def head(major: int, n: int, width: int | None = None) -> bytes:
    """A CBOR head carrying `n` in `width` argument bytes (None: the shortest)."""
    if width is None:
        width = 0 if n < 24 else 1 if n < 2**8 else 2 if n < 2**16 else 4 if n < 2**32 else 8
    if width == 0:
        return bytes([major << 5 | n % 24])
    return bytes([major << 5 | {1: 24, 2: 25, 4: 26, 8: 27}[width]]) + (n % 2 ** (8 * width)).to_bytes(width, "big")


@dataclass(frozen=True)
class Item:
    start: int
    body: int  # where the head ends
    end: int
    major: int
    n: int  # the head's argument: a length, a count, a value


WALK_DEPTH = 256  # nesting that items() walks; deeper (what a mutation may build) is ValueError


def items(data: bytes) -> list[Item]:
    """Every item of well-formed definite-length CBOR (as the corpus is), outermost first;
    ValueError for CBOR nested deeper than WALK_DEPTH (IndexError when cut short)."""
    out: list[Item] = []

    def one(i: int, depth: int = 0) -> int:
        if depth > WALK_DEPTH:
            raise ValueError(f"CBOR nested deeper than {WALK_DEPTH} levels")
        start, ib = i, data[i]
        major, ai = ib >> 5, ib & 31
        i += 1
        if ai < 24:
            n = ai
        else:
            width = 1 << (ai - 24)
            n = int.from_bytes(data[i:i + width], "big")
            i += width
        slot = len(out)
        out.append(Item(0, 0, 0, 0, 0))
        if major in (2, 3):
            end = i + n
        elif major in (4, 5):
            end = i
            for _ in range(n * (major - 3)):
                end = one(end, depth + 1)
        elif major == 6:
            end = one(i, depth + 1)
        else:
            end = i
        out[slot] = Item(start, i, end, major, n)
        return end

    one(0)
    return out


def mutate_cbor(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One structural change to well-formed CBOR; the result is usually still decodable."""
    it = rng.choice(items(data))
    before, item, after = data[:it.start], data[it.start:it.end], data[it.end:]
    rest = data[it.body:it.end]
    choice = rng.randrange(9)
    if choice == 0:  # the same value, a wider head
        return before + head(it.major, it.n, rng.choice((1, 2, 4, 8))) + rest + after, "cbor-wide-head"
    if choice == 1 and it.major in (2, 3, 4, 5):  # a wrong declared length or count
        n = rng.choice((it.n + 1, max(it.n - 1, 0), 2**31, 2**32 - 1, 2**60, 2**64 - 1))
        return before + head(it.major, n) + rest + after, "cbor-length"
    if choice == 2 and it.major in (2, 3):  # an indefinite-length string of chunks
        cut = rng.randint(0, it.n)
        s = data[it.body:it.end]
        return (before + bytes([it.major << 5 | 31]) + head(it.major, cut) + s[:cut]
                + head(it.major, it.n - cut) + s[cut:] + b"\xff" + after), "cbor-indefinite-string"
    if choice == 3 and it.major in (4, 5):  # an indefinite-length container
        return before + bytes([it.major << 5 | 31]) + rest + b"\xff" + after, "cbor-indefinite"
    if choice == 4:
        return before + head(6, rng.choice(TAGS)) + item + after, "cbor-tag"
    if choice == 5 and it.major == 5 and it.n:  # a duplicate key
        first = items(item)[1:3]
        pair = item[first[0].start:first[1].end]
        return before + head(5, it.n + 1) + pair + rest + after, "cbor-duplicate-key"
    if choice == 6:
        return before + rng.choice(HOSTILE_RAW) + after, "cbor-hostile-item"
    if choice == 7:  # an item in place of another of the message
        other = rng.choice(items(data))
        return before + data[other.start:other.end] + after, "cbor-swap"
    return before + after, "cbor-drop"


def mutate_bytes(rng: random.Random, data: bytes, other: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    choice = rng.randrange(8)
    if choice == 0 or not b:
        for _ in range(rng.choice((1, 1, 1, 2, 4, 16))):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b), "bit-flip"
    i = rng.randrange(len(b))
    if choice == 1:
        b[i] = rng.choice((0x00, 0x01, 0x17, 0x18, 0x1b, 0x1f, 0x40, 0x5f, 0x7f, 0x80, 0x9f, 0xa0, 0xbf, 0xc0,
                           0xd8, 0xf4, 0xf6, 0xf7, 0xf9, 0xfb, 0xff))
        return bytes(b), "byte-set"
    if choice == 2:
        b[i:i] = rng.randbytes(rng.choice((1, 2, 8, 64)))
        return bytes(b), "insert"
    if choice == 3:
        del b[i:i + rng.choice((1, 2, 8, 64))]
        return bytes(b), "delete"
    if choice == 4:
        j = min(len(b), i + rng.choice((1, 8, 64)))
        b[j:j] = b[i:j] * rng.choice((1, 2, 16))
        return bytes(b), "duplicate"
    if choice == 5:
        return bytes(b[:i]), "truncate"
    if choice == 6:
        j = rng.randrange(len(other) + 1)
        return bytes(b[:i]) + other[j:], "splice"
    return rng.randbytes(rng.choice((0, 1, 2, 9, 100, 1000))), "random"


# -- plain values ------------------------------------------------------------------------

def hostile_value(rng: random.Random, region: str = REGION) -> Any:
    choice = rng.randrange(14)
    if choice < 3:
        return rng.choice(INTS) + rng.choice((0, 0, 1, -1))
    if choice == 3:
        return rng.choice((math.nan, math.inf, -math.inf, -0.0, 0.0, 1.5, 1e308, 5e-324, 1.0))
    if choice == 4:
        return rng.choice(TEXTS) if rng.random() < 0.7 else rng.choice((region, f"{region}/{rng.randrange(10**6)}"))
    if choice == 5:
        return rng.randbytes(rng.choice((0, 1, 4, 8, 31, 32, 33, 64, 128, 1000)))
    if choice == 6:
        return rng.choice((None, True, False))
    if choice == 7:  # nesting up to the decoder's limit and beyond
        v: Any = rng.choice((0, "a", b""))
        for _ in range(rng.choice((2, 28, 30, 31, 32, 33, 40))):
            v = [v] if rng.random() < 0.5 else {"a": v}
        return v
    if choice == 8:
        return [rng.choice(INTS[:12])] * rng.choice((2, 16, 65, 1000, 5000))
    if choice == 9:
        return {rng.choice(FIELDS): hostile_value(rng, region) for _ in range(rng.randrange(4))}
    if choice == 10:
        return [hostile_value(rng, region) for _ in range(rng.randrange(4))]
    if choice == 11:
        return cbor2.CBORTag(rng.choice(TAGS), rng.choice((0, b"\x01" * 9, "x", [1, 2])))
    if choice == 12:
        return rng.choice((cbor2.undefined, cbor2.CBORSimpleValue(99), {1: 2}, {b"k": 1}, frozenset({1})))
    return [rng.choice(("set", "del")), [rng.choice(TEXTS) for _ in range(rng.randrange(40))],
            hostile_value(rng, region)]


def _nodes(value: Any, path: tuple = (), out: list | None = None) -> list[tuple]:
    out = [] if out is None else out
    out.append(path)
    if len(out) < 400:
        if type(value) is dict:
            for k, v in value.items():
                _nodes(v, path + (k,), out)
        elif type(value) is list:
            for i, v in enumerate(value[:50]):
                _nodes(v, path + (i,), out)
    return out


def _at(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


def mutate_value(rng: random.Random, value: Any, donor: Any, region: str = REGION) -> tuple[Any, str]:
    """One change at a random place of a body (a copy)."""
    value = copy.deepcopy(value)
    path = rng.choice(_nodes(value))
    node = _at(value, path)

    def put(new: Any) -> Any:
        if not path:
            return new
        _at(value, path[:-1])[path[-1]] = new
        return value

    choice = rng.randrange(8)
    if choice == 0 and type(node) is dict and node:
        del node[rng.choice(list(node))]
        return value, "drop-key"
    if choice == 1 and type(node) is dict:
        node[rng.choice(FIELDS)] = hostile_value(rng, region)
        return value, "add-key"
    if choice == 2 and type(node) is list and node:
        if rng.random() < 0.5:
            del node[rng.randrange(len(node))]
        else:
            node.extend(node[:rng.randrange(1, len(node) + 1)] * rng.choice((1, 4)))
        return value, "list-length"
    if choice == 3 and type(node) is int:
        return put(rng.choice((node + 1, node - 1, -node, node * 2**32, 0, 2**63 - 1, 2**64 - 1, 2**64))), "int"
    if choice == 4 and type(node) is bytes:
        b = bytearray(node)
        if b and rng.random() < 0.5:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        else:
            b = b[:-1] if b and rng.random() < 0.5 else b + b"\x00"
        return put(bytes(b)), "bytes"
    if choice == 5:
        parts = _nodes(donor)
        return put(copy.deepcopy(_at(donor, rng.choice(parts)))), "splice-body"
    if choice == 6:
        return put(rng.choice(([node], {"a": node}, str(node)[:50], repr(node).encode()[:50]))), "retype"
    return put(hostile_value(rng, region)), "hostile-value"


# -- the target --------------------------------------------------------------------------

@dataclass
class Sender:
    identity: Identity
    seq: int = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


def sign_raw(sender: Sender, kind: Any, region: Any, body: Any, seq: int | None = None,
             hlc: int | None = None, payload_hook: Callable[[bytes], bytes] | None = None) -> bytes:
    """An envelope signed by `sender` without any of encode's checks (so any body)."""
    payload = cbor2.dumps({"v": 1, "k": kind, "r": region, "s": sender.identity.public_key,
                           "n": sender.next_seq() if seq is None else seq,
                           "t": pack(int(time.time() * 1000), 0) if hlc is None else hlc, "b": body},
                          canonical=True)
    if payload_hook is not None:
        payload = payload_hook(payload)
    return cbor2.dumps([payload, sender.identity.sign(payload)])


@dataclass
class Template:
    kind: str
    region: str | None
    body: Any
    topic: Callable[[Sender], str]
    sender: Sender | None = None  # the one whose own trace the body holds


@dataclass
class Stats:
    inputs: int = 0
    crashes: int = 0
    internal: int = 0
    slow: int = 0  # batches that took longer than `slow` seconds
    elapsed: float = 0.0
    store_ok: bool = False
    how: dict[str, int] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)


class Target:
    """A node holding frames two honest members (the node and `peer`) brought to
    consensus, and what hostile messages are made from: templates of every kind, honest
    envelopes to replay."""

    def __init__(self, node: Node, peer: Identity, region: str, rng: random.Random) -> None:
        self.node, self.region, self.rng = node, region, rng
        self.me = node.identity
        self.peer = Sender(peer)
        self.senders = [Sender(_identity(rng)) for _ in range(16)]
        self.honest: list[tuple[str, bytes]] = []
        self._honest_frames()
        self.before = self.state()
        self.templates = self._templates()
        self.raws = [sign_raw(rng.choice(self.senders), t.kind, t.region, t.body) for t in self.templates]

    @classmethod
    def offline(cls, home: Path, seed: int) -> Target:
        """A node on its own (never started: nothing goes out), clock skew unchecked so that
        every timestamp reaches the handlers."""
        rng = random.Random(seed)
        me, peer = _identity(rng), _identity(rng)
        config = Config(home=home, regions=[REGION], members=[me.node_id, peer.node_id], sync_interval=0,
                        max_clock_skew=0)
        return cls(Node(config, identity=me), peer, REGION, rng)

    def close(self) -> None:
        self.node.sync.stop()
        self.node.store.close()

    def peer_send(self, kind: str, body: dict) -> None:
        raw = sign_raw(self.peer, kind, self.region, body)
        self.honest.append((region_topic(kind, self.region), raw))
        self.node.receive_many([self.honest[-1]])

    def peer_write(self, key: str, old: dict | None, new: dict) -> bytes:
        parent = self.node.store.frame(self.region, key).head
        version = diff.version_hash(self.region, key, parent, new)
        self.peer_send("diff", {"key": key, "parent": parent, "version": version, "ops": diff.make(old, new)})
        return version

    def _honest_frames(self) -> None:
        node, region = self.node, self.region
        node.put(region, "conveyor", {"speed": 1.5, "limits": {"max": 2.0, "min": 0.1}, "tags": ["a", "b"]})
        node.put(region, "oven", {"temp": 180, "on": True})
        node.patch(region, "oven", set={"temp": 185})
        self.peer_write("camera", None, {"fps": 30, "roi": {"x": 0, "y": 0, "w": 640, "h": 480}})
        self.peer_write("conveyor", node.get(region, "conveyor"), {**node.get(region, "conveyor"), "speed": 1.2})
        for key in HONEST_KEYS:
            self.peer_send("vote", {"key": key, "version": node.store.frame(region, key).head, "round": 1})
        for key in HONEST_KEYS:
            status = node.status(region, key)
            assert status["consensus"] == status["head"] is not None, f"{key}: no honest consensus to guard"

    def state(self) -> list:
        """What hostile input must never change: the honest frames' heads, consensus and values."""
        heads = {(r, k): (h, c) for r, k, h, c in self.node.store.frame_heads()}
        return [(key, heads.get((self.region, key)), canonical(self.node.get(self.region, key, consensus=True)))
                for key in HONEST_KEYS]

    def alive(self) -> bool:
        """The node still takes an honest change of the peer to consensus."""
        old = self.node.get(self.region, "camera")
        version = self.peer_write("camera", old, {**old, "fps": old["fps"] + 1})
        round_ = self.node.store.frame(self.region, "camera").round + 1
        self.peer_send("vote", {"key": "camera", "version": version, "round": round_})
        status = self.node.status(self.region, "camera")
        return status["consensus"] == status["head"] == version.hex()

    def _templates(self) -> list[Template]:
        node, rng, region = self.node, self.rng, self.region
        me = self.me.node_id
        heads = [node.store.frame(region, k).head for k in HONEST_KEYS]
        value = {"a": 1, "b": {"c": [1, 2, 3]}}
        new_version = diff.version_hash(region, "new", None, value)
        sub = f"{region}/cell{rng.randrange(10)}"
        tree = node.sync.tree(region)
        digest = node.sync.digest(region, tree)
        hashes = digest["hashes"]

        def on_region(kind: str, r: str = region) -> Callable[[Sender], str]:
            return lambda s: region_topic(kind, r)

        def to_me(kind: str) -> Callable[[Sender], str]:
            return lambda s: node_topic(me, kind)

        def own(kind: str) -> Callable[[Sender], str]:
            return lambda s: node_topic(s.identity.node_id, kind)

        trace_sender = Sender(_identity(rng))
        entries, prev = [], None
        for seq in range(1, 4):
            raw = canonical([seq, prev, pack(int(time.time() * 1000), seq), "wrote",
                             {"region": region, "key": "new", "version": new_version}])
            entries.append([raw, trace_sender.identity.sign(raw)])
            prev = entry_hash(raw)
        pos = [p for p in tree.pos][:4]
        return [
            Template("diff", region, {"key": "new", "parent": None, "version": new_version,
                                      "ops": [["set", [], value]]}, on_region("diff")),
            Template("diff", region, {"key": "conveyor", "parent": heads[0], "version": rng.randbytes(32),
                                      "ops": [["set", ["speed"], 9], ["del", ["tags"]]]}, on_region("diff")),
            Template("diff", sub, {"key": "oven", "parent": rng.randbytes(32), "version": rng.randbytes(32),
                                   "ops": [["set", ["a", "b"], 1]], "merge": heads[:2]}, on_region("diff", sub)),
            Template("vote", region, {"key": "conveyor", "version": heads[0], "round": 7}, on_region("vote")),
            Template("vote", region, {"key": "oven", "version": rng.randbytes(32), "round": 1,
                                      "merge": heads[1:]}, on_region("vote")),
            Template("vote", region, {"key": "conveyor", "version": heads[0], "round": 8}, to_me("vote")),
            Template("digest", region, digest | {"hello": True}, on_region("digest")),
            Template("digest", None, {"region": sub, "hashes": rng.randbytes(128), "counts": [[1, 2]] * 16,
                                      "answer": True, "pulling": hashes}, to_me("digest")),
            Template("sync-req", None, {"region": region, "nodes": [[0, 0, rng.randbytes(128)]],
                                        "frames": [[1, pos[0] >> 56 if pos else 0, [[p, 5] for p in pos]]],
                                        "items": [[p, b"\x00\x01\x02\x03", b"\x00" * 8] for p in pos]},
                     to_me("sync-req")),
            Template("sync-req", None, {"region": region, "items": [[p, b"\x00\x01\x02\x03", b"\x00" * 8, [3, 2, 2**62]]
                                                                  for p in pos]}, to_me("sync-req")),
            Template("sync-req", None, {"region": region, "follow": True}, to_me("sync-req")),
            Template("sync-req", None, {"region": region, "nodes": [[0, 0, rng.randbytes(64)]], "salt": rng.randbytes(8),
                                        "frames": [[1, pos[0] >> 56 if pos else 0, [[p, 5] for p in pos]]],
                                        "short": True, "batches": True}, to_me("sync-req")),
            Template("sync-req", None, {"region": region, "deflated": packing.deflate(
                {"salt": rng.randbytes(8), "items": [[p, b"\x00\x01\x02\x03", b"\x00" * 8] for p in pos],
                 "nodes": [[0, 0, rng.randbytes(64)]], "asks": True})}, to_me("sync-req")),
            Template("sync-resp", None, {"region": region, "deflated": packing.deflate(
                {"nodes": [[1, 3, rng.randbytes(64)]], "frames": [], "want": pos})}, to_me("sync-resp")),
            Template("sync-req", None, {"region": region, "own": [[p, 3, 5] for p in pos], "asks": True},
                     to_me("sync-req")),
            Template("sync-req", None, {"region": region, "items": [[p, b"\x00\x01\x02\x03", b"\x00" * 8] for p in pos],
                                        "asks": True, "direct": ["abcdefghijklmnop"]}, to_me("sync-req")),
            Template("sync-resp", None, {"region": region, "own": True,
                                         "envelopes": [raw for _, raw in self.honest[:2]]}, to_me("sync-resp")),
            Template("sync-resp", None, {"region": region, "envelopes": [raw for _, raw in self.honest[:3]],
                                         "digest": digest, "last": True, "cut": True}, to_me("sync-resp")),
            Template("sync-resp", None, {"region": region, "envelopes": [self._honest_batch(), self.honest[0][1]],
                                         "last": True}, to_me("sync-resp")),
            Template("sync-resp", None, {"region": region, "envelopes": [shortening.shorten(self._honest_batch())]
                                         + [shortening.shorten(raw) for _, raw in self.honest[:3]]},
                     to_me("sync-resp")),
            Template("sync-resp", None, {"region": region, "nodes": [[1, 3, hashes]], "frames": [],
                                         "want": pos, "ask": {"abcdefghijklmnop": [[p, 1, 2] for p in pos]}}, to_me("sync-resp")),
            Template("sync-resp", None, {"region": region, "nodes": [], "frames": [], "want": [],
                                         "deeper": pos, "horizons": True}, to_me("sync-resp")),
            Template("trace-head", None, {"seq": 3, "hash": prev}, own("trace-head"), trace_sender),
            Template("trace-req", None, {"from": 1, "to": 500}, to_me("trace-req")),
            Template("trace-resp", None, {"entries": entries}, to_me("trace-resp"), trace_sender),
            Template("trace", None, {"entries": entries}, own("trace"), trace_sender),
            Template("birth", None, {"session": 3, "regions": [region], "software": "edgeswarm 0.1.0"}, own("birth")),
            Template("death", None, {"session": 3}, own("death")),
            Template("fingerprint", None, {"session": 3, "frames": 3, "shadows": 0, "forks": 0, "pending": 0,
                                           "rejected": 0, "agreement": 1.0, "flagged": 0}, own("fingerprint")),
            Template("revoke", region, {"node": me}, on_region("revoke")),
        ]

    # -- inputs --------------------------------------------------------------------------

    def inputs(self, rng: random.Random | None = None) -> Iterator[tuple[str, bytes, str]]:
        """(topic, payload, how it was made), endlessly."""
        rng = rng or self.rng
        while True:
            t = rng.choice(self.templates)
            sender = self.senders[rng.randrange(len(self.senders))]
            if rng.random() < 0.02:  # a key never seen before
                sender = self.senders[rng.randrange(len(self.senders))] = Sender(_identity(rng))
            sender = t.sender or sender
            topic = t.topic(sender)
            roll = rng.random()
            if rng.random() < 0.06:
                yield self._batch(rng, sender, t, topic)
            elif rng.random() < 0.04:
                yield self._relay(rng, sender, t)
            elif roll < 0.30:
                i = rng.randrange(len(self.raws))
                data, how = mutate_bytes(rng, self.raws[i], rng.choice(self.raws))
                yield self.templates[i].topic(sender), data, how
            elif roll < 0.65:
                body, how = mutate_value(rng, t.body, rng.choice(self.templates).body, self.region)
                yield topic, self._sign(rng, sender, t, body), how
            elif roll < 0.80:
                yield topic, self._sign(rng, sender, t, t.body, hook=lambda p: mutate_cbor(rng, p)[0]), "cbor"
            elif roll < 0.92:
                yield topic, self._sign(rng, sender, t, t.body), f"fresh-{t.kind}"
            elif roll < 0.96:
                topic, raw = rng.choice(self.honest)
                yield rng.choice((topic, region_topic("vote", self.region), node_topic(self.me.node_id, "diff"))), \
                    raw, "replay"
            else:
                yield topic, self._sign(rng, sender, t, t.body, envelope_hook=True), "envelope-fields"

    def _batch(self, rng: random.Random, sender: Sender, t: Template, topic: str) -> tuple[str, bytes, str]:
        """A batch of 2 to 8 messages of one sender and kind (bodies mutated now and then),
        as sent, with bytes changed, or one of them in its item form, intact or altered."""
        envs = []
        for _ in range(rng.randint(2, 8)):
            body = mutate_value(rng, t.body, rng.choice(self.templates).body, self.region)[0] \
                if rng.random() < 0.3 else t.body
            seq = rng.randrange(1, 2**20)  # (drawn, not the sender's next: the bytes depend on the draws alone)
            try:
                payload = cbor2.loads(sign_raw(sender, t.kind, t.region, body, seq))[0]
            except (cbor2.CBOREncodeError, TypeError, ValueError, OverflowError):
                payload = cbor2.loads(sign_raw(sender, t.kind, t.region, t.body, seq))[0]
            envs.append(Envelope(t.kind, t.region, sender.identity.public_key, 0, 0, None, b"", payload))
        raw = encode_batch(sender.identity, envs)
        roll = rng.random()
        if roll < 0.4:
            return topic, raw, "batch"
        if roll < 0.7:
            return topic, mutate_bytes(rng, raw, rng.choice(self.raws))[0], "batch-bytes"
        n, i = len(envs), rng.randrange(len(envs))
        _, paths = root_and_paths([e.msg_id for e in envs])
        item = [envs[i].payload, cbor2.loads(raw)[1], n, i, paths[i]]
        if roll >= 0.8:
            part = rng.randrange(3)
            if part == 0:
                item[3] = rng.choice((i + 1, i - 1, n, -1, 2**64, "0"))
            elif part == 1:
                item[2] = rng.choice((n + 1, n - 1, 1, 0, 1025, 2**63))
            else:
                item[4] = rng.choice((paths[i][:-1], paths[i] + [bytes(32)], [rng.randbytes(32)] * len(paths[i]),
                                      [b"x"], [None], list(range(20))))
        return topic, cbor2.dumps(item), "batch-item"

    def _honest_batch(self) -> bytes:
        """The peer's first honest messages again, as one batch under a signature of its own
        (as a pull brings a batch the puller lacks all of)."""
        envs = [Envelope(kind, self.region, self.peer.identity.public_key, 0, 0, None, b"", cbor2.loads(raw)[0])
                for kind, raw in ((topic.split("/")[2], raw) for topic, raw in self.honest[:3])]
        return encode_batch(self.peer.identity, envs)

    def _relay(self, rng: random.Random, sender: Sender, t: Template) -> tuple[str, bytes, str]:
        """A relay of 1 to 6 messages (honest ones, fresh ones of the template's kind, others
        of any kind) on the region's vote topic or this node's vote inbox, as sent or with
        bytes changed."""
        raws = []
        for _ in range(rng.randint(1, 6)):
            roll = rng.random()
            if roll < 0.3:
                raws.append(rng.choice(self.honest)[1])
            elif roll < 0.8:  # (a drawn seq, as in _batch)
                raws.append(sign_raw(sender, t.kind, t.region, t.body, rng.randrange(1, 2**20)))
            elif roll < 0.9:  # (a batch, whole as an author puts one back together, altered, or an item)
                raws.append(self._batch(rng, sender, t, "")[1])
            else:
                raws.append(rng.choice(self.raws))
        topic = rng.choice((region_topic("vote", self.region), node_topic(self.me.node_id, "vote")))
        data = encode_relay(raws)
        if rng.random() < 0.3:
            return topic, mutate_bytes(rng, data, rng.choice(self.raws))[0], "relay-bytes"
        return topic, data, "relay"

    def _sign(self, rng: random.Random, sender: Sender, t: Template, body: Any, hook: Callable | None = None,
              envelope_hook: bool = False) -> bytes:
        kind, region, seq, hlc = t.kind, t.region, None, None
        if envelope_hook:  # the envelope's own fields
            field_ = rng.choice("vkrsnt")
            bad = hostile_value(rng, self.region)
            if field_ == "k":
                kind = bad if rng.random() < 0.5 else rng.choice(KINDS)
            elif field_ == "r":
                region = bad if rng.random() < 0.5 else rng.choice(TEXTS)
            elif field_ == "n":
                seq = bad if rng.random() < 0.5 else rng.choice(INTS)
            elif field_ == "t":
                hlc = bad if rng.random() < 0.5 else rng.choice((0, MAX_TIMESTAMP, MAX_TIMESTAMP + 1, 2**63, 2**64 - 1))
            else:  # "v", or "s": another value in place of the version or the sender key
                old = b"av\x01" if field_ == "v" else b"as\x58\x20" + sender.identity.public_key

                def hook(payload: bytes) -> bytes:
                    return payload.replace(old, old[:2] + canonical(bad), 1)
        try:
            return sign_raw(sender, kind, region, body, seq, hlc, hook)
        except (cbor2.CBOREncodeError, TypeError, ValueError, OverflowError):
            return sign_raw(sender, t.kind, t.region, t.body)


# -- the loop ----------------------------------------------------------------------------

def run(n: int, seed: int = 1, batch: int = 32, crashes_dir: Path | None = None, quiet: bool = False,
        home: Path | None = None, slow: float = 2.0) -> Stats:
    """Feed `n` hostile inputs to a fresh node; count crashes (see the module docstring)."""
    stats = Stats()
    with tempfile.TemporaryDirectory(prefix="edgeswarm-fuzz-") as tmp:
        target = Target.offline(Path(home or tmp) / "node", seed)
        node = target.node
        source = target.inputs()
        t0 = time.perf_counter()
        next_report = 0.0
        try:
            while stats.inputs < n:
                msgs = [next(source) for _ in range(min(batch, n - stats.inputs))]
                internal = node.counters["rejected.internal"]
                started = time.perf_counter()
                try:
                    node.receive_many([(topic, data) for topic, data, _ in msgs])
                except Exception:
                    stats.crashes += 1
                    _report(stats, msgs, traceback.format_exc(), crashes_dir)
                if (took := time.perf_counter() - started) > slow:
                    stats.crashes += 1
                    stats.slow += 1
                    _report(stats, msgs, f"hang: {len(msgs)} messages took {took:.1f} s", crashes_dir)
                if node.counters["rejected.internal"] > internal:
                    stats.crashes += 1
                    stats.internal += node.counters["rejected.internal"] - internal
                    _report(stats, msgs, "rejected.internal (see the log)", crashes_dir)
                for _, _, how in msgs:
                    stats.how[how] = stats.how.get(how, 0) + 1
                stats.inputs += len(msgs)
                elapsed = time.perf_counter() - t0
                if not quiet and elapsed >= next_report:
                    print(f"  {stats.inputs:>9,} inputs  {stats.inputs / max(elapsed, 1e-9):>7,.0f}/s  "
                          f"crashes {stats.crashes}  peak RSS {rss_mb():.0f} MB", flush=True)
                    next_report += 10.0
            elapsed = time.perf_counter() - t0
            stats.elapsed = elapsed
            unchanged = target.state() == target.before
            integrity = node.store.db.execute("PRAGMA integrity_check").fetchone()[0]
            alive = target.alive()
            stats.store_ok = unchanged and integrity == "ok" and alive
            if not quiet:
                rejected = sum(v for k, v in node.counters.items() if k.startswith(("rejected.", "ignored.")))
                print(f"inputs {stats.inputs:,} in {elapsed:.1f} s: {stats.inputs / elapsed:,.0f} inputs/s "
                      f"(full receive path: decode, replay window, handlers, SQLite store)")
                print(f"crashes {stats.crashes} (rejected.internal {stats.internal}, hangs {stats.slow}); "
                      f"counted rejections "
                      f"{rejected:,}; applied {node.counters['applied']:,}, votes {node.counters['votes']:,}")
                print(f"peak RSS {rss_mb():.0f} MB; store {node.store.path.stat().st_size / 2**20:.1f} MB")
                print(f"honest frames unchanged: {unchanged}; integrity_check: {integrity}; "
                      f"takes an honest change to consensus: {alive}")
                top = sorted(node.counters.items(), key=lambda kv: -kv[1])[:12]
                print("top counters: " + ", ".join(f"{k} {v:,}" for k, v in top))
        finally:
            target.close()
    return stats


def _report(stats: Stats, msgs: list[tuple[str, bytes, str]], error: str, crashes_dir: Path | None) -> None:
    if len(stats.reports) < 20:
        stats.reports.append(error)
        print(f"CRASH after {stats.inputs:,} inputs: {error}", file=sys.stderr)
    if crashes_dir is not None:
        crashes_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.blake2b(b"".join(d for _, d, _ in msgs), digest_size=8).hexdigest()
        (crashes_dir / f"{name}.cbor").write_bytes(cbor2.dumps([[t, d, h] for t, d, h in msgs]))


def run_atheris(n: int, seed: int) -> None:
    """Coverage-guided: atheris chooses a kind and bytes; bytes that decode as CBOR become
    the body of a signed message of that kind, others go out raw."""
    import atheris

    atheris.instrument_all()  # (edgeswarm is imported already: its code gets coverage hooks)
    tmp = tempfile.mkdtemp(prefix="edgeswarm-fuzz-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # (atheris ends the process itself)
    target = Target.offline(Path(tmp) / "node", seed)
    node = target.node

    def one(data: bytes) -> None:
        if len(data) < 2:
            return
        t = target.templates[data[0] % len(target.templates)]
        sender = target.senders[data[1] % len(target.senders)]
        try:
            body = cbor2.loads(data[2:])
            raw = sign_raw(sender, t.kind, t.region, body)
        except Exception:
            raw = data[2:]
        internal = node.counters["rejected.internal"]
        node.receive_many([(t.topic(sender), raw)])
        if node.counters["rejected.internal"] > internal:
            raise RuntimeError("rejected.internal: a handler failed")

    atheris.Setup([sys.argv[0], f"-runs={n}", f"-seed={seed}"], one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32, help="messages per receive_many (the inbox worker takes 500)")
    parser.add_argument("--crashes", type=Path, help="write each crashing batch here as CBOR [[topic, payload, how]]")
    parser.add_argument("--slow", type=float, default=2.0, help="seconds after which a batch counts as a hang")
    parser.add_argument("--engine", choices=("mutate", "atheris"), default="mutate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if args.engine == "atheris":
        run_atheris(args.inputs, args.seed)
        return 0
    print(f"fuzzing {args.inputs:,} inputs, seed {args.seed}")
    stats = run(args.inputs, args.seed, args.batch, args.crashes, slow=args.slow)
    return 0 if stats.crashes == 0 and stats.store_ok else 1


if __name__ == "__main__":
    sys.exit(main())
