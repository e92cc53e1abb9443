"""Evaluation of an adapter on clients' held-out data: each client's summed next-token loss, combined.

A client evaluates on its own data (`client_nll`: the loss summed over its first held-out examples, and
how many tokens it covers); the round engine combines what the evaluating clients report (`combine`:
token-weighted). In simulation every evaluating client is a call on the shared model, in a deployment a
site; the numbers are the same either way, since `combine` adds the reports in a fixed order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedtune.data import ClientData
from fedtune.data.batching import collate

MAX_EXP_ARG = math.log(1.7e308)  # beyond this math.exp overflows


def perplexity(loss: float) -> float:
    """exp(loss); infinite for a diverged model rather than an overflow error."""
    return math.exp(loss) if loss < MAX_EXP_ARG else math.inf


@dataclass(frozen=True)
class ClientNll:
    """One client's evaluation: the next-token loss summed over `tokens` held-out tokens."""

    client_id: str
    nll: float
    tokens: int


@dataclass(frozen=True)
class EvalResult:
    per_client_loss: dict[str, float]  # mean next-token loss per client
    loss: float  # token-weighted over every evaluated client
    num_tokens: int

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


@torch.inference_mode()
def client_nll(
    model: torch.nn.Module, client: ClientData, *, max_examples: int, batch_size: int, pad_id: int
) -> ClientNll:
    """Summed next-token loss of `model` (its adapter as loaded) on the client's first eval examples."""
    model.eval()
    examples = client.eval[:max_examples]
    nll, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        nll += float(model(**batch).loss) * n
        tokens += n
    return ClientNll(client.client_id, nll, tokens)


def combine(reports: Sequence[ClientNll]) -> EvalResult:
    """The token-weighted loss of the clients' reports, in the order given; clients without tokens are
    left out. Refuses an evaluation with no tokens at all."""
    per_client: dict[str, float] = {}
    total_nll, total_tokens = 0.0, 0
    for report in reports:
        if report.tokens:
            per_client[report.client_id] = report.nll / report.tokens
            total_nll += report.nll
            total_tokens += report.tokens
    if not total_tokens:
        raise ValueError("no evaluation tokens: every evaluated client's held-out split is empty")
    return EvalResult(per_client, total_nll / total_tokens, total_tokens)
