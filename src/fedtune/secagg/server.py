"""The server's side of SecAgg+, as a state machine over messages: pure, no I/O.

For each stage the server takes messages one at a time (`receive_*`) and then closes the stage
(`close_*`), which returns the next messages to send, keyed by recipient. It tracks who survived each
stage: U0 advertised keys, U1 shared keys, U2 sent a masked input (their payloads make the sum), U3
answered the unmasking request. The neighbour graph is drawn over U0, so clients that never show up cost
nothing. After stage 1, clients whose surviving neighbours plus themselves are fewer than t are left out
(repeatedly, until none is): their secrets could never be reconstructed. Fewer than t clients at any stage
ends the round with `SecAggAbort`, naming the stage and the counts.

`finish` reconstructs each needed secret from exactly t shares: the self-mask seeds of U2, and the mask
keys of the clients in U1 - U2 (each checked against the public key it advertised). It subtracts the
survivors' self masks and regenerates only the pairwise masks between dropped clients and their surviving
neighbours. A refused message (`ProtocolViolation`: another round, a stranger, a duplicate, a closed
stage, a share about a client it cannot hold) leaves the state unchanged, so a transport can drop it and
treat its sender as dropped. The server is trusted to follow the protocol (semi-honest); it learns the
sum of U2's payloads and nothing else the clients did not reveal.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import numpy as np

from fedtune.secagg import crypto, shamir
from fedtune.secagg.errors import ProtocolViolation, SecAggAbort
from fedtune.secagg.graph import effective_neighbours, neighbour_graph
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

_DONE = 4
_FAILED = 5


@dataclass(frozen=True, eq=False)
class UnmaskedSum:
    """The round's outcome: the sum of U2's payloads mod 2^32, who is in it, and who survived each stage."""

    words: np.ndarray
    survivors: tuple[int, ...]
    survivors_per_stage: tuple[int, ...]  # |U0|, |U1|, |U2|, |U3|
    excluded: tuple[int, ...]  # shared keys, but too few of their neighbours did: left out after stage 1
    neighbours: int  # the graph's degree k


class SecAggServer:
    """The server's state for one round over `client_ids`."""

    def __init__(
        self, params: SecAggParams, client_ids: Iterable[int], *, graph_seed: bytes | None = None
    ) -> None:
        self.params = params
        self._invited = frozenset(client_ids)
        self._graph_seed = graph_seed
        self._stage = int(Stage.ADVERTISE_KEYS)
        self._counts: list[int] = []
        self._keys: dict[int, AdvertiseKeys] = {}
        self._graph: dict[int, frozenset[int]] = {}
        self._sealed: dict[int, dict[int, EncryptedShare]] = {}  # sender -> receiver -> share
        self._u1: frozenset[int] = frozenset()
        self._excluded: tuple[int, ...] = ()
        self._sum = np.zeros(params.payload_words, dtype=WORD)
        self._u2: list[int] = []
        self._dropped: frozenset[int] = frozenset()
        self._answered: set[int] = set()
        self._seed_shares: dict[int, list[tuple[int, int]]] = {}
        self._key_shares: dict[int, list[tuple[int, int]]] = {}

    @property
    def survivors_per_stage(self) -> tuple[int, ...]:
        return tuple(self._counts)

    # -- checks --------------------------------------------------------------------------------------

    def _require(self, stage: Stage, what: str) -> None:
        if self._stage != stage:
            raise ProtocolViolation(f"{what} outside the {stage.label} stage")

    def _accept(
        self, stage: Stage, round_id: int, sender: int, allowed: Collection[int], seen: Collection[int]
    ) -> None:
        self._require(stage, f"{stage.label} message from client {sender}")
        if round_id != self.params.round_id:
            raise ProtocolViolation(
                f"{stage.label} message from client {sender} for round {round_id}, "
                f"this is round {self.params.round_id}"
            )
        if sender not in allowed:
            raise ProtocolViolation(f"{stage.label} message from client {sender}, not expected at this stage")
        if sender in seen:
            raise ProtocolViolation(f"second {stage.label} message from client {sender}")

    def _abort(self, stage: Stage, reason: str) -> SecAggAbort:
        self._stage = _FAILED
        return SecAggAbort(stage.label, reason, self.survivors_per_stage)

    def _enough(self, stage: Stage, count: int, what: str) -> None:
        self._counts.append(count)
        if count < self.params.threshold:
            raise self._abort(stage, f"only {count} clients {what}; the threshold is {self.params.threshold}")

    # -- stage 0: advertise keys ---------------------------------------------------------------------

    def receive_keys(self, msg: AdvertiseKeys) -> None:
        self._accept(Stage.ADVERTISE_KEYS, msg.round_id, msg.sender, self._invited, self._keys)
        if len(msg.enc_key) != crypto.KEY_BYTES or len(msg.mask_key) != crypto.KEY_BYTES:
            raise ProtocolViolation(f"client {msg.sender} advertised a public key of the wrong length")
        self._keys[msg.sender] = msg

    def close_advertise(self) -> dict[int, NeighbourKeys]:
        """Draw the neighbour graph over the clients that advertised keys; send each its neighbours' keys."""
        self._require(Stage.ADVERTISE_KEYS, "closing advertise_keys")
        u0 = sorted(self._keys)
        self._enough(Stage.ADVERTISE_KEYS, len(u0), "advertised keys")
        self._graph = neighbour_graph(u0, self.params.neighbours, self._graph_seed)
        self._stage = Stage.SHARE_KEYS
        rnd = self.params.round_id
        return {
            u: NeighbourKeys(
                rnd,
                u,
                tuple(
                    PeerKeys(v, self._keys[v].enc_key, self._keys[v].mask_key) for v in sorted(self._graph[u])
                ),
            )
            for u in u0
        }

    # -- stage 1: share keys -------------------------------------------------------------------------

    def receive_shares(self, msg: ShareKeys) -> None:
        self._accept(Stage.SHARE_KEYS, msg.round_id, msg.sender, self._graph, self._sealed)
        by_receiver = {s.receiver: s for s in msg.shares}
        if any(s.sender != msg.sender for s in msg.shares) or len(by_receiver) != len(msg.shares):
            raise ProtocolViolation(f"client {msg.sender} sent shares with a wrong sender or duplicates")
        if by_receiver.keys() != self._graph[msg.sender]:
            raise ProtocolViolation(f"client {msg.sender} did not send one share to each of its neighbours")
        self._sealed[msg.sender] = by_receiver

    def close_share_keys(self) -> dict[int, ForwardedShares]:
        """Forward to each client the shares its surviving neighbours sealed to it."""
        self._require(Stage.SHARE_KEYS, "closing share_keys")
        t = self.params.threshold
        u1 = set(self._sealed)
        excluded = []
        changed = True
        while changed:  # leave out clients whose secrets too few survivors hold, until none is left
            changed = False
            for u in sorted(u1):
                if len(self._graph[u] & u1) + 1 < t:
                    u1.discard(u)
                    excluded.append(u)
                    changed = True
        self._excluded = tuple(excluded)
        self._u1 = frozenset(u1)
        self._counts.append(len(self._sealed))
        if len(u1) < t:
            shared = len(self._sealed)
            reason = f"only {shared} clients shared keys"
            if shared >= t:
                reason = f"{shared} clients shared keys, {len(u1)} with {t - 1} or more surviving neighbours"
            raise self._abort(Stage.SHARE_KEYS, f"{reason}; the threshold is {t}")
        self._stage = Stage.MASKED_INPUT
        rnd = self.params.round_id
        return {
            v: ForwardedShares(rnd, v, tuple(self._sealed[u][v] for u in sorted(self._graph[v] & u1)))
            for v in sorted(u1)
        }

    # -- stage 2: masked input -----------------------------------------------------------------------

    def receive_masked_input(self, msg: MaskedInput) -> None:
        """Add a masked payload to the running sum (memory stays one payload, whatever the clients)."""
        self._accept(Stage.MASKED_INPUT, msg.round_id, msg.sender, self._u1, self._u2)
        words = msg.words
        if words.dtype != WORD or words.shape != (self.params.payload_words,):
            raise ProtocolViolation(
                f"client {msg.sender} sent a masked input that is not "
                f"{self.params.payload_words} uint32 words"
            )
        np.add(self._sum, words, out=self._sum)
        self._u2.append(msg.sender)

    def close_masked_input(self) -> dict[int, UnmaskRequest]:
        """Ask each survivor to unmask: who is in the sum, and who dropped after sharing."""
        self._require(Stage.MASKED_INPUT, "closing masked_input")
        u2 = tuple(sorted(self._u2))
        self._enough(Stage.MASKED_INPUT, len(u2), "sent a masked input")
        self._dropped = self._u1 - set(u2)
        dropped = tuple(sorted(self._dropped))
        self._seed_shares = {u: [] for u in u2}
        self._key_shares = {d: [] for d in dropped}
        self._stage = Stage.UNMASK
        return {v: UnmaskRequest(self.params.round_id, v, u2, dropped) for v in u2}

    # -- stage 3: unmask -----------------------------------------------------------------------------

    def receive_unmask(self, msg: UnmaskResponse) -> None:
        self._accept(Stage.UNMASK, msg.round_id, msg.sender, self._seed_shares, self._answered)
        holds = self._graph[msg.sender] | {msg.sender}
        seeds = [owner for owner, _ in msg.seed_shares]
        keys = [owner for owner, _ in msg.key_shares]
        if len(set(seeds + keys)) != len(seeds) + len(keys):
            raise ProtocolViolation(f"client {msg.sender} revealed two shares for the same client")
        if not set(seeds) <= holds & self._seed_shares.keys() or not set(keys) <= holds & self._dropped:
            raise ProtocolViolation(
                f"client {msg.sender} revealed shares it cannot hold or that were not asked"
            )
        x = msg.sender + 1
        for owner, value in msg.seed_shares:
            self._seed_shares[owner].append((x, value))
        for owner, value in msg.key_shares:
            self._key_shares[owner].append((x, value))
        self._answered.add(msg.sender)

    def finish(self) -> UnmaskedSum:
        """Reconstruct from exactly t shares each, remove the masks, and return the sum of U2's payloads."""
        self._require(Stage.UNMASK, "finishing")
        t, rnd = self.params.threshold, self.params.round_id
        self._enough(Stage.UNMASK, len(self._answered), "answered the unmasking request")
        for owners, what in (
            (self._seed_shares, "self-mask seed"),
            (self._key_shares, "mask key (it dropped)"),
        ):
            for owner, shares in owners.items():
                if len(shares) < t:
                    raise self._abort(
                        Stage.UNMASK,
                        f"client {owner}'s {what} has {len(shares)} shares from the clients that answered, "
                        f"{t} are needed (too many of its neighbours dropped)",
                    )
        total = self._sum
        seeds = [self._secret_bytes(owner, shares) for owner, shares in self._seed_shares.items()]
        apply_masks(total, subtract=seeds)
        plus, minus = [], []
        survivors = set(self._u2)
        for d, shares in self._key_shares.items():
            pair = crypto.KeyPair.from_private_bytes(self._secret_bytes(d, shares))
            if pair.public != self._keys[d].mask_key:
                raise self._abort(
                    Stage.UNMASK, f"the shares of client {d}'s mask key do not match its public key"
                )
            for v in sorted(self._graph[d] & survivors):
                seed = crypto.agree(
                    pair.private, self._keys[v].mask_key, purpose=crypto.PURPOSE_MASK, round_id=rnd, a=d, b=v
                )
                (minus if v < d else plus).append(seed)  # v added +mask when v < d
        apply_masks(total, add=plus, subtract=minus)
        self._stage = _DONE
        return UnmaskedSum(
            words=total,
            survivors=tuple(sorted(self._u2)),
            survivors_per_stage=self.survivors_per_stage,
            excluded=self._excluded,
            neighbours=effective_neighbours(self.params.neighbours, len(self._keys)),
        )

    def _secret_bytes(self, owner: int, shares: list[tuple[int, int]]) -> bytes:
        secret = shamir.reconstruct(sorted(shares)[: self.params.threshold])
        if secret >= 2 ** (8 * SEED_BYTES):
            raise self._abort(
                Stage.UNMASK, f"the shares of client {owner}'s secret do not reconstruct a 256-bit value"
            )
        return secret.to_bytes(SEED_BYTES, "big")
