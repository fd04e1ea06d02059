"""The hashes anti-entropy compares, and the tree it walks down.

Every frame has a 60-bit *position* (a hash of region and key) and a *frame hash*: the XOR
of one 63-bit item hash per thing a peer could lack there — each authored version, and
each voter's latest vote. The store keeps both per frame (table `sums`), updated in the
same transaction as the version or vote, so a digest never re-reads the history.

Positions order the frames of a region tree into a 16-ary tree: the node at level L, index
i holds the frames whose position starts with the 4·L bits of i; its hash is the XOR of its
frames' hashes. Two nodes compare the 16 hashes of level 1 first and walk down only where
they differ, so finding a few differing frames among many costs a few hundred bytes per
differing frame, not a list of everything held.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable
from functools import reduce
from operator import xor

POS_BITS = 60
FANOUT_BITS = 4
FANOUT = 1 << FANOUT_BITS
MAX_LEVEL = POS_BITS // FANOUT_BITS  # a node of this level holds one position
SHORT_BYTES = 4  # a version or voter named in an `items` list: enough to tell one frame's apart


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def position(region: str, key: str) -> int:
    return _h64(f"{region}\0{key}".encode()) >> (64 - POS_BITS)


def version_item(version: bytes) -> int:
    return _h64(b"v" + version) >> 1


def vote_item(voter: str, round_: int, version: bytes) -> int:
    return _h64(b"r" + voter.encode() + b"\0" + round_.to_bytes(8, "big") + version) >> 1


def short(item: int) -> bytes:
    return (item & ((1 << 8 * SHORT_BYTES) - 1)).to_bytes(SHORT_BYTES, "big")


def pack_versions(versions: Iterable[bytes]) -> bytes:
    """The versions of a frame named in an `items` list."""
    return b"".join(short(version_item(v)) for v in versions)


def unpack_versions(data: bytes) -> set[bytes] | None:
    if type(data) is not bytes or len(data) % SHORT_BYTES:
        return None
    return {data[i:i + SHORT_BYTES] for i in range(0, len(data), SHORT_BYTES)}


def below(count: int, xored: int, listed: list[bytes]) -> list[int]:
    """[count, XOR of the item hashes] of a frame's versions other than `listed`, given the
    count and XOR of all of them (Store.version_summary): what an `items` entry that lists
    only the newest says of the others."""
    return [count - len(listed), reduce(xor, map(version_item, listed), xored)]


def voter_tag(voter: str) -> bytes:
    """A voter named in an `items` list (with its round: 4 + 4 bytes)."""
    return hashlib.blake2b(voter.encode(), digest_size=SHORT_BYTES).digest()


def wire_round(round_: int) -> int:
    """A vote round as an `items` list carries it (4 bytes; a higher round reads as the top)."""
    return min(round_, 2**32 - 1)


def pack_rounds(rounds: Iterable[tuple[str, int]]) -> bytes:
    return b"".join(voter_tag(v) + wire_round(r).to_bytes(4, "big") for v, r in rounds)


def unpack_rounds(data: bytes) -> dict[bytes, int] | None:
    if type(data) is not bytes or len(data) % (SHORT_BYTES + 4):
        return None
    step = SHORT_BYTES + 4
    return {data[i:i + SHORT_BYTES]: int.from_bytes(data[i + SHORT_BYTES:i + step], "big")
            for i in range(0, len(data), step)}


def pack(hashes: list[int], width: int = 8) -> bytes:
    return b"".join(h.to_bytes(width, "big") for h in hashes)


def unpack(data: bytes, count: int, width: int = 8) -> list[int] | None:
    """`count` hashes from `pack`, or None when the bytes are not that."""
    if type(data) is not bytes or len(data) != width * count:
        return None
    return [int.from_bytes(data[i:i + width], "big") for i in range(0, len(data), width)]


SALT_BYTES = 8
SALTED_BYTES = 4  # a tree node's or a frame's hash as a salted walk names it


def salted(hashes: list[int], salt: bytes | None) -> list[int]:
    """Hashes as an exchange step names them: as they are, or, with the salt of a pull, each
    cut to SALTED_BYTES of a hash of it with the salt. Two that differ read the same with
    odds of one in 2**32, and with another salt at the next pull."""
    if salt is None:
        return hashes
    return [int.from_bytes(hashlib.blake2b(h.to_bytes(8, "big"), digest_size=SALTED_BYTES, key=salt).digest(), "big")
            for h in hashes]


def valid_node(level: object, index: object, max_level: int = MAX_LEVEL) -> bool:
    return type(level) is int and type(index) is int and 0 <= level <= max_level and 0 <= index < FANOUT ** level


class Tree:
    """The frames of one region tree as this node holds them, ordered by position: only
    positions and hashes (two arrays of 64-bit integers, 16 bytes a frame), the level-1
    counts, and a way to name the frame at a position."""

    def __init__(self, rows: Iterable[tuple[int, int, int, int]] = (),
                 name: Callable[[int], tuple[str, str] | None] = lambda pos: None) -> None:
        # rows: (position, frame hash, authored versions, sum of latest vote rounds), in position order
        self.pos = array("q")
        self.hashes = array("q")
        self._counts = [[0, 0] for _ in range(FANOUT)]
        for pos, h, versions, rounds in rows:
            self.pos.append(pos)
            self.hashes.append(h)
            c = self._counts[pos >> (POS_BITS - FANOUT_BITS)]
            c[0] += versions
            c[1] += rounds
        self._name = name

    def apply(self, pos: int, item: int, versions: int, rounds: int) -> None:
        """XOR an item into the frame at a position (new: inserted in order), as the store
        did to its sum."""
        i = bisect_left(self.pos, pos)
        if i < len(self.pos) and self.pos[i] == pos:
            self.hashes[i] ^= item
        else:
            self.pos.insert(i, pos)
            self.hashes.insert(i, item)
        c = self._counts[pos >> (POS_BITS - FANOUT_BITS)]
        c[0] += versions
        c[1] += rounds

    def copy(self) -> Tree:
        t = Tree(name=self._name)
        t.pos, t.hashes, t._counts = array("q", self.pos), array("q", self.hashes), self.counts()
        return t

    def span(self, level: int, index: int) -> tuple[int, int]:
        shift = POS_BITS - FANOUT_BITS * level
        return bisect_left(self.pos, index << shift), bisect_left(self.pos, (index + 1) << shift)

    def hash(self, level: int, index: int) -> int:
        a, b = self.span(level, index)
        return reduce(xor, self.hashes[a:b], 0)

    def count(self, level: int, index: int) -> int:
        a, b = self.span(level, index)
        return b - a

    def children(self, level: int, index: int) -> list[int]:
        return [self.hash(level + 1, index * FANOUT + j) for j in range(FANOUT)]

    def frames(self, level: int, index: int) -> dict[int, int]:
        """position -> frame hash of the frames under a node."""
        a, b = self.span(level, index)
        return dict(zip(self.pos[a:b], self.hashes[a:b]))

    def frame(self, pos: int) -> tuple[str, str] | None:
        """(region, key) of the frame at a position, if this node holds it."""
        i = bisect_left(self.pos, pos)
        return self._name(pos) if i < len(self.pos) and self.pos[i] == pos else None

    def counts(self) -> list[list[int]]:
        """Per level-1 node: [authored versions, sum of latest vote rounds]. Both only grow,
        so a peer whose counts are all at or below ours in every differing node is missing
        things rather than holding things we lack."""
        return [list(c) for c in self._counts]
