"""Node identity: an Ed25519 key pair, and the node id derived from its public key.

The private key is a 32-byte seed kept in a file that only its owner may read (mode 0600).
A node id is short, topic-safe text that anyone can recompute from the public key, so a
signed envelope that carries the public key also proves which node sent it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError as _NaclBadSignature
from nacl.exceptions import CryptoError as _NaclCryptoError
from nacl.signing import SigningKey

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_SEED_BYTES = 32
_NODE_ID_BYTES = 10  # 80 bits: 16 base32 characters


class IdentityError(Exception):
    """A key file that is missing, malformed or readable by others."""


@functools.lru_cache(maxsize=4096)  # asked for every message received; a swarm has few keys
def node_id_of(public_key: bytes) -> str:
    """The node id of a public key: lowercase base32 of its BLAKE2b-80 digest."""
    digest = hashlib.blake2b(public_key, digest_size=_NODE_ID_BYTES).digest()
    return base64.b32encode(digest).decode("ascii").lower()


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `message` by `public_key`."""
    # (libsodium's check itself: a VerifyKey object around it costs a tenth of the check,
    # and every node checks ~20 signatures per write of a 20-node swarm)
    if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_BYTES or type(signature) is not bytes \
            or len(signature) != SIGNATURE_BYTES or type(message) is not bytes:
        return False
    try:
        crypto_sign_open(signature + message, public_key)
    except (_NaclBadSignature, _NaclCryptoError, ValueError, TypeError):
        return False
    return True


def write_secret(path: Path, data: bytes) -> None:
    """Write a key to a new file created with mode 0600 (and synced); never overwrite one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise IdentityError(f"key file {path} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class Identity:
    signing_key: SigningKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def node_id(self) -> str:
        return node_id_of(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    def save(self, path: Path) -> None:
        """Write the seed to a new file created with mode 0600; never overwrite a key."""
        write_secret(path, bytes(self.signing_key))

    @classmethod
    def load(cls, path: Path) -> Identity:
        path = Path(path)
        try:
            st = path.stat()
            seed = path.read_bytes()
        except FileNotFoundError:
            raise IdentityError(f"no key file at {path}; run `edgeswarm init` first") from None
        except OSError as e:
            raise IdentityError(f"cannot read key file {path}: {e.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"key file {path} is accessible by others (mode {stat.S_IMODE(st.st_mode):o}); "
                f"run: chmod 600 {path}"
            )
        if len(seed) != _SEED_BYTES:
            raise IdentityError(f"key file {path} is not a {_SEED_BYTES}-byte Ed25519 seed")
        return cls(SigningKey(seed))

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        path = Path(path)
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity
