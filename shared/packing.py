"""Signed messages packed together and compressed: what anti-entropy moves in bulk.

A sync response carries the diffs and votes a peer lacks, each as it was signed. Most of
their bytes they share — the region, the key and version a frame's votes name, each
voter's public key, the field names — and what is their own is mostly the 64 bytes of
their signature: deflated together they take a third to a half of the bytes (a third for
frames each with a diff and ten votes, a half for what a healed split lacked:
bench/bench_partition_heal.py). A pack is made of messages already signed, and opened
before any of them is checked, so each is checked exactly as if it had come alone; a pack
needs no signature of its own beyond that of the message carrying it.

    pack = zlib (RFC 1950) of the canonical CBOR array of the messages' bytes

A pack never inflates to more than the limit its reader gives (a message's size limit),
so a small message cannot unfold into a large one. The lists of a pull's steps (voters and
rounds repeat from frame to frame) go deflated the same way (`deflate`, `inflate`:
node/sync.py).
"""

from __future__ import annotations

import zlib

from .envelope import MalformedError, canonical, strict_loads

LEVEL = 6  # (level 9: ~2 % fewer bytes for ~30 % more time)


def pack(messages: list[bytes]) -> bytes:
    return deflate(messages)


def deflate(value: object) -> bytes:
    """zlib of a plain value's canonical CBOR (what a pack is of a list of messages)."""
    return zlib.compress(canonical(value), LEVEL)


def deflated_smaller(value: object, by: int = 0) -> bytes | None:
    """deflate(value) when it takes more than `by` bytes fewer than the value's canonical
    CBOR, else None (encoded once for both)."""
    plain = canonical(value)
    deflated = zlib.compress(plain, LEVEL)
    return deflated if len(deflated) + by < len(plain) else None


def smaller(messages: list[bytes]) -> bytes | None:
    """The pack of `messages` when it takes fewer bytes than they do as they are, else None
    (a reply sent packed is never larger than its list, as the size limits allow for)."""
    packed = pack(messages)
    return packed if len(packed) < sum(map(len, messages)) else None


def unpack(data: object, max_bytes: int) -> list[bytes]:
    """The messages in a pack; MalformedError when it is not one or would inflate beyond
    `max_bytes`."""
    messages = inflate(data, max_bytes, "a pack of messages")
    if type(messages) is not list or any(type(m) is not bytes for m in messages):
        raise MalformedError("a pack holds a list of messages")
    return messages


def inflate(data: object, max_bytes: int, what: str = "a deflated value") -> object:
    """The plain value `deflate` made; MalformedError when it is not one or would inflate
    beyond `max_bytes`."""
    if type(data) is not bytes:
        raise MalformedError(f"{what} is bytes")
    stream = zlib.decompressobj()
    try:
        plain = stream.decompress(data, max_bytes + 1)
    except zlib.error as e:
        raise MalformedError(f"{what} does not inflate: {e}") from None
    if len(plain) > max_bytes:
        raise MalformedError(f"{what} inflates beyond {max_bytes} bytes")
    if not stream.eof or stream.unused_data:
        raise MalformedError(f"{what} is cut short or followed by other bytes")
    return strict_loads(plain)
