"""Sealed regions: region trees whose diffs and votes travel encrypted with a key their nodes
share (NaCl SecretBox: XSalsa20-Poly1305), so that the broker and any tool without the key
see only ciphertext.

A sealed message's body is {"sealed": nonce + ciphertext of the body's canonical CBOR}. The
envelope around it (kind, region, sender, sequence, clock) stays in clear and the signature
covers the sealed bytes — encrypted, then signed — so a node checks who sent a message before
it decrypts anything. Frame keys and version hashes still show in traces and digests; values
do not leave a node unsealed.
"""

from __future__ import annotations

from typing import Any

from nacl.exceptions import CryptoError
from nacl.secret import SecretBox
from nacl.utils import random

from .envelope import MalformedError, canonical, strict_loads
from .topics import region_covers

KEY_BYTES = SecretBox.KEY_SIZE
SEALED_KINDS = frozenset({"diff", "vote"})


class SealError(MalformedError):
    """A sealed body that does not open with the region's key."""

    reason = "bad-seal"


def new_key() -> bytes:
    return random(KEY_BYTES)


def is_sealed(body: Any) -> bool:
    return type(body) is dict and set(body) == {"sealed"} and type(body["sealed"]) is bytes


class Seals:
    """The keys of the sealed region trees a node (or a watcher) holds."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        for root, key in keys.items():
            if len(key) != KEY_BYTES:
                raise ValueError(f"the key of sealed region {root!r} is {len(key)} bytes, not {KEY_BYTES}")
        # the deepest tree first: a sub-tree may have a key of its own
        self._boxes = sorted(((root, SecretBox(key)) for root, key in keys.items()), key=lambda rb: -len(rb[0]))

    def __bool__(self) -> bool:
        return bool(self._boxes)

    def box(self, region: str) -> SecretBox | None:
        return next((box for root, box in self._boxes if region_covers(root, region)), None)

    def seal(self, region: str, body: Any) -> Any:
        box = self.box(region)
        return body if box is None else {"sealed": bytes(box.encrypt(canonical(body)))}

    def open(self, region: str, body: Any) -> Any:
        """The body of a sealed message (SealError if it does not open)."""
        box = self.box(region)
        if box is None or not is_sealed(body):
            raise SealError(f"no sealed body for {region!r}")
        try:
            return strict_loads(box.decrypt(body["sealed"]))
        except (CryptoError, ValueError) as e:
            raise SealError(f"a sealed body in {region!r} does not open with its key: {e}") from None
