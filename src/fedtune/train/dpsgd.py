"""Sample-level DP on a client: DP-SGD (Abadi et al. 2016) through Opacus, on the shared PEFT LoRA model.

For a client that must protect the individual records in its own data. Each local step draws a Poisson
batch (every example independently with rate q = batch_size / num_examples, from a generator the caller
passes: the batch membership must stay secret for amplification to hold), Opacus's `GradSampleModule`
computes per-example gradients of the LoRA tensors (they are `nn.Linear` layers, which Opacus supports
natively), its `DPOptimizer` clips each to `max_grad_norm`, sums them, adds N(0, (z * max_grad_norm)^2)
from the caller's generator and divides by the expected batch size; AdamW then steps as usual.

What had to be right for it to work with fedtune's model:
- The loss is per example: token cross-entropy averaged over that example's own tokens, summed over the
  batch. Hugging Face's built-in loss averages over all tokens of the batch, so one example's length would
  rescale every other example's gradient and the per-example bound would not bound the sum.
- `FlatAdapter` re-points each LoRA tensor into one flat buffer (`p.data = buffer[...]`): Opacus only reads
  activations and output gradients and writes `p.grad`, and AdamW updates `p.data` in place, so the buffer
  sees every step (tested: per-example gradients equal single-example backward passes exactly).
- The hooks are attached for one client's training and removed after (`to_standard_module`), so the shared
  model serves evaluation and non-DP clients unchanged.
- An empty Poisson batch is still a step: the noise alone is applied (Opacus's empty-batch path).
- LoRA on an embedding (`lora.target_modules` with `embed_tokens`) does not work: PEFT keeps those tensors
  in a `ParameterDict`, Opacus never computes their per-example gradients. `check_dpsgd_model` refuses it
  at setup, with the reason.

Accounting is per client and per record (`privacy.dpsgd.record_epsilon`): the round engine's participant
counts the client's steps in its client state and reports the epsilon with each update.
`train.max_grad_norm` (global clipping) does not apply; per-example clipping replaces it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedtune.data import ClientData
from fedtune.data.batching import IGNORE_INDEX, collate
from fedtune.errors import ConfigError
from fedtune.model.adapter import FlatAdapter
from fedtune.train.local import ClientUpdate, num_steps
from fedtune.train.settings import TrainConfig


@dataclass(frozen=True)
class DpSgdSettings:
    """Per-example clipping and noise for DP-SGD on a client."""

    noise_multiplier: float
    max_grad_norm: float  # per-example L2 clip

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be positive, got {self.noise_multiplier}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")


def check_dpsgd_model(model: torch.nn.Module) -> None:
    """Refuse (ConfigError) a model whose trainable tensors Opacus cannot give per-example gradients for.

    LoRA on linear layers is fine (its A and B are `nn.Linear`); LoRA on an embedding keeps its tensors in a
    `ParameterDict`, which Opacus's hooks never see (its per-example gradient stays None)."""
    unsupported = sorted(
        name or "<root>"
        for name, module in model.named_modules()
        if not isinstance(module, torch.nn.Linear)
        and any(p.requires_grad for p in module.parameters(recurse=False))
    )
    if unsupported:
        shown = ", ".join(unsupported[:3]) + (
            f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else ""
        )
        raise ConfigError(
            "dpsgd.enabled needs per-example gradients of every trainable tensor, and Opacus computes them "
            f"for linear layers only; these trainable modules are not linear: {shown}. Adapt only linear "
            "layers (lora.target_modules without embeddings) or set dpsgd.enabled = false"
        )


def per_example_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of each example over its own tokens: shape [batch]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    tokens = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counted = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return tokens.sum(dim=1) / counted


def sample_rate(num_examples: int, batch_size: int) -> float:
    return min(1.0, batch_size / num_examples)


def poisson_batches(
    num_examples: int, rate: float, steps: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Example indices per step: each example joins each batch independently with probability `rate`."""
    draws = torch.rand((steps, num_examples), generator=generator)
    return [torch.nonzero(row < rate).flatten() for row in draws]


class DpSgdTrainer:
    """Local DP-SGD on the shared PEFT model, one client at a time; returns what `LocalTrainer` returns."""

    def __init__(
        self,
        model: torch.nn.Module,
        adapter: FlatAdapter,
        cfg: TrainConfig,
        pad_id: int,
        settings: DpSgdSettings,
        noise_generator: torch.Generator,
        sampling_generator: torch.Generator,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.cfg = cfg
        self.pad_id = pad_id
        self.settings = settings
        self.noise_generator = noise_generator
        self.sampling_generator = sampling_generator

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
        """DP-SGD from `global_flat` on `client.train`; `seed` fixes only LoRA dropout, not the batches.
        A `correction` (SCAFFOLD) is refused: the accountant does not cover the control variates."""
        if correction is not None:
            raise ValueError(
                "DP-SGD does not take SCAFFOLD's gradient correction: its accountant does not cover the "
                "control variates (server.control_variates must be 'none' with dpsgd.enabled)"
            )
        n = len(client.train)
        total = num_steps(n, self.cfg.batch_size, steps=steps, epochs=epochs)
        rate = sample_rate(n, self.cfg.batch_size)
        schedule = poisson_batches(n, rate, total, self.sampling_generator)
        self.adapter.load(global_flat)
        params = self.adapter.params
        module = GradSampleModule(self.model, batch_first=True, loss_reduction="sum")
        optimizer = DPOptimizer(
            torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay),
            noise_multiplier=self.settings.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=max(1, round(rate * n)),
            loss_reduction="mean",  # divide the noised sum by the expected batch size
            generator=self.noise_generator,
        )
        losses: list[float] = []
        error: str | None = None
        self.model.train()
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # Opacus's backward hooks fire on layers whose inputs (frozen base activations) need no
                # gradient; torch warns about that, harmlessly, on every step
                warnings.filterwarnings(
                    "ignore", message="Full backward hook is firing", category=UserWarning
                )
                torch.manual_seed(seed)  # LoRA dropout, scoped to this client's steps
                for step, indices in enumerate(schedule):
                    if len(indices) == 0:
                        for p in params:  # an empty batch: the step adds noise alone
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                    else:
                        batch = collate([client.train[i] for i in indices.tolist()], self.pad_id)
                        per_example = per_example_loss(module, batch)
                        loss = per_example.mean().detach()
                        if not torch.isfinite(loss):
                            error = f"non-finite loss at step {step}"
                            break
                        per_example.sum().backward()
                        losses.append(float(loss))
                        on_step(losses[-1])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        finally:
            module.to_standard_module()  # remove the hooks and the per-example gradients
            self.model.eval()
        mean_loss = sum(losses) / len(losses) if losses else float("nan")
        delta = self.adapter.buffer - global_flat
        if error is None and not torch.isfinite(delta).all():
            error = "non-finite adapter delta"
        return ClientUpdate(
            client_id=client.client_id,
            delta=None if error else delta,
            num_examples=n,
            num_steps=total,
            train_loss=mean_loss,
            error=error,
        )
