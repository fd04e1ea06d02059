"""The signed envelope every edgeswarm message travels in.

Wire form (CBOR): a two-element array `[payload, signature]` where
  payload   = canonical CBOR of the map
              {"v": 1, "k": kind, "r": region or null, "s": sender public key (32 bytes),
               "n": sequence number (per sender, from 1), "t": hybrid logical clock (at most
               clock.MAX_TIMESTAMP), "b": body}
  signature = Ed25519 signature of exactly those payload bytes (64 bytes).
The signature covers the bytes as sent, so nothing is ever re-serialised before checking.
The message id is BLAKE2b-256 of the payload.

Many payloads of one sender can share one signature (one Ed25519 check is what a small
board pays most for per message):
  batch     = `[[payload, ...], signature]`: 2 to merkle.MAX_LEAVES payloads in one
              message; the signature is over BATCH_STATEMENT, the number of payloads (4
              bytes, big-endian) and the root of the Merkle tree over their message ids
              (shared/merkle.py);
  item form = `[payload, signature, n, index, path]`: one payload of a batch on its own,
              with its place in the batch and the inclusion path to the signed root. A
              receiver keeps and passes on each payload of a batch in this form, so a
              message of a batch travels alone (to a peer that lacks it) as a classic one does.
All three forms carry the same payloads and mean the same; `decode` reads a classic message
or an item form, `decode_many` a batch as well.

A node may pass on messages it received, each as it came and under its own signer's
signature, in one unsigned container:
  relay     = `{"relay": [message, ...]}`: 1 to merkle.MAX_LEAVES messages, each classic, in
              item form, or a whole batch (an author passes on the votes sent to it this way:
              see node/relay.py; with every payload of a batch to pass on, it puts the batch
              back together, `rebatch`: one signature check for each reader instead of one
              per payload, and no paths). `decode_many` opens each as if it had come alone
              on the topic.

Decoding is strict: size limit first, then shape and types, then the version, then the
topic it came on, then the signature. Every failure is an `EnvelopeError` subclass whose
`reason` names a counter; nothing else escapes `decode`.

Values are limited to a plain data model that encodes one way only: maps with text keys,
arrays, text, bytes, integers within 64 bits, floats, booleans and null. No tags.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import cbor2

from .clock import MAX_TIMESTAMP
from .identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, node_id_of, verify
from .merkle import MAX_LEAVES, root_and_paths, root_from_path
from .topics import PREFIX, TopicError, parse_topic, validate_kind, validate_region

FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 256 * 1024
MAX_DEPTH = 32
CONTENT_TYPE = "application/cbor"
_INT_MIN, _INT_MAX = -(2**64), 2**64 - 1
_SEQ_MAX = 2**63 - 1
_KEYS = frozenset("vkrsntb")
_LEAVES = frozenset({str, bytes, float, bool, type(None)})  # always plain (ints are range-checked)
BATCH_STATEMENT = b"edgeswarm batch\x00"  # what a batch signature signs: this, n (4 bytes) and the root
_MAX_PATH = MAX_LEAVES.bit_length()
RELAY_KEY = "relay"
_RELAY_HEAD = b"\xa1"  # (CBOR: a map of one pair)
T = TypeVar("T")


class EnvelopeError(Exception):
    reason = "invalid"


class OversizeError(EnvelopeError):
    reason = "oversize"


class MalformedError(EnvelopeError):
    reason = "malformed"


class UnsupportedVersionError(EnvelopeError):
    reason = "version"


class BadSignatureError(EnvelopeError):
    reason = "bad-signature"


class TopicMismatchError(EnvelopeError):
    reason = "topic-mismatch"


class ReplayError(EnvelopeError):
    reason = "replay"


class DuplicateError(ReplayError):
    reason = "duplicate"


# -- canonical CBOR and the plain data model ---------------------------------------------

def canonical(obj: Any) -> bytes:
    """The one byte string `obj` encodes to (RFC 8949 core deterministic encoding)."""
    return cbor2.dumps(obj, canonical=True)


def check_plain(obj: Any, depth: int = 0) -> None:
    """Raise MalformedError unless `obj` lies inside the plain data model."""
    if depth > MAX_DEPTH:
        raise MalformedError(f"nested deeper than {MAX_DEPTH} levels")
    t = type(obj)
    if t is dict:
        for k, v in obj.items():
            if type(k) is not str:
                raise MalformedError(f"map key of type {type(k).__name__}; keys must be text")
            if depth == MAX_DEPTH or type(v) not in _LEAVES:
                check_plain(v, depth + 1)
    elif t is list:
        for v in obj:
            if depth == MAX_DEPTH or type(v) not in _LEAVES:
                check_plain(v, depth + 1)
    elif t is int:
        if not _INT_MIN <= obj <= _INT_MAX:
            raise MalformedError("integer outside the 64-bit range")
    elif t in (str, bytes, float, bool) or obj is None:
        pass
    else:
        raise MalformedError(f"value of type {t.__name__} is outside the plain data model")


def _refuse_tag(*_: Any) -> Any:
    raise ValueError("a CBOR tag (tags are outside the plain data model)")


class _NoTags(Mapping[int, Callable[..., Any]]):
    """cbor2's semantic decoders: one for every tag number, and each refuses. Tags would
    otherwise be decoded before the plain data model is checked, among them shared and
    string references, which make a 100-byte message a graph that takes hours to walk or
    gigabytes to encode again."""

    def __getitem__(self, tag: int) -> Callable[..., Any]:
        return _refuse_tag

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


_NO_TAGS = _NoTags()


def strict_loads(data: bytes) -> Any:
    """Decode CBOR that must be exactly one plain item; MalformedError otherwise."""
    try:
        obj = cbor2.loads(data, max_depth=MAX_DEPTH + 2, allow_duplicate_keys=False,
                          semantic_decoders=_NO_TAGS, tag_hook=_refuse_tag)
    except Exception as e:  # cbor2 raises several types; all mean "not valid CBOR for us"
        raise MalformedError(f"not valid CBOR: {e}") from None
    check_plain(obj)
    return obj


# -- envelopes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    kind: str
    region: str | None
    sender: bytes  # Ed25519 public key
    seq: int
    hlc: int
    body: Any
    raw: bytes = field(repr=False)
    payload: bytes = field(repr=False)

    @property
    def sender_id(self) -> str:
        return node_id_of(self.sender)

    @property
    def msg_id(self) -> bytes:
        return message_id(self.payload)


def message_id(payload: bytes) -> bytes:
    """A message's id, and its leaf in a batch's Merkle tree: BLAKE2b-256 of its payload."""
    return hashlib.blake2b(payload, digest_size=32).digest()


def prepare(identity: Identity, kind: str, region: str | None, seq: int, hlc: int, body: Any) -> Envelope:
    """A message of `identity`, its payload made and not yet signed (`raw` empty): signed
    alone (`signed`) or with others of its signer's (`batch_items`)."""
    validate_kind(kind)
    if region is not None:
        validate_region(region)
    check_plain(body)
    payload = canonical({"v": FORMAT_VERSION, "k": kind, "r": region, "s": identity.public_key,
                         "n": seq, "t": hlc, "b": body})
    return Envelope(kind, region, identity.public_key, seq, hlc, body, b"", payload)


