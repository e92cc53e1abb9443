"""What every process that trains builds from the config: the one model with LoRA, and its trainer.

The simulation builds it once for all its virtual clients; a deployed site builds it once for itself.
Both then wrap it in the round engine's `Participant`, so a client trains the same way in either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fedtune.config import Config
from fedtune.model.adapter import FlatAdapter, attach_lora
from fedtune.model.base import load_base_model, load_tokenizer, resolve_model_dir
from fedtune.privacy.noise import os_entropy_generator
from fedtune.seeding import torch_generator
from fedtune.train.local import LocalModel, LocalTrainer, Trainer


def tokenizer_for(config: Config, notify: Callable[[str], None] = lambda _msg: None) -> tuple[Path, Any]:
    """The base model's local directory (dequantized and cached on first use) and its tokenizer."""
    model_dir = resolve_model_dir(config.model.name, notify)
    return model_dir, load_tokenizer(model_dir)


def load_model(config: Config, model_dir: Path, pad_id: int) -> LocalModel:
    """The base model with LoRA attached (LoRA A drawn from the run seed, the same at every party), as one
    flat adapter of what trains (B only under `server.lora_aggregation = "ffa"`)."""
    model = attach_lora(
        load_base_model(model_dir),
        config.lora,
        torch_generator(config.run.seed, "lora"),
        train_a=config.server.lora_aggregation != "ffa",
    )
    return LocalModel(model, FlatAdapter(model), pad_id)


def make_trainer(config: Config, local: LocalModel) -> Trainer:
    """Local AdamW steps, or DP-SGD on every client when `dpsgd.enabled` (per-example clipping and noise,
    its noise and batch sampling drawn from the OS)."""
    if not config.dpsgd.enabled:
        return LocalTrainer(local.model, local.adapter, config.train, local.pad_id)
    from fedtune.train.dpsgd import DpSgdSettings, DpSgdTrainer, check_dpsgd_model

    check_dpsgd_model(local.model)
    return DpSgdTrainer(
        local.model,
        local.adapter,
        config.train,
        local.pad_id,
        DpSgdSettings(config.dpsgd.noise_multiplier, config.dpsgd.max_grad_norm),
        os_entropy_generator(),
        os_entropy_generator(),
    )


def make_personal_trainer(config: Config, local: LocalModel) -> LocalTrainer | None:
    """The trainer of the personal adapters (`[personalize]`; None when off): local AdamW steps, with
    Ditto's pull toward the global adapter as the proximal term (`personalize.lambda`)."""
    method = config.personalize.method
    if method == "none":
        return None
    mu = config.personalize.lambda_ if method == "ditto" else 0.0
    lr = config.personalize.lr or config.train.lr
    train = config.train.model_copy(update={"proximal_mu": mu, "lr": lr})
    return LocalTrainer(local.model, local.adapter, train, local.pad_id)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """`run.threads` torch threads for the duration (None: torch's choice), restored after: a run called
    from Python leaves the caller's thread count as it found it."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
