"""The client's side of SecAgg+, as a state machine over messages: pure, no I/O.

Stage 0 `advertise_keys`: two fresh X25519 key pairs, one to encrypt shares, one for pairwise masks.
Stage 1 `share_keys`: a fresh 32-byte self-mask seed b_u; t-of-(k+1) Shamir shares of b_u and of the mask
private key s_u, one pair per neighbour (sealed to it with AES-GCM) and one kept for itself.
Stage 2 `masked_input`: y_u = payload + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^32 over the neighbours whose
shares arrived (they survived stage 1); + when u < v, - when u > v, so each pair cancels in the sum.
Stage 3 `unmask`: for each peer whose shares it holds, the share of b if the peer survived, the share of
s if it dropped, never both. It refuses overlapping lists, a survivor list shorter than t or without
itself, and any second request. Every refusal raises `ProtocolViolation` and ends the client's round.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.secagg import crypto, shamir
from fedtune.secagg.errors import ProtocolViolation
from fedtune.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    ForwardedShares,
    MaskedInput,
    NeighbourKeys,
    PeerKeys,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from fedtune.secagg.params import SecAggParams
from fedtune.secagg.prg import SEED_BYTES, WORD, apply_masks

SEED_SHARE = "seed"
KEY_SHARE = "key"
_DONE = 4
_FAILED = 5


class SecAggClient:
    """One client's state for one round; call the four stages in order, each at most once."""

    def __init__(self, params: SecAggParams, client_id: int) -> None:
        if not 0 <= client_id < 2**32 - 1:
            raise ValueError(f"client id {client_id} must fit in 32 bits")
        self.params = params
        self.client_id = client_id
        self._next = int(Stage.ADVERTISE_KEYS)
        self._enc = crypto.KeyPair.generate()
        self._mask = crypto.KeyPair.generate()
        self._peers: dict[int, PeerKeys] = {}
        self._share_keys: dict[int, bytes] = {}  # AES-GCM key per neighbour, same in both directions
        self._seed = b""
        self._held: dict[int, tuple[int, int]] = {}  # owner -> (seed share, key share), own included
        self._revealed: dict[int, str] = {}

    @property
    def revealed(self) -> Mapping[int, str]:
        """Which kind of share (`"seed"` or `"key"`) this client revealed, per owner."""
        return dict(self._revealed)

    def _fail(self, message: str) -> ProtocolViolation:
        self._next = _FAILED
        return ProtocolViolation(f"client {self.client_id} refuses: {message}")

    @contextmanager
    def _stage(self, stage: Stage, round_id: int, recipient: int) -> Iterator[None]:
        """Check the message's stage, round and recipient; any violation inside ends the client's round."""
        if self._next == _DONE and stage == Stage.UNMASK:
            raise self._fail("a second unmasking request (it answers one per round)")
        if self._next != stage:
            raise self._fail(f"a {stage.label} message out of order")
        if round_id != self.params.round_id:
            raise self._fail(f"a message for round {round_id} during round {self.params.round_id}")
        if recipient != self.client_id:
            raise self._fail(f"a message addressed to client {recipient}")
        try:
            yield
        except ProtocolViolation:
            self._next = _FAILED
            raise

    def _agree(self, private: X25519PrivateKey, peer_key: bytes, purpose: bytes, peer: int) -> bytes:
        return crypto.agree(
            private, peer_key, purpose=purpose, round_id=self.params.round_id, a=self.client_id, b=peer
        )

    def advertise_keys(self) -> AdvertiseKeys:
        with self._stage(Stage.ADVERTISE_KEYS, self.params.round_id, self.client_id):
            self._next = Stage.SHARE_KEYS
            return AdvertiseKeys(self.params.round_id, self.client_id, self._enc.public, self._mask.public)

    def share_keys(self, msg: NeighbourKeys) -> ShareKeys:
        with self._stage(Stage.SHARE_KEYS, msg.round_id, msg.recipient):
            me, t, rnd = self.client_id, self.params.threshold, self.params.round_id
            ids = [p.client_id for p in msg.neighbours]
            if len(set(ids)) != len(ids) or me in ids:
                raise self._fail("a neighbour list with duplicates or itself")
            if len(ids) + 1 < t:
                raise self._fail(f"{len(ids)} neighbours and itself cannot hold {t} shares of its secrets")
            self._peers = {p.client_id: p for p in msg.neighbours}
            self._seed = secrets.token_bytes(SEED_BYTES)
            xs = [me + 1, *(v + 1 for v in ids)]
            seed_shares = shamir.split(int.from_bytes(self._seed, "big"), xs, t)
            key_shares = shamir.split(int.from_bytes(self._mask.private_bytes(), "big"), xs, t)
            self._held[me] = (seed_shares[me + 1], key_shares[me + 1])
            sealed = []
            for v in ids:
                key = self._agree(self._enc.private, self._peers[v].enc_key, crypto.PURPOSE_SHARES, v)
                self._share_keys[v] = key
                plain = shamir.to_bytes(seed_shares[v + 1]) + shamir.to_bytes(key_shares[v + 1])
                box = crypto.seal(key, plain, round_id=rnd, sender=me, receiver=v)
                sealed.append(EncryptedShare(me, v, box))
            self._next = Stage.MASKED_INPUT
            return ShareKeys(rnd, me, tuple(sealed))

    def masked_input(self, msg: ForwardedShares, payload: np.ndarray) -> MaskedInput:
        """Mask `payload` (from `encoding.encode`) with the neighbours whose shares arrived."""
        if payload.dtype != WORD or payload.shape != (self.params.payload_words,):
            raise ValueError(f"the payload must be {self.params.payload_words} little-endian uint32 words")
        with self._stage(Stage.MASKED_INPUT, msg.round_id, msg.recipient):
            me, rnd = self.client_id, self.params.round_id
            senders = [s.sender for s in msg.shares]
            if len(set(senders)) != len(senders) or not set(senders) <= self._peers.keys():
                raise self._fail("shares from duplicate senders or from clients that are not its neighbours")
            for share in msg.shares:
                if share.receiver != me:
                    raise self._fail(f"a share addressed to client {share.receiver}")
                key = self._share_keys[share.sender]
                plain = crypto.open_sealed(key, share.sealed, round_id=rnd, sender=share.sender, receiver=me)
                self._held[share.sender] = self._parse_shares(share.sender, plain)
            plus, minus = [self._seed], []
            for v in senders:
                pair_seed = self._agree(self._mask.private, self._peers[v].mask_key, crypto.PURPOSE_MASK, v)
                (plus if me < v else minus).append(pair_seed)
            words = np.array(payload, dtype=WORD, copy=True)
            apply_masks(words, add=plus, subtract=minus)
            self._next = Stage.UNMASK
            return MaskedInput(rnd, me, words)

    def _parse_shares(self, sender: int, plain: bytes) -> tuple[int, int]:
        half = shamir.SHARE_BYTES
        try:
            if len(plain) != 2 * half:
                raise ValueError("wrong length")
            return shamir.from_bytes(plain[:half]), shamir.from_bytes(plain[half:])
        except ValueError as err:
            raise self._fail(f"malformed shares from client {sender}") from err

    def unmask(self, msg: UnmaskRequest) -> UnmaskResponse:
        with self._stage(Stage.UNMASK, msg.round_id, msg.recipient):
            survivors, dropped = set(msg.survivors), set(msg.dropped)
            if len(survivors) != len(msg.survivors) or len(dropped) != len(msg.dropped):
                raise self._fail("survivor or dropout lists with duplicates")
            if survivors & dropped:
                both = sorted(survivors & dropped)
                raise self._fail(f"clients {both} listed both as survivors and as dropped")
            if len(survivors) < self.params.threshold:
                raise self._fail(f"{len(survivors)} survivors, below the threshold {self.params.threshold}")
            if self.client_id not in survivors:
                raise self._fail("a survivor list without itself")
            seed_shares, key_shares = [], []
            for owner, (seed_share, key_share) in sorted(self._held.items()):
                if owner in survivors:
                    seed_shares.append((owner, seed_share))
                    self._revealed[owner] = SEED_SHARE
                elif owner in dropped:
                    key_shares.append((owner, key_share))
                    self._revealed[owner] = KEY_SHARE
            self._next = _DONE
            return UnmaskResponse(self.params.round_id, self.client_id, tuple(seed_shares), tuple(key_shares))
