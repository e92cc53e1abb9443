"""Text generation with a saved adapter, loaded the way any PEFT user would load it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

from fedtune.errors import ModelError
from fedtune.model.base import load_base_model, load_tokenizer


def base_dir_of(adapter_dir: Path) -> Path:
    """The base model directory an adapter names in its `adapter_config.json`."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ModelError(
            f"--adapter {str(adapter_dir)!r}: no adapter_config.json there; "
            "pass a run's adapter directory, e.g. runs/default/adapter"
        )
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ModelError(
            f"the adapter's base model {base!r} is not a local directory; "
            "run `fedtune run` on this machine first so the base model is cached"
        )
    return Path(base)


def generate(
    adapter_dir: Path | None,
    prompt: str,
    *,
    base_dir: Path | None = None,
    max_new_tokens: int = 60,
    temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """Continue `prompt` with base + adapter (or the bare base model when `adapter_dir` is None)."""
    if base_dir is None:
        if adapter_dir is None:
            raise ValueError("give an adapter directory or a base model directory")
        base_dir = base_dir_of(adapter_dir)
    tokenizer = load_tokenizer(base_dir)
    model = load_base_model(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    sample = temperature > 0
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)  # sampling in `generate` draws from torch's default generator
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=0.95 if sample else None,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
