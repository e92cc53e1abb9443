"""Sample-level DP-SGD accounting: the per-record epsilon a client has spent on its own data.

Each local DP-SGD step (`train.dpsgd.DpSgdTrainer`) draws a Poisson batch with rate batch_size /
num_examples and adds Gaussian noise of std `noise_multiplier * max_grad_norm` to the clipped per-example
gradient sum, so a client's steps compose as Poisson-sampled Gaussians (add/remove one record) in
dp_accounting. The extra amplification from the client itself being sampled into a round is ignored.
"""

from __future__ import annotations

from fedtune.privacy.accountant import Accountant, AccountantKind, GaussianRound, Sampling


def record_epsilon(
    num_examples: int,
    batch_size: int,
    noise_multiplier: float,
    total_steps: int,
    delta: float,
    kind: AccountantKind = "rdp",
) -> float:
    """Per-record epsilon of a client's DP-SGD after `total_steps` steps (all its rounds together)."""
    if total_steps == 0:
        return 0.0
    sampling = Sampling("poisson", num_examples, min(batch_size, num_examples))
    accountant = Accountant(kind, sampling)
    accountant.step(GaussianRound(noise_multiplier), total_steps)
    return accountant.epsilon(delta)
