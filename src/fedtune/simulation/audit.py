"""A simulation's privacy audit: the canaries planted before round 0, and what the final adapter gives away.

`plant` resolves `[audit]` against the loaded clients: the white-box canary clients (`audit.canary`),
appended after the real clients so that they are sampled like them but never evaluate, and the canary
texts inserted into some real clients' training data (`audit.exposure`). `AuditMonitor.finish` scores
them once the run has ended: each canary's cosine with the global adapter's change becomes the one-run
epsilon lower bound at the accountant's delta (`audit.bound`), next to the accountant's epsilon, and each
canary text's exposure on the model with the final adapter loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedtune.audit import AuditConfig
from fedtune.audit.bound import audit_scores
from fedtune.audit.canary import CanaryPlan, plan_canaries
from fedtune.audit.exposure import TextCanary, canary_example, insert_texts, measure, plan_texts
from fedtune.audit.results import AuditResult
from fedtune.config import Config
from fedtune.data import ClientData
from fedtune.errors import ConfigError
from fedtune.privacy.dpfedavg import PrivacyMetrics
from fedtune.privacy.settings import default_delta
from fedtune.seeding import numpy_rng
from fedtune.train.local import LocalModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class AuditMonitor:
    cfg: AuditConfig
    canaries: CanaryPlan
    texts: list[TextCanary]
    tokenize: Callable[[str], list[int]]
    prompt: tuple[int, ...]
    seed: int

    def finish(
        self,
        local: LocalModel,
        initial: torch.Tensor,
        final: torch.Tensor,
        *,
        privacy: PrivacyMetrics | None,
        delta: float,
    ) -> AuditResult:
        """Score the canaries against the run's adapter change (`final - initial`) and the canary texts on
        the model with `final` loaded; `privacy`: the last round's figures (None with privacy off)."""
        scores = self.canaries.scores(final - initial)
        included = np.array(self.canaries.included)
        confidence = self.cfg.confidence
        white = audit_scores(scores, included, confidence=confidence, delta=delta)
        pure = audit_scores(scores, included, confidence=confidence, delta=0.0).epsilon
        exposures = None
        if self.texts:
            local.adapter.load(final)
            exposures = measure(
                local.model,
                local.pad_id,
                self.prompt,
                self.texts,
                self.tokenize,
                candidates=self.cfg.text_candidates,
                digits=self.cfg.text_digits,
                rng=numpy_rng(self.seed, "audit-candidates"),
            )
        return AuditResult(
            white_box=white,
            pure_epsilon=pure,
            accounted_epsilon=None if privacy is None else privacy.epsilon,
            accounted_epsilon_known_cohort=None if privacy is None else privacy.epsilon_known_cohort,
            delta=delta,
            included_score_mean=_mean(scores[included]),
            excluded_score_mean=_mean(scores[~included]),
            exposures=exposures,
        )


@dataclass(frozen=True)
class Planted:
    clients: list[ClientData]  # the real clients (some with canary texts), then the canary clients
    real: int  # how many real clients come first
    monitor: AuditMonitor


def plant(
    config: Config,
    clients: Sequence[ClientData],
    tokenizer: PreTrainedTokenizerBase,
    notify: Callable[[str], None] = lambda _msg: None,
) -> Planted | None:
    """The run's canaries over its loaded clients, or None without `[audit]`."""
    cfg = config.audit
    if not cfg.enabled:
        return None
    seed = config.run.seed if cfg.seed is None else cfg.seed
    sizes = sorted(len(c.train) for c in clients)
    canaries = plan_canaries(
        cfg.canaries,
        seed,
        l2_norm=cfg.canary_l2_norm or config.privacy.clip_l2_norm,
        num_examples=max(1, sizes[len(sizes) // 2]),  # a typical client's weight without DP
        taken=[c.client_id for c in clients],
    )

    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt = tuple(tokenize(cfg.text_prefix))
    texts = plan_texts(
        cfg.text_canaries, cfg.text_digits, [c.client_id for c in clients], numpy_rng(seed, "audit-texts")
    )
    longest = max((len(prompt) + len(tokenize(" " + t.secret)) + 1 for t in texts), default=0)
    if longest > config.data.max_seq_len:
        raise ConfigError(
            f"an audit canary text ({cfg.text_prefix!r} and {cfg.text_digits} digits) is {longest} tokens, "
            f"over data.max_seq_len = {config.data.max_seq_len}: shorten audit.text_prefix or raise "
            "data.max_seq_len"
        )
    eos = tokenizer.eos_token_id
    planted = insert_texts(
        clients, texts, lambda t: canary_example(prompt, tokenize(" " + t.secret), eos), cfg.text_repeats
    )
    fed = config.federation
    notify(
        f"audit: {cfg.canaries} canary clients ({sum(canaries.included)} included) join the {len(clients)} "
        f"clients of the population; {sum(t.client_id is not None for t in texts)} of {len(texts)} canary "
        f"texts are inserted (federation.clients_per_round = {fed.clients_per_round} counts the canaries too)"
    )
    monitor = AuditMonitor(cfg, canaries, texts, tokenize, prompt, seed)
    return Planted([*planted, *canaries.clients()], len(clients), monitor)


def audit_delta(config: Config, population: int) -> float:
    """The delta of the bound: the accountant's under DP (the resolved config's), else audit.delta, else
    privacy.delta, else the default privacy.delta of this population."""
    if config.privacy.mode != "off":
        assert config.privacy.delta is not None  # resolved with the privacy plan
        return config.privacy.delta
    if config.audit.delta is not None:
        return config.audit.delta
    return config.privacy.delta if config.privacy.delta is not None else default_delta(population)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")
