"""A simulation's attackers: who they are, the poisoned data they train on, and what the attack did.

`arm` resolves `[attack]` against the loaded clients: the `AttackPlan` (the factory wraps each attacker's
trainer with it), the attackers' poisoned training data for a backdoor, and an `AttackMonitor` that adds
`AttackMetrics` to each round's result: attackers in the aggregate, the honest evaluation clients'
token-weighted loss, and on evaluated rounds the backdoor's success and preference rates on held-out
trigger prompts (`attack.backdoor`; probed on this process's model, with the new global adapter loaded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from fedtune.attack import (
    AttackPlan,
    Backdoor,
    Probes,
    make_probes,
    plan_attack,
    poison_client,
    preference_rate,
    success_rate,
)
from fedtune.config import Config
from fedtune.data import ClientData
from fedtune.round.results import AttackMetrics, RoundResult
from fedtune.seeding import numpy_rng
from fedtune.train.local import LocalModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class AttackMonitor:
    plan: AttackPlan
    eval_tokens: dict[str, int]  # each honest client's held-out tokens in an evaluation
    probes: Probes | None  # backdoor only

    def observe(self, result: RoundResult, local: LocalModel, global_flat: torch.Tensor) -> RoundResult:
        ids = result.client_ids
        aggregated = None if ids is None else sum(self.plan.attacks(cid) for cid in ids)
        honest_loss, success, preference = None, None, None
        if result.eval is not None:
            losses = {c: loss for c, loss in result.eval.per_client_loss.items() if c in self.eval_tokens}
            tokens = sum(self.eval_tokens[c] for c in losses)
            if tokens:
                honest_loss = sum(loss * self.eval_tokens[c] for c, loss in losses.items()) / tokens
            if self.probes is not None:
                local.adapter.load(global_flat)
                success = success_rate(local.model, self.probes, local.pad_id)
                preference = preference_rate(local.model, self.probes, local.pad_id)
        return replace(result, attack=AttackMetrics(aggregated, honest_loss, success, preference))

    def peers(
        self,
        per_client_loss: Mapping[str, float] | None,
        local: LocalModel,
        adapters: Mapping[str, torch.Tensor],
    ) -> AttackMetrics:
        """A decentralized round (`per_client_loss` on evaluated rounds): there is no global adapter, so
        the honest evaluation clients' own losses are averaged (unweighted, as `eval_loss_mean`) and the
        backdoor is probed on each honest evaluation client's own adapter (`adapters`, by client id),
        its success the mean over them."""
        if per_client_loss is None:
            return AttackMetrics(None, None, None)
        honest = [c for c in per_client_loss if c in self.eval_tokens]
        honest_loss = sum(per_client_loss[c] for c in honest) / len(honest) if honest else None
        success, preference = None, None
        if self.probes is not None and honest:
            rates, preferred = [], []
            for cid in honest:
                local.adapter.load(adapters[cid])
                rates.append(success_rate(local.model, self.probes, local.pad_id))
                preferred.append(preference_rate(local.model, self.probes, local.pad_id))
            success, preference = sum(rates) / len(rates), sum(preferred) / len(preferred)
        return AttackMetrics(None, honest_loss, success, preference)


@dataclass(frozen=True)
class Armed:
    clients: list[ClientData]  # the attackers' training data poisoned for a backdoor
    plan: AttackPlan
    monitor: AttackMonitor


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def arm(
    config: Config, clients: Sequence[ClientData], tokenizer: PreTrainedTokenizerBase, *, cohort: int
) -> Armed | None:
    """The run's attack over its loaded clients (`cohort` a round's: scale's default boost), or None
    without one."""
    cfg, seed = config.attack, config.run.seed
    cap = config.data.max_examples_per_client
    weight_cap = None if cap == "all" else cap
    max_seq_len, eval_examples = config.data.max_seq_len, config.eval.max_examples_per_client
    plan = plan_attack(
        cfg, clients, seed=seed, cohort=cohort, weight_cap=weight_cap, batch_size=config.train.batch_size
    )
    if plan is None:
        return None
    honest = [c for c in clients if not plan.attacks(c.client_id)]
    eval_tokens = {c.client_id: sum(len(ex) - 1 for ex in c.eval[:eval_examples]) for c in honest}
    probes = None
    if plan.kind == "backdoor":
        backdoor = Backdoor(_ids(tokenizer, cfg.trigger), _ids(tokenizer, cfg.target), tokenizer.eos_token_id)
        rng = numpy_rng(seed, "attack-backdoor")
        fraction = cfg.poison_fraction
        clients = [
            poison_client(c, backdoor, fraction, max_seq_len, rng) if plan.attacks(c.client_id) else c
            for c in clients
        ]
        probes = make_probes(honest, backdoor, cfg.probes, numpy_rng(seed, "attack-probes"))
    return Armed(list(clients), plan, AttackMonitor(plan, eval_tokens, probes))
