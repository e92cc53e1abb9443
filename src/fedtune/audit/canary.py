"""White-box canary clients: fixed random directions, each sent or not by a seeded coin, scored at the end.

A canary is a client of the population like any other: sampled into rounds, its update encoded, clipped,
noised and securely summed by the same round code. Only its trainer differs (`CanaryTrainer`, the way an
attacker's trainer wraps the honest one): an included canary sends its direction u_i (a unit vector drawn
from the audit seed's stream for canary i, so every worker draws the same one) times `l2_norm`, which
DP-FedAvg clips to C like any delta; an excluded canary sends a zero delta. Population, cohorts and
weights are therefore the same whatever the coins say, and changing one coin changes one client's update:
with fixed cohorts that is the replace-one neighbour the accountant accounts (a canary against a null
client), with Poisson sampling a zero delta over the public denominator is the same as absence. The
auditor then scores every canary by the cosine of u_i with the global adapter's change over the run
(`scores`); in a space of ~10^5 dimensions random directions are nearly orthogonal, so what shows is the
canary's own contribution, if the noise lets it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.data import ClientData
from fedtune.seeding import numpy_rng, torch_generator
from fedtune.train.local import ClientUpdate

ID_PREFIX = "audit-canary-"


@dataclass(frozen=True)
class CanaryPlan:
    """A run's white-box canaries: client ids, which are included, the stream of their directions, the
    norm an included one sends and the examples each claims (its FedAvg weight without DP). Plain
    values: it travels to worker processes with the simulation's recipe."""

    ids: tuple[str, ...]
    included: tuple[bool, ...]
    seed: int
    l2_norm: float
    num_examples: int

    def holds(self, client_id: str) -> bool:
        return client_id.startswith(ID_PREFIX) and client_id in self.ids

    def direction(self, index: int, numel: int) -> torch.Tensor:
        """Canary `index`'s unit direction in the flat adapter's space (float32)."""
        u = torch.randn(numel, generator=torch_generator(self.seed, "audit-direction", index))
        return u / u.norm()

    def delta(self, client_id: str, numel: int) -> torch.Tensor:
        """What the canary sends: its direction at `l2_norm` if included, else zeros."""
        index = self.ids.index(client_id)
        if not self.included[index]:
            return torch.zeros(numel)
        return self.direction(index, numel) * self.l2_norm

    def scores(self, change: torch.Tensor) -> np.ndarray:
        """Each canary's cosine with the global adapter's change (final minus initial); 0 for no change."""
        change = change.detach().to(torch.float32).flatten()
        norm = float(change.norm())
        if norm == 0.0:
            return np.zeros(len(self.ids))
        return np.array(
            [float(self.direction(i, change.numel()) @ change) / norm for i in range(len(self.ids))]
        )

    def clients(self) -> list[ClientData]:
        """The canaries as clients of the population: `num_examples` one-token-pair placeholders each (they
        are never trained on) and one held-out example (they never evaluate either)."""
        placeholder = [0, 0]
        return [ClientData(cid, [placeholder] * self.num_examples, [placeholder]) for cid in self.ids]


def plan_canaries(
    count: int, seed: int, *, l2_norm: float, num_examples: int, taken: Sequence[str] = ()
) -> CanaryPlan:
    """`count` canaries, each included with probability 1/2 (the audit seed's "audit-inclusion" stream);
    their ids must not clash with the real clients' (`taken`)."""
    ids = tuple(f"{ID_PREFIX}{i:04d}" for i in range(count))
    clash = sorted(set(ids) & set(taken))
    if clash:
        raise ValueError(f"a client is already named {clash[0]!r}, a canary's id")
    included = numpy_rng(seed, "audit-inclusion").random(count) < 0.5
    return CanaryPlan(ids, tuple(bool(x) for x in included), seed, l2_norm, num_examples)


class CanaryTrainer:
    """`train.local.Trainer` of a canary client: no training, its fixed update (`CanaryPlan.delta`)."""

    def __init__(self, plan: CanaryPlan, pad_id: int) -> None:
        self.plan = plan
        self.pad_id = pad_id

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
        if not self.plan.holds(client.client_id):
            raise ValueError(f"{client.client_id} is not one of the audit's canaries")
        delta = self.plan.delta(client.client_id, global_flat.numel()).to(global_flat.dtype)
        return ClientUpdate(
            client.client_id,
            delta,
            num_examples=self.plan.num_examples,
            num_steps=steps or 1,
            train_loss=float("nan"),  # left out of the round's train loss
        )
