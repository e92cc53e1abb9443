"""A client's side of a round, the same code in simulation and at a deployed site.

`Participant.respond(message)` answers whatever the engine sent through the transport:
- `TrainRequest`: train from the task's adapter (the `Trainer`), encode (`encode.encode_update`) -> a
  `Submission`;
- `SecureTrainRequest`: start this round's SecAgg+ client -> its `AdvertiseKeys`; `NeighbourKeys` ->
  `ShareKeys`; `ForwardedShares` -> train, encode, fixed-point, noise share, mask -> a masked `Submission`;
  `UnmaskRequest` -> `UnmaskResponse`;
- `EvalRequest`: the adapter's summed loss on the client's held-out data -> an `EvalReport`.

Every random stream a client draws from is named by the run seed, the round and its population index, so
a client trains and encodes the same update in simulation and at its site: batch order and dropout
(`train`), stochastic quantization (`compress`), fixed-point rounding (`secagg-rounding`). What it keeps
between rounds (error-feedback residual, DP-SGD steps, SCAFFOLD's control c_i) is in its `ClientStateStore`.
Under SCAFFOLD (`round.scaffold`) it trains with the correction c - c_i, takes c_i+ from the trainer's
mean raw gradient (or option II's formula when the trainer reports none), and encodes
[delta, s * Delta c_i] as one vector. Under FedNova (`normalize_steps`) the update it encodes is its delta
per local step; a client of a lower rank than the adapter's (`spec.rank`) trains the first components of
the global adapter, zero-padded (HetLoRA, FlexLoRA). With `[personalize]` (`round.personal`) it keeps a
personal adapter in its state: under ditto it trains it after the round's update, under split it trains
from the global A and its own B and sends A's delta only; the run's last evaluation makes (finetune, or a
client that has none yet) and evaluates it, and hands it to `keep_personal` (the simulation's run
directory, a site's folder), never to the transport.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from fedtune.data import ClientData
from fedtune.errors import FedtuneError
from fedtune.evaluate import ClientNll, client_nll
from fedtune.privacy.noise import skellam
from fedtune.round.encode import Masking, encode_update
from fedtune.round.messages import (
    ClientReport,
    EvalReport,
    EvalRequest,
    SecureTrainRequest,
    Submission,
    TrainRequest,
    TrainTask,
)
from fedtune.round.personal import compose
from fedtune.round.plan import LocalWork, Member, ParticipantSpec
from fedtune.round.scaffold import client_step, client_step_from_gradients, correction, pack
from fedtune.round.state import ClientState, ClientStateStore
from fedtune.secagg import SecAggClient
from fedtune.secagg.messages import (
    AdvertiseKeys,
    ForwardedShares,
    NeighbourKeys,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedtune.seeding import derive_seed, numpy_rng, torch_generator
from fedtune.train.local import ClientUpdate, LocalModel, LocalTrainer, Trainer


class ParticipantError(FedtuneError):
    """A message this participant cannot answer (out of order, or for another round)."""


class _SecureRound:
    """What a participant keeps during one secure round."""

    def __init__(self, request: SecureTrainRequest) -> None:
        self.request = request
        self.client = SecAggClient(request.params, request.member.slot)


class Participant:
    def __init__(
        self,
        data: ClientData,
        local: LocalModel,
        trainer: Trainer,
        states: ClientStateStore,
        spec: ParticipantSpec,
        *,
        noise_rng: np.random.Generator | None = None,
        on_step: Callable[[float], None] = lambda _loss: None,
        personal_trainer: LocalTrainer | None = None,
        keep_personal: Callable[[str, torch.Tensor], None] = lambda _client, _flat: None,
    ) -> None:
        """`noise_rng` draws distributed-DP noise shares: from the OS (`privacy.noise.os_entropy_rng`).
        `personal_trainer` trains the personal adapter (with `[personalize]`; Ditto's has its pull as the
        proximal term); `keep_personal(client_id, flat)` is given the personal adapter it ends with."""
        if spec.personal is not None and personal_trainer is None:
            raise ValueError("[personalize] needs a trainer for the personal adapter")
        self.data = data
        self.local = local
        self.trainer = trainer
        self.states = states
        self.spec = spec
        self.noise_rng = noise_rng
        self.on_step = on_step
        self.personal_trainer = personal_trainer
        self.keep_personal = keep_personal
        self._secure: _SecureRound | None = None
        self._rank_mask: torch.Tensor | None = None

    @property
    def client_id(self) -> str:
        return self.data.client_id

    def respond(self, message: object) -> object:
        if isinstance(message, TrainRequest):
            return self.train(message.task, message.member)
        if isinstance(message, EvalRequest):
            return self.evaluate(message)
        if isinstance(message, SecureTrainRequest):
            return self.advertise_keys(message)
        if isinstance(message, NeighbourKeys):
            return self.share_keys(message)
        if isinstance(message, ForwardedShares):
            return self.masked_input(message)
        if isinstance(message, UnmaskRequest):
            return self.unmask(message)
        raise ParticipantError(f"a participant cannot answer a {type(message).__name__}")

    # ---- plain rounds ------------------------------------------------------------------------------

    def train(
        self, task: TrainTask, member: Member, masking: Callable[[int], Masking] | None = None
    ) -> Submission:
        """Train from the task's adapter and encode the update; `masking(weight)` makes it a masked input."""
        seed, spec = self.spec.seed, self.spec
        state = self.states.begin(self.client_id, task.round_num)
        if (task.control is None) != (spec.control is None):
            raise ParticipantError("SCAFFOLD is on at one end only: the task and the run's config disagree")
        scaffold = {} if task.control is None else {"correction": correction(task.control, state.control)}
        start, split = self._start(task.global_flat), self._method() == "split"
        if split and state.personal is not None:  # the global A with this client's own B
            start = compose(start, state.personal, self._split_mask())
        update = self.trainer.train(
            start,
            self.data,
            seed=derive_seed(seed, "train", task.round_num, member.index),
            steps=spec.work.steps,
            epochs=spec.work.epochs,
            on_step=self.on_step,
            **scaffold,
        )
        steps = state.dpsgd_steps + update.num_steps
        report = self._report(update, steps)
        if update.delta is None:
            self.states.commit(self.client_id, task.round_num, replace(state, dpsgd_steps=steps))
            return Submission(report, None)
        delta = update.delta / update.num_steps if spec.normalize_steps else update.delta
        vector, control = delta, state.control
        if task.control is not None and spec.control is not None:  # SCAFFOLD: [delta, s * Delta c_i]
            if update.mean_gradient is not None:
                step = client_step_from_gradients(update.mean_gradient, state.control)
            else:
                step = client_step(
                    update.delta, task.control, state.control, steps=update.num_steps, lr=spec.control.lr
                )
            vector, control = pack(update.delta, step.delta, spec.control.scale), step.control
        if self._rank_mask is not None and masking is None:
            vector = vector[self._rank_mask]  # a lower rank sends its components only (all secure inputs
            # cover every coordinate, so a secure round sends the zeros too)
        personal = state.personal
        if split:  # A's delta travels; the trained B stays here, in the personal adapter
            vector, personal = vector[self._split_mask()], start + update.delta
        elif self._method() == "ditto":
            personal = self._ditto(task, member, state.personal)
        encoded = encode_update(
            vector,
            spec.compression,
            generator=torch_generator(seed, "compress", task.round_num, member.index),
            residual=state.residual,
            clip_l2_norm=task.clip_l2_norm,
            shared_seed=task.shared_seed,
            masking=None if masking is None else masking(spec.weights.of(update.num_examples)),
        )
        state = ClientState(encoded.residual, steps, control, personal)
        self.states.commit(self.client_id, task.round_num, state)
        return Submission(replace(report, fits_clip=encoded.fits_clip), encoded.update)

    # ---- personal adapters -------------------------------------------------------------------------

    def _method(self) -> str:
        return "none" if self.spec.personal is None else self.spec.personal.method

    def _split_mask(self) -> torch.Tensor:
        return self.local.adapter.layout.a_mask

    def _ditto(self, task: TrainTask, member: Member, personal: torch.Tensor | None) -> torch.Tensor:
        """Ditto: the personal adapter's local steps, pulled toward the round's global adapter."""
        start = task.global_flat if personal is None else personal
        seed = derive_seed(self.spec.seed, "ditto", task.round_num, member.index)
        return self._personal_steps(start, task.global_flat, seed, self.spec.work)

    def _personal_steps(
        self, start: torch.Tensor, anchor: torch.Tensor, seed: int, work: LocalWork
    ) -> torch.Tensor:
        """`start` after the personal trainer's steps on this client's data (as it was, if the trainer
        refused: a non-finite loss leaves the personal adapter where it was)."""
        assert self.personal_trainer is not None
        update = self.personal_trainer.train(
            start, self.data, seed=seed, steps=work.steps, epochs=work.epochs, anchor=anchor
        )
        return start.clone() if update.delta is None else start + update.delta

    def personal_adapter(self, request: EvalRequest) -> torch.Tensor:
        """The client's personal adapter at the run's end: split's global A with its own B, ditto's own,
        or (finetune, or a client without one yet) the global adapter after `personalize.steps` steps."""
        spec = self.spec.personal
        if spec is None:
            raise ParticipantError("asked for a personal adapter, but personalize.method is 'none'")
        kept = self.states.get(self.client_id).personal
        if kept is not None and spec.method == "split":
            return compose(request.global_flat, kept, self._split_mask())
        if kept is not None and spec.method == "ditto":
            return kept
        if spec.steps == 0:
            return request.global_flat.clone()
        seed = derive_seed(self.spec.seed, "personalize", request.round_num, request.member.index)
        return self._personal_steps(
            request.global_flat, request.global_flat, seed, LocalWork(steps=spec.steps)
        )

    def _start(self, global_flat: torch.Tensor) -> torch.Tensor:
        """Where training starts: the global adapter, or its first `spec.rank` components (zero-padded:
        past them both A rows and B columns are zero, so their gradients are zero and they stay so). The
        delta is then from that start, zero past the rank."""
        rank, layout = self.spec.rank, self.local.adapter.layout
        if rank is None or rank == min(layout.ranks):
            return global_flat
        if rank > min(layout.ranks):
            raise ParticipantError(f"client rank {rank} exceeds the adapter's rank {min(layout.ranks)}")
        if self._rank_mask is None:
            self._rank_mask = layout.rank_mask(rank)
        return global_flat * self._rank_mask

    def _report(self, update: ClientUpdate, dpsgd_steps: int) -> ClientReport:
        dpsgd = self.spec.dpsgd
        return ClientReport(
            client_id=self.client_id,
            num_examples=update.num_examples,
            num_steps=update.num_steps,
            train_loss=update.train_loss,
            error=update.error,
            dpsgd_epsilon=None if dpsgd is None else dpsgd.epsilon(update.num_examples, dpsgd_steps),
        )

    def evaluate(self, request: EvalRequest) -> EvalReport:
        """The global adapter's summed loss on the held-out data; with `personalize`, the personal
        adapter's too (made now when it must be, and handed to `keep_personal`)."""
        personal_nll = None
        if request.personalize:
            personal = self.personal_adapter(request)
            personal_nll = self._nll(personal).nll
            self.keep_personal(self.client_id, personal)
        result = self._nll(request.global_flat)
        return EvalReport(self.client_id, result.nll, result.tokens, personal_nll)

    def _nll(self, flat: torch.Tensor) -> ClientNll:
        self.local.adapter.load(flat)
        return client_nll(
            self.local.model,
            self.data,
            max_examples=self.spec.eval_examples,
            batch_size=self.spec.eval_batch_size,
            pad_id=self.local.pad_id,
        )

    # ---- secure rounds -----------------------------------------------------------------------------

    def advertise_keys(self, request: SecureTrainRequest) -> AdvertiseKeys:
        self._secure = _SecureRound(request)
        return self._secure.client.advertise_keys()

    def _open(self, round_id: int) -> _SecureRound:
        secure = self._secure
        if secure is None or secure.request.params.round_id != round_id:
            raise ParticipantError(
                f"a secure aggregation message for round {round_id}, which this client is not in"
            )
        return secure

    def share_keys(self, message: NeighbourKeys) -> ShareKeys:
        return self._open(message.round_id).client.share_keys(message)

    def masked_input(self, message: ForwardedShares) -> Submission:
        secure = self._open(message.round_id)
        request = secure.request
        params, member = request.params, request.member

        def masking(weight: int) -> Masking:
            noise = None
            if request.noise_variance > 0:
                if self.noise_rng is None:
                    raise ParticipantError("distributed DP needs a generator for the noise share")
                noise = skellam(params.vector_size, request.noise_variance, self.noise_rng)
            return Masking(
                encoding=params.encoding,
                weight=weight,
                rounding=numpy_rng(self.spec.seed, "secagg-rounding", request.task.round_num, member.index),
                mask=lambda words: secure.client.masked_input(message, words).words,
                noise_share=noise,
            )

        return self.train(request.task, member, masking)

    def unmask(self, message: UnmaskRequest) -> UnmaskResponse:
        response = self._open(message.round_id).client.unmask(message)
        self._secure = None
        return response
