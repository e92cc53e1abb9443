"""What every process that trains builds from the config: the one model with LoRA, and its trainer.

The simulation builds it once for all its virtual clients; a deployed site builds it once for itself.
Both then wrap it in the round engine's `Participant`, so a client trains the same way in either. With
`server.rule = "fltrust"` the server trains too: `RootUpdate` is its own update on its trusted root data,
the reference FLTrust scores the clients' updates against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.config import Config
from fedtune.config.plan import local_work
from fedtune.data import ClientData, load_site
from fedtune.model.adapter import FlatAdapter, attach_lora
from fedtune.model.base import load_base_model, load_tokenizer, resolve_model_dir
from fedtune.privacy.noise import os_entropy_generator
from fedtune.round.plan import LocalWork
from fedtune.seeding import derive_seed, numpy_rng, tensor_key, torch_generator
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


ROOT_CLIENT = "server-root"


def root_data(config: Config, tokenizer: Any, clients: Sequence[ClientData] | None = None) -> ClientData:
    """FLTrust's root data: `server.root_examples` examples drawn (seeded) from the simulated clients'
    clean training examples (`server.root_data = "sample"`, the FLTrust paper's setting), or from the
    file `server.root_data`, loaded as a site loads its own."""
    server, seed = config.server, config.run.seed
    if server.root_data == "sample":
        if clients is None:
            raise ValueError("server.root_data = 'sample' draws from the simulated clients' data")
        pool = [ex for c in clients for ex in c.train]
        rng = numpy_rng(seed, "fltrust-root-data")
        chosen = rng.choice(len(pool), size=min(server.root_examples, len(pool)), replace=False)
        return ClientData(ROOT_CLIENT, train=[pool[i] for i in chosen.tolist()], eval=[])
    site = load_site(Path(server.root_data), config.data, ROOT_CLIENT, tokenizer, seed)
    return ClientData(ROOT_CLIENT, train=[*site.train, *site.eval][: server.root_examples], eval=[])


@dataclass
class RootUpdate:
    """The server's own delta from the global adapter on its root data: plain local AdamW steps, the
    clients' local work. Its seed is named by the adapter it starts from, so a resumed run repeats it.
    `mask`: under split personalization the clients send A's deltas only, so the reference is A's too."""

    trainer: LocalTrainer
    root: ClientData
    work: LocalWork
    seed: int
    mask: torch.Tensor | None = None

    @classmethod
    def over(cls, config: Config, local: LocalModel, root: ClientData) -> RootUpdate:
        mask = local.adapter.layout.a_mask if config.personalize.method == "split" else None
        trainer = LocalTrainer(local.model, local.adapter, config.train, local.pad_id)
        return cls(trainer, root, local_work(config), config.run.seed, mask)

    def __call__(self, global_flat: torch.Tensor) -> torch.Tensor:
        update = self.trainer.train(
            global_flat,
            self.root,
            seed=derive_seed(self.seed, "fltrust-root", tensor_key(global_flat)),
            steps=self.work.steps,
            epochs=self.work.epochs,
        )
        delta = torch.zeros_like(global_flat) if update.delta is None else update.delta
        return delta if self.mask is None else delta * self.mask
