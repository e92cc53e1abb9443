"""Key agreement and share encryption, all from `cryptography`: X25519, HKDF-SHA256 and AES-256-GCM.

Every derived key is bound to its use: HKDF's info string names the purpose (share encryption or a
pairwise mask), the round id and the two client ids in canonical order (smaller first), so the same two
X25519 keys give unrelated keys for each purpose and round. Sealed shares carry associated data naming the
round, the sender and the receiver in that order, so a ciphertext replayed from another round, another
sender or the other direction fails authentication. A sealed share is nonce (12 bytes) || ciphertext || tag.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.secagg.errors import ProtocolViolation

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
PURPOSE_SHARES = b"share-encryption"
PURPOSE_MASK = b"pairwise-mask"
_DOMAIN = b"fedtune/secagg/v1/"
_RAW = serialization.Encoding.Raw


@dataclass(frozen=True, eq=False)
class KeyPair:
    """An X25519 key pair; `public` is the 32-byte raw public key that goes on the wire."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        return cls.from_private(X25519PrivateKey.generate())

    @classmethod
    def from_private(cls, private: X25519PrivateKey) -> KeyPair:
        return cls(private, private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        return cls.from_private(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        fmt, enc = serialization.PrivateFormat.Raw, serialization.NoEncryption()
        return self.private.private_bytes(_RAW, fmt, enc)


def _ids(a: int, b: int) -> bytes:
    return a.to_bytes(4, "big") + b.to_bytes(4, "big")


def context(purpose: bytes, round_id: int, a: int, b: int) -> bytes:
    """HKDF info: domain, purpose, round id and the two client ids, smaller first (same for both sides)."""
    lo, hi = sorted((a, b))
    return _DOMAIN + purpose + b"/" + round_id.to_bytes(8, "big") + _ids(lo, hi)


def agree(
    private: X25519PrivateKey, peer_public: bytes, *, purpose: bytes, round_id: int, a: int, b: int
) -> bytes:
    """The 32-byte key that clients a and b (either order) share for `purpose` in round `round_id`."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # wrong length, or a low-order point giving an all-zero secret
        raise ProtocolViolation(
            f"unusable public key in the agreement of clients {a} and {b}: {err}"
        ) from err
    info = context(purpose, round_id, a, b)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def associated_data(round_id: int, sender: int, receiver: int) -> bytes:
    """What a sealed share is bound to: round, then sender, then receiver (direction matters)."""
    return _DOMAIN + b"share/" + round_id.to_bytes(8, "big") + _ids(sender, receiver)


def seal(
    key: bytes, plaintext: bytes, *, round_id: int, sender: int, receiver: int, nonce: bytes | None = None
) -> bytes:
    """AES-256-GCM encryption of `plaintext` from `sender` to `receiver`; the nonce is random unless given."""
    nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"an AES-GCM nonce is {NONCE_BYTES} bytes")
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data(round_id, sender, receiver))


def open_sealed(key: bytes, sealed: bytes, *, round_id: int, sender: int, receiver: int) -> bytes:
    """The plaintext of a sealed share, or `ProtocolViolation` if it was tampered with or replayed."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise ProtocolViolation(f"share from client {sender} to client {receiver} is truncated")
    try:
        ad = associated_data(round_id, sender, receiver)
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], ad)
    except InvalidTag as err:
        raise ProtocolViolation(
            f"share from client {sender} to client {receiver} in round {round_id} fails authentication: "
            "it was tampered with, or replayed from another round or peer"
        ) from err
