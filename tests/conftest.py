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
