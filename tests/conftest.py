"""Shared fixtures: a private model cache per test session, the tiny model and SmolLM2's tokenizer."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before gRPC loads: its handshake notes are not test output


_OWN_CACHE: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _OWN_CACHE
    if "FEDTUNE_CACHE" not in os.environ:
        _OWN_CACHE = tempfile.mkdtemp(prefix="fedtune-test-cache-")
        os.environ["FEDTUNE_CACHE"] = _OWN_CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from fedtune.model.base import resolve_model_dir

    return resolve_model_dir("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path):
    from fedtune.model.base import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture
def trainer(tiny_dir: Path, tokenizer):
    """A local trainer on the tiny model with rank-4 LoRA (A from seed 0), lr 1e-2."""
    import torch

    from fedtune.config import LoraSettings, TrainConfig
    from fedtune.model.adapter import FlatAdapter, attach_lora
    from fedtune.model.base import load_base_model
    from fedtune.train.local import LocalTrainer

    model = attach_lora(load_base_model(tiny_dir), LoraSettings(rank=4), torch.Generator().manual_seed(0))
    return LocalTrainer(model, FlatAdapter(model), TrainConfig(lr=1e-2), tokenizer.pad_token_id)


@pytest.fixture
def client(tokenizer):
    """One client with four training and two held-out copies of Hamlet's line."""
    from fedtune.data import ClientData

    texts = ["To be, or not to be, that is the question."] * 6
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    return ClientData("hamlet/HAMLET", train=ids[:4], eval=ids[4:])