def signed(identity: Identity, env: Envelope) -> Envelope:
    """A prepared message signed alone (its classic form)."""
    return replace(env, raw=cbor2.dumps([env.payload, identity.sign(env.payload)]))


def signed_length(env: Envelope) -> int:
    """The bytes of a message signed alone (prepared or signed)."""
    n = len(env.payload)
    head = 1 if n < 24 else 2 if n < 2**8 else 3 if n < 2**16 else 5 if n < 2**32 else 9
    return 1 + head + n + 2 + SIGNATURE_BYTES  # ([payload, signature])


def encode(identity: Identity, kind: str, region: str | None, seq: int, hlc: int, body: Any) -> Envelope:
    return signed(identity, prepare(identity, kind, region, seq, hlc, body))


def batch_items(identity: Identity, envs: list[Envelope]) -> tuple[bytes, list[Envelope]]:
    """One message carrying the payloads of `envs` (prepared or signed: this identity's, 2
    to MAX_LEAVES of them) under one signature, and each of them in its item form."""
    if not 2 <= len(envs) <= MAX_LEAVES or any(e.sender != identity.public_key for e in envs):
        raise ValueError(f"a batch is 2 to {MAX_LEAVES} messages of its signer")
    n = len(envs)
    raw, signature, paths = _signed_batch(identity, [e.payload for e in envs])
    return raw, [replace(e, raw=_item_form(e.payload, signature, n, i, path))
                 for i, (e, path) in enumerate(zip(envs, paths))]


