"""One SecAgg+ round over the network, client side: the simulation's `SecAggClient` driven by calls.

Stages 0 and 1 (keys, then sealed shares) run before the client trains, as in simulation; `mask` encodes
and masks the trained update for stage 2, which travels as an update (`ENCODING_MASKED`); `unmask` answers
stage 3. Between stages the client polls; the server answers Wait while a stage is open and Done when this
client has been left out or the round aborted, after which the client simply waits for the next round.
Stochastic rounding draws from a stream named by the round and the client's index, as everything else.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedtune.deploy.secure import params_from_setup
from fedtune.secagg import SecAggClient, Stage
from fedtune.secagg.encoding import encode
from fedtune.secagg.messages import ForwardedShares
from fedtune.seeding import numpy_rng
from fedtune.transport import fedtune_v1_pb2 as pb
from fedtune.transport import secagg_wire as sw

CALL_TIMEOUT_S = 120.0


class SecureParticipant:
    def __init__(self, stub: object, session: bytes, task: pb.Task, seed: int) -> None:
        self.stub = stub
        self.session = session
        self.round_num = int(task.round)
        self.nonce = task.nonce
        self.slot = int(task.secagg.slot)
        self.params = params_from_setup(task.secagg, self.round_num)
        self.client = SecAggClient(self.params, self.slot)
        self.rng = numpy_rng(seed, "secagg-rounding", self.round_num, int(task.client_index))
        self.forwarded: ForwardedShares | None = None
        self.left_out: str | None = None

    @property
    def max_weight(self) -> int:
        return self.params.encoding.max_weight

    def _call(self, **stage: object) -> pb.SecAggReply:
        request = pb.SecAggRequest(session=self.session, round=self.round_num, nonce=self.nonce, **stage)
        reply = self.stub.secagg(request.SerializeToString(), timeout=CALL_TIMEOUT_S)  # type: ignore[attr-defined]
        return pb.SecAggReply.FromString(reply)

    def _poll(self, stage: Stage) -> pb.SecAggReply | None:
        """The server's message that opens `stage`, or None (with `left_out` set) when told Done."""
        while True:
            reply = self._call(poll=pb.Poll(stage=int(stage)))
            kind = reply.WhichOneof("kind")
            if kind == "done":
                self.left_out = reply.done.reason
                return None
            if kind != "wait":
                return reply
            time.sleep(reply.wait.retry_after_ms / 1000)

    def share_keys(self) -> bool:
        """Stages 0 and 1; False when the client is out of this round's secure sum."""
        self._call(advertise=sw.advertise_to_pb(self.client.advertise_keys()))
        reply = self._poll(Stage.SHARE_KEYS)
        if reply is None:
            return False
        keys = sw.neighbour_keys_from_pb(reply.neighbour_keys, self.round_num, self.slot)
        self._call(share=sw.share_keys_to_pb(self.client.share_keys(keys)))
        reply = self._poll(Stage.MASKED_INPUT)
        if reply is None:
            return False
        self.forwarded = sw.forwarded_from_pb(reply.forwarded, self.round_num, self.slot)
        return True

    def mask(self, vector: torch.Tensor, weight: int) -> np.ndarray:
        """Stage 2: the fixed-point encoded, weighted, masked update (uint32 words)."""
        if self.forwarded is None:
            raise RuntimeError("mask() before the shares were exchanged")
        payload = encode(vector.numpy().astype(np.float32), weight, self.params.encoding, self.rng)
        return self.client.masked_input(self.forwarded, payload).words

    def unmask(self) -> None:
        """Stage 3: reveal the shares the server asks for (if this client's input is in the sum)."""
        reply = self._poll(Stage.UNMASK)
        if reply is None:
            return
        request = sw.unmask_request_from_pb(reply.unmask_request, self.round_num, self.slot)
        self._call(unmask=sw.unmask_to_pb(self.client.unmask(request)))
