"""Client local training: start from the global adapter, take AdamW steps on local data, return the delta.

The trainer holds no per-client state: it borrows the one shared model, loads the global adapter into it,
trains, and hands back `local - global`. A non-finite loss or delta refuses the update with a reason
instead of letting it into the aggregate. `Trainer` is the extension point: `LocalTrainer` here,
`train.dpsgd.DpSgdTrainer` for sample-level DP, or a user's own; the round engine's participant calls it
the same way in simulation and at a deployed site. With `train.proximal_mu > 0` the local objective gains
FedProx's proximal term, which holds the client's adapter near the global one it started from (or near an
`anchor`: Ditto's personal adapter is held near the round's global adapter); under
SCAFFOLD (`round.scaffold`) every step's gradient gains the control correction c - c_i.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from fedtune.data import ClientData
from fedtune.data.batching import collate
from fedtune.model.adapter import FlatAdapter
from fedtune.train.settings import TrainConfig


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back: its adapter delta and how much data produced it."""

    client_id: str
    delta: torch.Tensor | None  # None when the update was refused
    num_examples: int
    num_steps: int
    train_loss: float  # mean over the steps taken
    error: str | None = None
    # SCAFFOLD: the mean of the raw minibatch gradients over the steps (flat, float32; before the
    # correction, FedProx's term and clipping), reported when a correction was given; None otherwise
    mean_gradient: torch.Tensor | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def batch_schedule(
    num_examples: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    steps: int | None = None,
    epochs: int | None = None,
) -> list[torch.Tensor]:
    """Example indices per local step: shuffled epochs, cut into batches.

    With `steps`, as many shuffled passes as needed are concatenated and cut into `steps` full batches
    (a client smaller than one batch repeats examples); with `epochs`, each pass is cut on its own and
    its last batch may be short.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if epochs is not None:
        return [
            chunk
            for _ in range(epochs)
            for chunk in torch.randperm(num_examples, generator=generator).split(batch_size)
        ]
    assert steps is not None
    passes = math.ceil(steps * batch_size / num_examples)
    order = torch.cat([torch.randperm(num_examples, generator=generator) for _ in range(passes)])
    return list(order[: steps * batch_size].view(steps, batch_size))


def num_steps(num_examples: int, batch_size: int, *, steps: int | None, epochs: int | None) -> int:
    """Local steps: `steps`, or `epochs` passes of num_examples / batch_size expected batches each."""
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if steps is not None:
        return steps
    assert epochs is not None
    return epochs * math.ceil(num_examples / batch_size)


@dataclass(frozen=True)
class LocalModel:
    """The one model a process trains and evaluates on: the PEFT model, its flat LoRA view, the pad id."""

    model: torch.nn.Module
    adapter: FlatAdapter
    pad_id: int


class Trainer(Protocol):
    """A client's local training: `LocalTrainer`, or `train.dpsgd.DpSgdTrainer` for sample-level DP."""

    pad_id: int

    def train(
        self,
        global_flat: torch.Tensor,
        client: ClientData,
        *,
        seed: int,
        steps: int | None = None,
        epochs: int | None = None,
        on_step: Callable[[float], None] = ...,
        correction: torch.Tensor | None = None,
    ) -> ClientUpdate:
        """`correction` (SCAFFOLD's c - c_i, flat like the adapter) is added to every step's gradient;
        it is passed only when control variates are on, and a trainer that cannot add it must refuse.
        With a correction a trainer should report `ClientUpdate.mean_gradient` (SCAFFOLD's c_i+); without
        one the participant uses option II's formula, which assumes SGD steps."""
        ...


