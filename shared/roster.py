"""The swarm roster: who may change a swarm's state, signed by the swarm's admin key.

A swarm that has a roster has an admin key (Ed25519, made by `edgeswarm swarm create` and
kept off the boards). The admin signs, as envelopes of this wire format with no region:

- an **admission certificate** (kind "admit"), body {"node": the node's public key,
  "regions": region trees it may write and vote in, "expires": ms since the epoch}; the node
  carries it in its birth message;
- a **revocation** (kind "revoke"), body {"node": public key}, published retained on the
  revoked node's topic (es/v1/node/<id>/revoke) so that every node, now or later, learns it.

Anything else a node signs is judged against the sender's certificate: admitted, not expired,
not revoked, and for a region inside the certificate's regions.
"""

from __future__ import annotations

from dataclasses import dataclass

from .envelope import EnvelopeError, decode, encode
from .identity import PUBLIC_KEY_BYTES, Identity, node_id_of
from .topics import TopicError, region_covers, validate_region

MAX_CERTIFICATE_BYTES = 8192


class RosterError(ValueError):
    """A certificate or revocation that is malformed, not the admin's, or not for this node."""


@dataclass(frozen=True)
class Certificate:
    node_id: str
    public_key: bytes
    regions: tuple[str, ...]
    expires_ms: int
    raw: bytes

    def covers(self, region: str) -> bool:
        return any(region_covers(r, region) for r in self.regions)


def parse_admin_key(text: str) -> bytes:
    """The admin public key as configured: 64 hex digits."""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != PUBLIC_KEY_BYTES:
        raise RosterError(f"a swarm admin key is {PUBLIC_KEY_BYTES * 2} hex digits, not {text[:80]!r}")
    return key


def _public_key(value: object) -> bytes:
    if type(value) is not bytes or len(value) != PUBLIC_KEY_BYTES:
        raise RosterError(f"a node's public key is {PUBLIC_KEY_BYTES} bytes")
    return value


def issue(admin: Identity, node_public_key: bytes, regions: list[str], expires_ms: int, issued_ms: int) -> bytes:
    """An admission certificate for a node."""
    if not regions:
        raise RosterError("a certificate names at least one region tree")
    try:
        for r in regions:
            validate_region(r)
    except TopicError as e:
        raise RosterError(str(e)) from None
    body = {"node": _public_key(node_public_key), "regions": sorted(set(regions)), "expires": expires_ms}
    return encode(admin, "admit", None, 1, issued_ms, body).raw


def revocation(admin: Identity, node_public_key: bytes, issued_ms: int) -> bytes:
    return encode(admin, "revoke", None, 1, issued_ms, {"node": _public_key(node_public_key)}).raw


def _open(raw: bytes, kind: str, admin_key: bytes) -> dict:
    try:
        env = decode(raw, max_bytes=MAX_CERTIFICATE_BYTES)
    except EnvelopeError as e:
        raise RosterError(f"not a signed {kind}: {e}") from None
    if env.kind != kind or env.region is not None:
        raise RosterError(f"a {env.kind} where a {kind} was expected")
    if env.sender != admin_key:
        raise RosterError(f"the {kind} is signed by {node_id_of(env.sender)}, not by this swarm's admin key")
    if type(env.body) is not dict:
        raise RosterError(f"a {kind} body is a map")
    return env.body


def check_certificate(raw: bytes, admin_key: bytes) -> Certificate:
    """A certificate signed by the admin key, well formed (not checked: its expiry)."""
    body = _open(raw, "admit", admin_key)
    key, regions, expires = _public_key(body.get("node")), body.get("regions"), body.get("expires")
    if type(regions) is not list or not regions or not all(type(r) is str for r in regions):
        raise RosterError("a certificate lists its region trees")
    try:
        for r in regions:
            validate_region(r)
    except TopicError as e:
        raise RosterError(str(e)) from None
    if type(expires) is not int:
        raise RosterError("a certificate has an expiry time")
    return Certificate(node_id_of(key), key, tuple(regions), expires, raw)


def check_revocation(raw: bytes, admin_key: bytes) -> str:
    """The node id a revocation signed by the admin key revokes."""
    return node_id_of(_public_key(_open(raw, "revoke", admin_key).get("node")))
