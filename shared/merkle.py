"""A Merkle tree over message ids, so that one signature covers many messages and each
can still travel alone with the proof that it was among them.

The tree is the one of RFC 9162 (Certificate Transparency 2.0, section 2.1): the leaves
are the message ids (BLAKE2b-256 of each payload, so a leaf is never the hash of two
nodes: a payload is a CBOR map, never 0x01 followed by 64 bytes), an inner node is
BLAKE2b-256(0x01 || left || right), and a tree of n leaves splits after the largest power
of two below n. An inclusion path lists the sibling hashes from the leaf upwards.
"""

from __future__ import annotations

import hashlib

MAX_LEAVES = 1024  # messages under one signature (a path of at most 10 hashes)


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.blake2b(b"\x01" + left + right, digest_size=32).digest()


def root_and_paths(leaves: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root of the tree over `leaves` (at least one) and each leaf's inclusion path."""
    n = len(leaves)
    if n == 1:
        return leaves[0], [[]]
    k = 1 << ((n - 1).bit_length() - 1)  # the largest power of two below n
    left, left_paths = root_and_paths(leaves[:k])
    right, right_paths = root_and_paths(leaves[k:])
    return _node(left, right), [p + [right] for p in left_paths] + [p + [left] for p in right_paths]


def root_from_path(leaf: bytes, index: int, size: int, path: list[bytes]) -> bytes | None:
    """The root that `path` proves `leaf` at `index` of a tree of `size` leaves under, or
    None when the path does not fit such a tree (RFC 9162, 2.1.3.2)."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None
