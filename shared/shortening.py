"""Signed messages with the versions they name shortened: what anti-entropy sends a peer
that holds those versions already.

After the signatures, most of what a pull moves is version hashes: each vote names the
version it is for (32 bytes), each diff its parent, and no packing shrinks them (they are
random bytes, and a vote's version is not in the same pack as its diff when the vote comes
from its voter). The peer pulling holds most of them: the parent of a diff it lacks, and the
version of a vote on it, from the diff that came before. So a message goes to such a peer
with each of those names cut to its first SHORT bytes, and the peer restores them from
what it holds before it checks the signature:

    short form = the message (classic, batch, or item form) with, in each payload, a vote's
                 `version` or a diff's `parent` of HASH_BYTES cut to its first SHORT bytes,
                 the payload encoded canonically again

A payload is canonical CBOR (shared/envelope.py: `prepare`), so encoding it again with the
full hash put back gives the very bytes signed. A payload that is not canonical (not made
by an edgeswarm node) is left as it came. Restoring needs, for each short name, exactly one
version of that frame that the reader holds with it; the reader that finds none or more than
one cannot restore the message (`restore` gives None) and asks for full forms for a while
(node/sync.py). A wrong restoration is a signature that does not match: nothing is taken
that its signer did not sign. Only a peer whose sync-reqs say it reads short forms
(`short`) is sent them.
"""

from __future__ import annotations

from collections.abc import Callable

import cbor2

from .envelope import MalformedError, canonical, strict_loads

HASH_BYTES = 32
SHORT = 4
_NAMED = {"vote": "version", "diff": "parent"}  # the hash in a body that a reader holds
# each of those names followed by the head of a SHORT-byte string, as CBOR encodes them, and
# the kind of a diff (whose version later messages may name): a message with none of these
# has nothing to restore or to note, and is not decoded for it
_MARKS = (*(canonical(name) + canonical(bytes(SHORT))[:1] for name in _NAMED.values()),
          canonical("k") + canonical("diff"))


def shorten(raw: bytes) -> bytes:
    """The message with the versions its payloads name shortened (as it is if none are)."""
    outer = cbor2.loads(raw)
    if type(outer) is not list or len(outer) not in (2, 5):
        return raw  # (a relay or something else: left as it is)
    if type(outer[0]) is list:
        payloads = [_shortened(p) for p in outer[0]]
        if all(p is None for p in payloads):
            return raw
        return cbor2.dumps([[q if p is None else p for p, q in zip(payloads, outer[0])], *outer[1:]])
    payload = _shortened(outer[0])
    return raw if payload is None else cbor2.dumps([payload, *outer[1:]])


def _shortened(payload: bytes) -> bytes | None:
    m = cbor2.loads(payload)
    field = _NAMED.get(m.get("k")) if type(m) is dict else None
    body = m.get("b") if field else None
    if type(body) is not dict or type(body.get(field)) is not bytes or len(body[field]) != HASH_BYTES \
            or canonical(m) != payload:
        return None
    body[field] = body[field][:SHORT]
    return canonical(m)


class Names:
    """What a reader restores short names from: the versions it holds (`held`: those of a
    frame whose hash starts with a prefix, two at most) and those of the diffs it read
    before in the same response (even in the same message: a batch may hold a frame's
    versions one after another)."""

    def __init__(self, held: Callable[[str, str, bytes], list[bytes]]) -> None:
        self._held = held
        self._read: dict[tuple[str, str, bytes], set[bytes]] = {}

    def find(self, region: str, key: str, short: bytes) -> bytes | None:
        """The one version of the frame with that short name, or None (none, or several)."""
        found = self._read.get((region, key, short), set()).union(self._held(region, key, short))
        return next(iter(found)) if len(found) == 1 else None

    def read(self, m: dict) -> None:
        """Note the version a diff's payload (decoded) makes."""
        body = m.get("b")
        if m.get("k") == "diff" and type(m.get("r")) is str and type(body) is dict \
                and type(body.get("key")) is str and type(body.get("version")) is bytes:
            self._read.setdefault((m["r"], body["key"], body["version"][:SHORT]), set()).add(body["version"])


def restore(raw: bytes, names: Names) -> bytes | None:
    """The message with every shortened name put back (as it is if none is shortened, or if
    it is no message at all: the envelope's checks say what is wrong with it), or None when
    a name cannot be: the reader holds no version of that frame with it, or more than one."""
    if not any(mark in raw for mark in _MARKS):  # (full votes: no decoding beyond the envelope's own)
        return raw
    try:
        outer = strict_loads(raw)
    except MalformedError:
        return raw
    if type(outer) is not list or len(outer) not in (2, 5) or type(outer[0]) not in (bytes, list):
        return raw
    many = type(outer[0]) is list
    payloads = outer[0] if many else [outer[0]]
    restored = []
    changed = False
    for payload in payloads:
        full = _restored(payload, names) if type(payload) is bytes else payload
        if full is None:
            return None
        changed |= full is not payload
        restored.append(full)
    if not changed:
        return raw
    return cbor2.dumps([restored if many else restored[0], *outer[1:]])


def _restored(payload: bytes, names: Names) -> bytes | None:
    """A payload with its shortened name put back (the same object if it has none)."""
    try:
        m = strict_loads(payload)
    except MalformedError:
        return payload  # (rejected as it is when it is opened)
    if type(m) is not dict:
        return payload
    names.read(m)
    field = _NAMED.get(m.get("k"))
    body = m.get("b") if field else None
    if type(body) is not dict or type(body.get(field)) is not bytes or len(body[field]) != SHORT \
            or type(body.get("key")) is not str or type(m.get("r")) is not str:
        return payload
    full = names.find(m["r"], body["key"], body[field])
    if full is None:
        return None
    body[field] = full
    return canonical(m)