def _signed_batch(identity: Identity, payloads: list[bytes]) -> tuple[bytes, bytes, list[list[bytes]]]:
    """A batch of payloads under the identity's signature: (its bytes, the signature, each
    payload's path)."""
    root, paths = root_and_paths([message_id(p) for p in payloads])
    signature = identity.sign(_statement(len(payloads), root))
    return cbor2.dumps([payloads, signature]), signature, paths


def encode_batch(identity: Identity, envs: list[Envelope]) -> bytes:
    """One message carrying the payloads of `envs` under one signature (batch_items)."""
    return batch_items(identity, envs)[0]


def _item_form(payload: bytes, signature: bytes, n: int, index: int, path: list[bytes]) -> bytes:
    return cbor2.dumps([payload, signature, n, index, path])


def encode_relay(raws: list[bytes]) -> bytes:
    """One message passing on 1 to MAX_LEAVES messages (classic or item form) as they came."""
    if not 1 <= len(raws) <= MAX_LEAVES:
        raise ValueError(f"a relay passes on 1 to {MAX_LEAVES} messages")
    return cbor2.dumps({RELAY_KEY: raws})


def fitting(items: list[T], size_of: Callable[[T], int], limit: int, overhead: int = 0) -> Iterator[list[T]]:
    """`items` in order, as many at a time as one message of at most `limit` bytes holds
    (MAX_LEAVES at most): each costs its size_of() and 5 bytes of framing, the message
    `overhead` (its signature and arrays, say)."""
    chunk: list[T] = []
    size = overhead
    for item in items:
        cost = size_of(item) + 5
        if chunk and (len(chunk) == MAX_LEAVES or size + cost > limit):
            yield chunk
            chunk, size = [], overhead
        chunk.append(item)
        size += cost
    if chunk:
        yield chunk


def is_relay(data: bytes) -> bool:
    """Whether a message is a relay container (a map; every signed form is an array)."""
    return data[:1] == _RELAY_HEAD


def _statement(n: int, root: bytes) -> bytes:
    return BATCH_STATEMENT + n.to_bytes(4, "big") + root


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, topic: str | None = None) -> Envelope:
    """Check and open one message (classic, or one payload of a batch in its item form).
    Raises only EnvelopeError subclasses."""
    return _single(data, max_bytes, topic)


def _single(data: bytes, max_bytes: int, topic: str | None, skip: bytes | None = None) -> Envelope | None:
    outer = _outer(data, max_bytes)
    if type(outer[0]) is list:
        raise MalformedError("a batch of messages where one message was expected")
    return _one(outer, data, skip, topic)


def decode_many(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, topic: str | None = None) -> list[Envelope]:
    """Check and open a message that may be a batch: its envelopes, each in its item form
    (`raw`), in the order sent. Raises only EnvelopeError subclasses."""
    if is_relay(data):
        return decode_relay(data, max_bytes=max_bytes, topic=topic)[0]
    outer = _outer(data, max_bytes)
    if type(outer[0]) is not list:
        return [_one(outer, data, topic=topic)]
    return _batch(outer, topic)[0]


def _batch(outer: list, topic: str | None, skip: bytes | None = None) -> tuple[list[Envelope], int]:
    """The envelopes of a batch in their item forms, checked against the topic and the one
    signature; none, unchecked but for their shape, when the sender is `skip` (with their
    number)."""
    payloads, signature = outer
    if not 2 <= len(payloads) <= MAX_LEAVES or any(type(p) is not bytes for p in payloads):
        raise MalformedError(f"a batch holds 2 to {MAX_LEAVES} payloads")
    opened = [_open(p) for p in payloads]
    sender = opened[0][2]
    if any(m[2] != sender for m in opened):
        raise MalformedError("a batch holds the messages of one sender only")
    if topic is not None:  # (the topic before the signature, as for one message)
        for m, p in zip(opened, payloads):
            _checked(Envelope(*m, b"", p), topic)
    if sender == skip:
        return [], len(payloads)
    leaves = [message_id(p) for p in payloads]
    root, paths = root_and_paths(leaves)
    n = len(payloads)
    if not verify(sender, _statement(n, root), signature):
        raise BadSignatureError(f"batch signature does not match the payloads from {node_id_of(sender)}")
    return [Envelope(*m, _item_form(p, signature, n, i, path), p)
            for i, (p, m, path) in enumerate(zip(payloads, opened, paths))], 0


