"""SecAgg+ messages to and from protobuf: pure conversions, every bound checked on the way in.

The protocol's dataclasses (`fedtune.secagg.messages`) name their round and peer; on the wire the round and
nonce travel in the request and the peer is the caller's slot, so the conversions take them as arguments.
Shamir shares travel as big-endian bytes of at most `SHARE_BYTES`; public keys must be 32 bytes. A message
that breaks a bound is a `Refusal`; one the protocol refuses is the state machine's `ProtocolViolation`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedtune.errors import Refusal
from fedtune.secagg import FixedPoint, SecAggParams
from fedtune.secagg import messages as sa
from fedtune.secagg.shamir import SHARE_BYTES
from fedtune.transport import fedtune_v2_pb2 as pb

KEY_BYTES = sa.PUBLIC_KEY_BYTES


def _key(data: bytes, what: str) -> bytes:
    if len(data) != KEY_BYTES:
        raise Refusal("malformed", f"{what} has {len(data)} bytes, expected {KEY_BYTES}")
    return bytes(data)


def _share_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def _share_int(data: bytes) -> int:
    if not 0 < len(data) <= SHARE_BYTES:
        raise Refusal("malformed", f"a Shamir share has {len(data)} bytes, at most {SHARE_BYTES} allowed")
    return int.from_bytes(data, "big")


def _sealed_out(shares: Iterable[sa.EncryptedShare]) -> list[pb.SealedShare]:
    return [pb.SealedShare(sender=s.sender, receiver=s.receiver, sealed=s.sealed) for s in shares]


def _sealed_in(shares: Iterable[pb.SealedShare]) -> tuple[sa.EncryptedShare, ...]:
    return tuple(sa.EncryptedShare(s.sender, s.receiver, bytes(s.sealed)) for s in shares)


# ---- client -> server -----------------------------------------------------------------------------------


def advertise_to_pb(msg: sa.AdvertiseKeys) -> pb.AdvertiseKeys:
    return pb.AdvertiseKeys(enc_key=msg.enc_key, mask_key=msg.mask_key)


def advertise_from_pb(msg: pb.AdvertiseKeys, round_id: int, sender: int) -> sa.AdvertiseKeys:
    return sa.AdvertiseKeys(round_id, sender, _key(msg.enc_key, "enc_key"), _key(msg.mask_key, "mask_key"))


def share_keys_to_pb(msg: sa.ShareKeys) -> pb.ShareKeys:
    return pb.ShareKeys(shares=_sealed_out(msg.shares))


def share_keys_from_pb(msg: pb.ShareKeys, round_id: int, sender: int) -> sa.ShareKeys:
    return sa.ShareKeys(round_id, sender, _sealed_in(msg.shares))


def unmask_to_pb(msg: sa.UnmaskResponse) -> pb.Unmask:
    return pb.Unmask(
        seed_shares=[pb.OwnerShare(owner=o, share=_share_bytes(v)) for o, v in msg.seed_shares],
        key_shares=[pb.OwnerShare(owner=o, share=_share_bytes(v)) for o, v in msg.key_shares],
    )


def unmask_from_pb(msg: pb.Unmask, round_id: int, sender: int) -> sa.UnmaskResponse:
    return sa.UnmaskResponse(
        round_id,
        sender,
        tuple((s.owner, _share_int(s.share)) for s in msg.seed_shares),
        tuple((s.owner, _share_int(s.share)) for s in msg.key_shares),
    )


def masked_input_from_words(
    data: bytes | bytearray, words: int, round_id: int, sender: int
) -> sa.MaskedInput:
    """A masked payload from its little-endian uint32 bytes, which must hold exactly `words` words."""
    if len(data) != 4 * words:
        raise Refusal("wrong_shape", f"a masked input has {len(data)} bytes, expected {words} uint32 words")
    values = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    return sa.MaskedInput(round_id, sender, values)


# ---- server -> client -----------------------------------------------------------------------------------


def neighbour_keys_to_pb(msg: sa.NeighbourKeys) -> pb.SecAggReply:
    peers = [pb.PeerKeys(client=p.client_id, enc_key=p.enc_key, mask_key=p.mask_key) for p in msg.neighbours]
    return pb.SecAggReply(neighbour_keys=pb.NeighbourKeys(neighbours=peers))


def neighbour_keys_from_pb(msg: pb.NeighbourKeys, round_id: int, recipient: int) -> sa.NeighbourKeys:
    peers = tuple(
        sa.PeerKeys(p.client, _key(p.enc_key, "enc_key"), _key(p.mask_key, "mask_key"))
        for p in msg.neighbours
    )
    return sa.NeighbourKeys(round_id, recipient, peers)


def forwarded_to_pb(msg: sa.ForwardedShares) -> pb.SecAggReply:
    return pb.SecAggReply(forwarded=pb.ForwardedShares(shares=_sealed_out(msg.shares)))


def forwarded_from_pb(msg: pb.ForwardedShares, round_id: int, recipient: int) -> sa.ForwardedShares:
    return sa.ForwardedShares(round_id, recipient, _sealed_in(msg.shares))


def unmask_request_to_pb(msg: sa.UnmaskRequest) -> pb.SecAggReply:
    return pb.SecAggReply(
        unmask_request=pb.UnmaskRequest(survivors=list(msg.survivors), dropped=list(msg.dropped))
    )


def unmask_request_from_pb(msg: pb.UnmaskRequest, round_id: int, recipient: int) -> sa.UnmaskRequest:
    return sa.UnmaskRequest(round_id, recipient, tuple(msg.survivors), tuple(msg.dropped))


def to_reply(msg: object) -> pb.SecAggReply:
    """A server-to-client protocol message as the reply to a poll."""
    if isinstance(msg, sa.NeighbourKeys):
        return neighbour_keys_to_pb(msg)
    if isinstance(msg, sa.ForwardedShares):
        return forwarded_to_pb(msg)
    if isinstance(msg, sa.UnmaskRequest):
        return unmask_request_to_pb(msg)
    raise TypeError(f"not a server-to-client SecAgg message: {type(msg).__name__}")


# ---- the round's public parameters ------------------------------------------------------------------------


def setup_to_pb(params: SecAggParams, slot: int, noise_variance: float) -> pb.SecAggSetup:
    spec = params.encoding
    return pb.SecAggSetup(
        slot=slot,
        cohort=spec.max_clients,
        threshold=params.threshold,
        neighbours=params.neighbours,
        bits=spec.bits,
        clip_range=spec.clip_range,
        max_weight=spec.max_weight,
        vector_size=params.vector_size,
        noise_variance=noise_variance,
    )


def params_from_pb(setup: pb.SecAggSetup, round_num: int) -> SecAggParams:
    """The client's copy of the round's parameters, from its task."""
    spec = FixedPoint(int(setup.bits), float(setup.clip_range), int(setup.max_weight), int(setup.cohort))
    return SecAggParams(round_num, int(setup.vector_size), int(setup.threshold), int(setup.neighbours), spec)
