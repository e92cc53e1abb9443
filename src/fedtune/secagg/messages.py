"""The protocol's messages: one frozen dataclass per stage and direction, holding plain data only.

A client-to-server message names its round and sender; a server-to-client message its round and
recipient; so a state machine can refuse one that belongs to another round or peer. Fields are ints,
bytes, tuples and one uint32 array, so a transport can serialize them without pickle. `nbytes()` is the
size of that wire form (round id 8 bytes, client ids and lengths 4, keys 32, shares 66), which the round
reports as bytes per client.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from fedtune.secagg.shamir import SHARE_BYTES

ROUND_BYTES = 8
ID_BYTES = 4
LEN_BYTES = 4
PUBLIC_KEY_BYTES = 32
_HEADER = ROUND_BYTES + ID_BYTES


class Stage(IntEnum):
    """The four client stages; a client that drops at a stage sends nothing from that stage on."""

    ADVERTISE_KEYS = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    UNMASK = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class PeerKeys:
    """A client's two public keys: for encrypting shares to it, and for pairwise masks."""

    client_id: int
    enc_key: bytes
    mask_key: bytes

    def nbytes(self) -> int:
        return ID_BYTES + 2 * PUBLIC_KEY_BYTES


@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 0, client -> server: the client's public keys."""

    round_id: int
    sender: int
    enc_key: bytes
    mask_key: bytes

    def nbytes(self) -> int:
        return _HEADER + 2 * PUBLIC_KEY_BYTES


@dataclass(frozen=True)
class NeighbourKeys:
    """Stage 0 -> 1, server -> client: the public keys of the recipient's neighbours."""

    round_id: int
    recipient: int
    neighbours: tuple[PeerKeys, ...]

    def nbytes(self) -> int:
        return _HEADER + LEN_BYTES + sum(p.nbytes() for p in self.neighbours)


@dataclass(frozen=True)
class EncryptedShare:
    """The sender's shares of its self-mask seed and mask key, sealed (AES-GCM) to the receiver."""

    sender: int
    receiver: int
    sealed: bytes

    def nbytes(self) -> int:
        return 2 * ID_BYTES + LEN_BYTES + len(self.sealed)


@dataclass(frozen=True)
class ShareKeys:
    """Stage 1, client -> server: one sealed share pair per neighbour."""

    round_id: int
    sender: int
    shares: tuple[EncryptedShare, ...]

    def nbytes(self) -> int:
        return _HEADER + LEN_BYTES + sum(s.nbytes() for s in self.shares)


@dataclass(frozen=True)
class ForwardedShares:
    """Stage 1 -> 2, server -> client: the sealed shares the recipient's surviving neighbours sent it."""

    round_id: int
    recipient: int
    shares: tuple[EncryptedShare, ...]

    def nbytes(self) -> int:
        return _HEADER + LEN_BYTES + sum(s.nbytes() for s in self.shares)


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Stage 2, client -> server: the masked payload, uint32 words mod 2^32."""

    round_id: int
    sender: int
    words: np.ndarray

    def nbytes(self) -> int:
        return _HEADER + LEN_BYTES + int(self.words.nbytes)


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 2 -> 3, server -> client: whose input is in the sum (survivors) and who dropped after sharing."""

    round_id: int
    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def nbytes(self) -> int:
        return _HEADER + 2 * LEN_BYTES + ID_BYTES * (len(self.survivors) + len(self.dropped))


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 3, client -> server: (owner, share) of survivors' seeds and of dropped clients' mask keys."""

    round_id: int
    sender: int
    seed_shares: tuple[tuple[int, int], ...]
    key_shares: tuple[tuple[int, int], ...]

    def nbytes(self) -> int:
        count = len(self.seed_shares) + len(self.key_shares)
        return _HEADER + 2 * LEN_BYTES + count * (ID_BYTES + SHARE_BYTES)
