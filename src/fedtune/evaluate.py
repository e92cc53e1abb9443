"""Evaluation of an adapter on the clients' held-out data: per-client and token-weighted loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedtune.config import EvalConfig
from fedtune.data import ClientData
from fedtune.data.batching import collate

MAX_EXP_ARG = math.log(1.7e308)  # beyond this math.exp overflows


@dataclass(frozen=True)
class EvalResult:
    per_client_loss: dict[str, float]  # mean next-token loss per client
    loss: float  # token-weighted over every evaluated client
    num_tokens: int

    @property
    def perplexity(self) -> float:
        """exp(loss); infinite for a diverged model rather than an overflow error."""
        return math.exp(self.loss) if self.loss < MAX_EXP_ARG else math.inf


@torch.inference_mode()
def evaluate(model: torch.nn.Module, clients: list[ClientData], cfg: EvalConfig, pad_id: int) -> EvalResult:
    """Next-token loss of `model` (its adapter as loaded) on each client's first eval examples."""
    model.eval()
    per_client: dict[str, float] = {}
    total_nll, total_tokens = 0.0, 0
    for client in clients:
        examples = client.eval[: cfg.max_examples_per_client]
        nll, tokens = 0.0, 0
        for start in range(0, len(examples), cfg.batch_size):
            batch = collate(examples[start : start + cfg.batch_size], pad_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            nll += float(model(**batch).loss) * n
            tokens += n
        if tokens:
            per_client[client.client_id] = nll / tokens
            total_nll += nll
            total_tokens += tokens
    if not total_tokens:
        raise ValueError("no evaluation tokens: every client's eval split is empty")
    return EvalResult(per_client, total_nll / total_tokens, total_tokens)
