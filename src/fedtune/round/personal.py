"""Personal adapters: what each client keeps next to the global one (`[personalize]`).

- `finetune`: after the last round each evaluation client adapts the final global adapter with
  `personalize.steps` local steps on its own training data.
- `ditto` (Li et al. 2021, "Ditto: fair and robust federated learning through personalization"): in every
  round it is selected, a client trains the global update as usual and also its personal adapter v, for
  the same local steps, on its loss plus lambda/2 ||v - w||^2, w the round's global adapter (FedProx's term
  with its own centre). v starts from the first global adapter the client receives.
- `split` (FedSA-LoRA, Guo et al. 2025, "Selective aggregation for LoRA in federated learning"): a
  client trains A and B from the global A and its own B; only the A values travel (the update is A's
  delta, `RunPlan.shared`), B stays with the client. The global adapter's B stays as initialised (zero),
  so the global adapter alone is the base model: every client uses the shared A with its own B.

At the run's last evaluation every evaluation client reports its held-out loss with the global adapter
and with its personal one (`EvalRequest.personalize`). A client that never trained has no personal adapter
yet under ditto or split: it makes one then from the final global adapter with `personalize.steps` steps
(ditto with its pull), which is what `finetune` does for everyone. The personal adapter is client state
(`ClientState.personal`): in simulation the engine's client-state store, at a site its folder; it is
never sent. The pure functions here compose and expand the vectors; the participant runs the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedtune.aggregate import StackedUpdates, SummedUpdates

Method = Literal["finetune", "ditto", "split"]


@dataclass(frozen=True)
class PersonalSpec:
    """A client's side of `[personalize]` (the method is never "none": then there is no spec)."""

    method: Method
    steps: int  # local steps that make a personal adapter after the last round
    lam: float  # ditto's pull toward the global adapter

    @property
    def trains_along(self) -> bool:
        """The personal adapter is trained in the rounds (ditto, split), not only after them."""
        return self.method != "finetune"


def compose(global_flat: torch.Tensor, personal: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """Split: the shared values (A) from the global adapter, the rest (B) from the client's own."""
    return torch.where(shared, global_flat, personal)


def expand(updates: SummedUpdates | StackedUpdates, shared: torch.Tensor) -> SummedUpdates | StackedUpdates:
    """A round's updates over the shared values only, placed in the whole adapter (zero elsewhere): the
    rule and the server optimizer then leave the unshared values (B) as they are."""
    numel = shared.numel()
    if isinstance(updates, SummedUpdates):
        total = torch.zeros(numel, dtype=updates.total.dtype).masked_scatter_(shared, updates.total)
        return SummedUpdates(total, updates.denominator, updates.count)
    rows = updates.deltas
    full = torch.zeros(rows.shape[0], numel, dtype=rows.dtype)
    full[:, shared] = rows
    return StackedUpdates(full, updates.weights)
