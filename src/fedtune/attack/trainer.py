"""An attacker's trainer: the honest trainer, wrapped. The participant around it is the honest one, so
the poisoned delta is encoded, compressed, clipped and masked like any other, in every backend.

`PoisonedTrainer.train` trains honestly (a free rider does not train at all), then replaces the delta by
the attack's (`attack.poison`). The collusive attacks (alie, min_max) pool the honest deltas of every
attacker from the same start: each colluder's training is the honest trainer on its data, with a seed
named by the start, so every attacker of a round, in whatever process, computes the same pool and sends
the same vector; a process keeps the last pool, so the attackers of a round it trains pay for it once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace

import torch

from fedtune.attack import poison
from fedtune.attack.plan import AttackPlan
from fedtune.data import ClientData
from fedtune.seeding import derive_seed, torch_generator
from fedtune.train.local import ClientUpdate, Trainer


class PoisonedTrainer:
    """`train.local.Trainer` of an attacking client: `inner`'s training, then the plan's poisoning."""

    def __init__(self, inner: Trainer, plan: AttackPlan) -> None:
        self.inner = inner
        self.plan = plan
        self.pad_id = inner.pad_id
        self._pool: tuple[bytes, torch.Tensor] | None = None  # (start digest, honest deltas [k, params])

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
                num_steps=steps or 1,
                train_loss=float("nan"),
            )
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
            pool = self._pooled(global_flat, steps, epochs, extra)
            if pool.shape[0] < 2:  # the colluders' own training failed: nothing to shape the vector from
                return replace(honest, delta=None, error="fewer than two colluders trained this round")
            delta = poison.alie(pool, plan.z) if plan.kind == "alie" else poison.min_max(pool, plan.direction)
        return replace(honest, delta=delta)

    def _pooled(
        self,
        global_flat: torch.Tensor,
        steps: int | None,
        epochs: int | None,
        extra: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Every attacker's honest delta from `global_flat`, stacked in the plan's order."""
        digest = hashlib.blake2b(global_flat.numpy().tobytes(), digest_size=16).digest()
        if self._pool is not None and self._pool[0] == digest:
            return self._pool[1]
        named = int.from_bytes(digest[:8], "big")
        deltas = []
        for k, colluder in enumerate(self.plan.colluders):
            update = self.inner.train(
                global_flat,
                colluder,
                seed=derive_seed(named, "attack-colluder", k),
                steps=steps,
                epochs=epochs,
                **extra,
            )
            if update.delta is not None:
                deltas.append(update.delta)
        pool = torch.stack(deltas) if deltas else global_flat.new_zeros((0, global_flat.numel()))
        self._pool = (digest, pool)
        return pool