class LocalTrainer:
    """Runs local steps on the shared PEFT model for one client at a time."""

    def __init__(self, model: torch.nn.Module, adapter: FlatAdapter, cfg: TrainConfig, pad_id: int) -> None:
        self.model = model
        self.adapter = adapter
        self.cfg = cfg
        self.pad_id = pad_id
        self._sizes = [p.numel() for p in adapter.params]

    def train(
        self,
        global_flat: torch.Tensor,
        client: ClientData,
        *,
        seed: int,
        steps: int | None = None,
        epochs: int | None = None,
        on_step: Callable[[float], None] = lambda _loss: None,
        correction: torch.Tensor | None = None,
        anchor: torch.Tensor | None = None,
    ) -> ClientUpdate:
        """Train from `global_flat` on `client.train`; `seed` fixes batch order and dropout; `correction`
        (SCAFFOLD's c - c_i) is added to every step's gradient, before clipping, and the update then
        reports the mean raw gradient of the steps. `anchor`: the centre of the proximal term (default
        the start, FedProx's; Ditto's personal adapter is pulled toward the round's global one)."""
        if correction is not None and correction.shape != global_flat.shape:
            raise ValueError(f"a gradient correction has the adapter's {global_flat.numel()} values")
        corrections = None if correction is None else self._views(correction)
        gradient_sum = None if correction is None else torch.zeros_like(global_flat)
        sums = None if gradient_sum is None else self._views(gradient_sum)
        generator = torch.Generator().manual_seed(seed)
        schedule = batch_schedule(
            len(client.train), self.cfg.batch_size, generator, steps=steps, epochs=epochs
        )
        self.adapter.load(global_flat)
        optimizer = torch.optim.AdamW(self.adapter.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.model.train()
        losses = torch.empty(len(schedule))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # LoRA dropout, scoped to this client's steps
            for step, indices in enumerate(schedule):
                batch = collate([client.train[i] for i in indices.tolist()], self.pad_id)
                loss = self.model(**batch).loss
                if not torch.isfinite(loss):
                    return self._refused(client, step, losses[:step], f"non-finite loss at step {step}")
                loss.backward()
                if sums is not None:  # SCAFFOLD's c_i+: the raw gradients, summed in one pass
                    torch._foreach_add_(sums, [p.grad for p in self.adapter.params])
                if self.cfg.proximal_mu > 0:
                    self._add_proximal_gradient(global_flat if anchor is None else anchor)
                if corrections is not None:  # SCAFFOLD: grad + (c - c_i), one vectorized pass
                    torch._foreach_add_([p.grad for p in self.adapter.params], corrections)
                if self.cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.adapter.params, self.cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses[step] = loss.detach()
                on_step(float(losses[step]))
        self.model.eval()
        delta = self.adapter.buffer - global_flat
        if not torch.isfinite(delta).all():
            return self._refused(client, len(schedule), losses, "non-finite adapter delta")
        mean_gradient = None if gradient_sum is None else gradient_sum.div_(len(schedule))
        if mean_gradient is not None and not torch.isfinite(mean_gradient).all():
            return self._refused(client, len(schedule), losses, "non-finite mean gradient")
        return ClientUpdate(
            client_id=client.client_id,
            delta=delta,
            num_examples=len(client.train),
            num_steps=len(schedule),
            train_loss=float(losses.mean()),
            mean_gradient=mean_gradient,
        )

    def _add_proximal_gradient(self, anchor: torch.Tensor) -> None:
        """FedProx (Li et al. 2020): the gradient of mu/2 ||w - anchor||^2, mu (w - anchor), added to
        each LoRA tensor's gradient in one vectorized pass (before clipping, as a term of the loss)."""
        pull = torch.split((self.adapter.buffer - anchor).mul_(self.cfg.proximal_mu), self._sizes)
        grads = [p.grad for p in self.adapter.params]
        torch._foreach_add_(grads, [t.view(g.shape) for t, g in zip(pull, grads, strict=True)])

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat adapter-sized vector as views shaped like each LoRA tensor."""
        parts = torch.split(flat, self._sizes)
        return [t.view(p.shape) for t, p in zip(parts, self.adapter.params, strict=True)]

    def _refused(self, client: ClientData, steps: int, losses: torch.Tensor, reason: str) -> ClientUpdate:
        self.model.eval()
        return ClientUpdate(
            client_id=client.client_id,
            delta=None,
            num_examples=len(client.train),
            num_steps=steps,
            train_loss=float(losses.mean()) if len(losses) else float("nan"),
            error=reason,
        )