def decode_relay(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, topic: str | None = None,
                 skip: bytes | None = None) -> tuple[list[Envelope], int]:
    """Check and open the messages a relay passes on, but those of sender `skip`, left out
    unchecked (a node's own, coming back: the signature check is what a message costs);
    and how many were left out. Raises only EnvelopeError subclasses."""
    outer = _loaded(data, max_bytes)
    raws = outer.get(RELAY_KEY) if type(outer) is dict and len(outer) == 1 else None
    if type(raws) is not list or not 1 <= len(raws) <= MAX_LEAVES or any(type(r) is not bytes for r in raws):
        raise MalformedError(f'a relay is {{"relay": [1 to {MAX_LEAVES} messages]}}')
    envs, left = [], 0
    for raw in raws:
        one = _outer(raw, max_bytes)
        if type(one[0]) is list:
            got, skipped = _batch(one, topic, skip)
            envs += got
            left += skipped
        elif (env := _one(one, raw, skip, topic)) is not None:
            envs.append(env)
        else:
            left += 1
    return envs, left


def rebatch(raws: list[bytes], max_bytes: int = DEFAULT_MAX_BYTES, own: Identity | None = None) -> list[bytes]:
    """Messages to pass on (classic, or in item form: each checked as it came), with the item
    forms of every batch that is all there put back together as that batch, where its first
    one was (one that would take more than `max_bytes` stays in items). With `own`, the
    votes of that identity that would still go one by one go after the others, under new
    batch signatures of its own: the same payloads, so the same messages, for one signature
    (and no path) instead of one each."""
    loaded = [cbor2.loads(raw) for raw in raws]
    batches: dict[tuple[bytes, int], dict[int, bytes]] = {}  # (signature, n) -> index -> payload
    for outer in loaded:
        if len(outer) == 5:
            batches.setdefault((outer[1], outer[2]), {})[outer[3]] = outer[0]
    whole = {key: cbor2.dumps([[payloads[i] for i in range(key[1])], key[0]]) for key, payloads in batches.items()
             if payloads.keys() == set(range(key[1])) and _one_sender(payloads.values())}
    whole = {key: batch for key, batch in whole.items() if len(batch) <= max_bytes}
    out, done, votes = [], set(), []
    for raw, outer in zip(raws, loaded):
        key = (outer[1], outer[2]) if len(outer) == 5 else None
        if key in whole:
            if key not in done:  # (its other items are in it)
                done.add(key)
                out.append(whole[key])
        elif own is not None and type(outer[0]) is bytes and _own_vote(outer[0], own.public_key):
            votes.append((raw, outer[0]))
        else:
            out.append(raw)
    for group in fitting(votes, lambda vote: len(vote[1]), max_bytes, SIGNATURE_BYTES + 8):
        out.append(group[0][0] if len(group) == 1 else _signed_batch(own, [payload for _, payload in group])[0])
    return out


def _own_vote(payload: bytes, public_key: bytes) -> bool:
    if public_key not in payload:  # (most are not: the full decode only for those that may be)
        return False
    m = cbor2.loads(payload)
    return m.get("s") == public_key and m.get("k") == "vote"


def _one_sender(payloads: Iterable[bytes]) -> bool:
    """Whether payloads (checked as they came) are all of one sender: a batch that a member
    could make look like another's by its signature's bytes alone is left in items."""
    return len({cbor2.loads(p)["s"] for p in payloads}) == 1


