"""An attacker's trainer: the honest trainer, wrapped. The participant around it is the honest one, so
the poisoned delta is encoded, compressed, clipped and masked like any other, in every backend.

`PoisonedTrainer.train` trains honestly (a free rider does not train at all: it claims the steps an
honest client of its claimed size would take), then replaces the delta by the attack's
(`attack.poison`). The collusive attacks (alie, min_max) pool the honest deltas of every attacker from
the same start: each colluder's training is the honest trainer on its data, with a seed named by the
start, so every attacker of a round, in whatever process, computes the same pool and sends the same
vector. An attacker's own honest training is its row of the pool (its loss and counts are reported), and
a process keeps the last pool, so the attackers of a round it trains pay for it once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from fedtune.attack import poison
from fedtune.attack.plan import AttackPlan
from fedtune.data import ClientData
from fedtune.seeding import derive_seed, tensor_key, torch_generator
from fedtune.train.local import ClientUpdate, Trainer, num_steps


class PoisonedTrainer:
    """`train.local.Trainer` of an attacking client: `inner`'s training, then the plan's poisoning."""

    def __init__(self, inner: Trainer, plan: AttackPlan) -> None:
        self.inner = inner
        self.plan = plan
        self.pad_id = inner.pad_id
        self._pool: _Pool | None = None  # the last start's

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
    ) -> ClientUpdate:
        plan = self.plan
        extra = {} if correction is None else {"correction": correction}
        if plan.kind == "free_rider":
            claimed = plan.claimed_examples or len(client.train)
            return ClientUpdate(
                client.client_id,
                poison.free_rider(global_flat.numel()),
                num_examples=claimed,
                num_steps=num_steps(claimed, plan.batch_size, steps=steps, epochs=epochs),
                train_loss=float("nan"),
            )
        if plan.collusive:
            pool = self._pooled(global_flat, steps, epochs, extra)
            if client.client_id not in pool.updates:
                raise ValueError(f"{client.client_id} attacks, and is not among the plan's colluders")
            own = pool.updates[client.client_id]
            if own.delta is None:  # its own honest training was refused: so is its attack
                return own
            if pool.deltas.shape[0] < 2:  # the others' training failed: nothing to shape the vector from
                return replace(own, delta=None, error="fewer than two colluders trained this round")
            if plan.kind == "alie":
                return replace(own, delta=poison.alie(pool.deltas, plan.z))
            return replace(own, delta=poison.min_max(pool.deltas, plan.direction))
        honest = self.inner.train(
            global_flat, client, seed=seed, steps=steps, epochs=epochs, on_step=on_step, **extra
        )
        if honest.delta is None:
            return honest
        if plan.kind == "sign_flip":
            delta = poison.sign_flip(honest.delta)
        elif plan.kind in ("scale", "backdoor"):
            delta = honest.delta if plan.boost == 1.0 else poison.scale(honest.delta, plan.boost)
        elif plan.kind == "gaussian":
            generator = torch_generator(seed, "attack-gaussian")
            delta = poison.gaussian(honest.delta, plan.gaussian_rms_multiple, generator)
        else:
            raise ValueError(f"attack.kind = {plan.kind!r} has no poisoning here")
        return replace(honest, delta=delta)

    def _pooled(
        self,
        global_flat: torch.Tensor,
        steps: int | None,
        epochs: int | None,
        extra: dict[str, torch.Tensor],
    ) -> _Pool:
        """Every colluder's honest update from `global_flat` (its seed named by that start)."""
        start = tensor_key(global_flat)
        if self._pool is not None and self._pool.start == start:
            return self._pool
        updates = {
            colluder.client_id: self.inner.train(
                global_flat,
                colluder,
                seed=derive_seed(start, "attack-colluder", k),
                steps=steps,
                epochs=epochs,
                **extra,
            )
            for k, colluder in enumerate(self.plan.colluders)
        }
        trained = [u.delta for u in updates.values() if u.delta is not None]
        deltas = torch.stack(trained) if trained else global_flat.new_zeros((0, global_flat.numel()))
        self._pool = _Pool(start, updates, deltas)
        return self._pool


@dataclass(frozen=True)
class _Pool:
    """The colluders' honest updates from one start: by client id, and their deltas stacked [k, params]
    in the plan's order (the refused ones left out)."""

    start: int  # `tensor_key` of the start
    updates: dict[str, ClientUpdate]
    deltas: torch.Tensor
