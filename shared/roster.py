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

A broker that knows the admin key can check logins without any list of its own: a node logs
in as its node id with the password `<certificate>.<signature>` (base64url), the signature
by the node's key over BROKER_LOGIN + certificate; the admin's tools log in as
ADMIN_USERNAME with a signature by the admin key over BROKER_LOGIN + ADMIN_USERNAME. The
password proves possession of the key; keep it off shared channels (use mqtts://).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from .envelope import EnvelopeError, decode, encode
from .identity import PUBLIC_KEY_BYTES, Identity, node_id_of, verify
from .topics import TopicError, region_covers, validate_region

MAX_CERTIFICATE_BYTES = 8192
BROKER_LOGIN = b"edgeswarm broker login v1\x00"
ADMIN_USERNAME = "swarm-admin"


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


def _check_regions(regions: list[str]) -> None:
    try:
        for r in regions:
            validate_region(r)
    except TopicError as e:
        raise RosterError(str(e)) from None


def issue(admin: Identity, node_public_key: bytes, regions: list[str], expires_ms: int, issued_ms: int) -> bytes:
    """An admission certificate for a node."""
    if not regions:
        raise RosterError("a certificate names at least one region tree")
    _check_regions(regions)
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
    _check_regions(regions)
    if type(expires) is not int:
        raise RosterError("a certificate has an expiry time")
    return Certificate(node_id_of(key), key, tuple(regions), expires, raw)


def check_revocation(raw: bytes, admin_key: bytes) -> str:
    """The node id a revocation signed by the admin key revokes."""
    return node_id_of(_public_key(_open(raw, "revoke", admin_key).get("node")))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise RosterError("the broker password is not base64url") from None


def broker_password(identity: Identity, certificate: bytes) -> str:
    """A node's broker password: its certificate, and its signature over it."""
    return f"{_b64(certificate)}.{_b64(identity.sign(BROKER_LOGIN + certificate))}"


def admin_password(admin: Identity) -> str:
    return _b64(admin.sign(BROKER_LOGIN + ADMIN_USERNAME.encode()))


def check_broker_login(username: object, password: object, admin_key: bytes, now_ms: int | None) -> Certificate | None:
    """The certificate of the node logging in (None: the admin), or RosterError. Expiry is
    checked when now_ms is given."""
    if not isinstance(username, str) or not isinstance(password, str) or len(password) > 4 * MAX_CERTIFICATE_BYTES:
        raise RosterError("no user name and password")
    if username == ADMIN_USERNAME:
        if not verify(admin_key, BROKER_LOGIN + username.encode(), _unb64(password)):
            raise RosterError("not the swarm admin's signature")
        return None
    cert_part, _, sig_part = password.partition(".")
    cert = check_certificate(_unb64(cert_part), admin_key)
    if cert.node_id != username:
        raise RosterError(f"{username} presents the certificate of {cert.node_id}")
    if not verify(cert.public_key, BROKER_LOGIN + cert.raw, _unb64(sig_part)):
        raise RosterError(f"the password of {username} is not signed by its key")
    if now_ms is not None and now_ms > cert.expires_ms:
        raise RosterError(f"the certificate of {username} has expired")
    return cert