def _loaded(data: bytes, max_bytes: int) -> Any:
    """The CBOR item of a message within the size limit."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedError("message is not bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise OversizeError(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    return strict_loads(data)


def _outer(data: bytes, max_bytes: int) -> list:
    outer = _loaded(data, max_bytes)
    if (type(outer) is not list or len(outer) not in (2, 5) or type(outer[0]) not in (bytes, list)
            or type(outer[1]) is not bytes or len(outer[1]) != SIGNATURE_BYTES
            or (type(outer[0]) is list and len(outer) != 2)):
        raise MalformedError("not an envelope: expected [payload bytes, 64-byte signature] "
                             "(or a batch, or a payload of one with its path)")
    return outer


def _one(outer: list, data: bytes, skip: bytes | None = None, topic: str | None = None) -> Envelope | None:
    """A classic message, or a payload of a batch in its item form: opened, its topic and
    signature checked (None, its signature unchecked, when its sender is `skip`)."""
    payload, signature = outer[0], outer[1]
    fields = _open(payload)
    sender = fields[2]
    if topic is not None:
        _checked(Envelope(*fields, data, payload), topic)
    if sender == skip:
        return None
    if len(outer) == 2:
        signed = payload
    else:
        n, index, path = outer[2:]
        if (type(n) is not int or not 2 <= n <= MAX_LEAVES or type(index) is not int or type(path) is not list
                or len(path) > _MAX_PATH or any(type(h) is not bytes or len(h) != 32 for h in path)):
            raise MalformedError("a payload of a batch travels as [payload, signature, n, index, path]")
        root = root_from_path(message_id(payload), index, n, path)
        if root is None:
            raise MalformedError("the path of a payload of a batch does not fit the batch")
        signed = _statement(n, root)
    if not verify(sender, signed, signature):
        raise BadSignatureError(f"signature does not match the payload from {node_id_of(sender)}")
    return Envelope(*fields, bytes(data), payload)


def _open(payload: bytes) -> tuple[str, str | None, bytes, int, int, Any]:
    """The fields of a payload (kind, region, sender, seq, clock, body), checked but not its signature."""
    m = strict_loads(payload)
    if type(m) is not dict:
        raise MalformedError("envelope payload is not a map")
    if type(m.get("v")) is int and m["v"] != FORMAT_VERSION:
        raise UnsupportedVersionError(f"envelope format version {m['v']} (this node reads {FORMAT_VERSION})")
    if m.keys() != _KEYS:
        raise MalformedError(f"envelope fields {sorted(m)} are not {sorted(_KEYS)}")
    kind, region, sender, seq, hlc = m["k"], m["r"], m["s"], m["n"], m["t"]
    if type(kind) is not str or type(sender) is not bytes or len(sender) != PUBLIC_KEY_BYTES:
        raise MalformedError("envelope kind or sender has the wrong type")
    if type(seq) is not int or not 1 <= seq <= _SEQ_MAX or type(hlc) is not int or not 0 <= hlc <= MAX_TIMESTAMP:
        raise MalformedError("envelope sequence number or clock is out of range")
    try:
        validate_kind(kind)
        if region is not None:
            if type(region) is not str:
                raise MalformedError("envelope region is not text")
            validate_region(region)
    except TopicError as e:
        raise MalformedError(str(e)) from None
    return kind, region, sender, seq, hlc, m["b"]


def _checked(env: Envelope, topic: str | None) -> Envelope:
    # (kind and region are valid here: the topic naming them is the one region traffic takes)
    if topic is not None and (env.region is None or topic != f"{PREFIX}/{env.kind}/{env.region}"):
        check_topic(env, topic)
    return env


def check_topic(env: Envelope, topic: str) -> None:
    """A signed message must arrive on the topic its contents name, not be replayed elsewhere."""
    try:
        t = parse_topic(topic)
    except TopicError as e:
        raise TopicMismatchError(str(e)) from None
    if t.kind != env.kind or t.region != env.region:
        raise TopicMismatchError(f"a {env.kind} message for region {env.region!r} arrived on {topic!r}")


# -- replay protection -------------------------------------------------------------------

WINDOW = 64


def accept_seq(top: int, mask: int, seq: int) -> tuple[int, int]:
    """Sliding-window replay check (as in IPsec).

    (top, mask) is a sender's state: the highest sequence number accepted and a bitmap of
    the WINDOW numbers below and including it (bit i set = top - i seen). Returns the new
    state, or raises DuplicateError / ReplayError. Messages reordered within the window
    are accepted once.
    """
    if seq > top:
        shift = seq - top
        mask = ((mask << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
        return seq, mask
    offset = top - seq
    if offset >= WINDOW:
        raise ReplayError(f"sequence number {seq} is older than the replay window (latest {top})")
    if mask >> offset & 1:
        raise DuplicateError(f"sequence number {seq} was already received")
    return top, mask | (1 << offset)
