"""Which modules LoRA adapts: `lora.target_modules = "auto"` (the attention projections of whatever
architecture is loaded), and the list of every module LoRA could adapt, for an error that shows them all.

PEFT's LoRA wraps `nn.Linear`, `nn.Embedding`, `nn.Conv1d/2d/3d` and transformers' `Conv1D` (GPT-2's
fused layers). "auto" takes the leaf names of such layers that sit inside an attention block (a path
component containing `attn` or `attention`) and appear nowhere else, so a name PEFT matches by suffix
never reaches into the MLP: Llama-style models (SmolLM2) get q/k/v/o_proj, GPT-2 gets its fused
`c_attn` (its `c_proj` is also the MLP's output, so it is left out, as in PEFT's own per-architecture
mapping).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers.pytorch_utils import Conv1D

from fedtune.errors import ConfigError

AUTO = "auto"
_ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)


def _is_attention(path: str) -> bool:
    return any("attn" in part or "attention" in part for part in path.lower().split(".")[:-1])


def adaptable_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """Layer type -> the sorted leaf names of the layers of that type LoRA can adapt."""
    found: dict[str, set[str]] = defaultdict(set)
    for path, module in model.named_modules():
        if isinstance(module, _ADAPTABLE):
            found[type(module).__name__].add(path.rsplit(".", 1)[-1])
    return {kind: sorted(names) for kind, names in sorted(found.items())}


def describe_adaptable(model: torch.nn.Module) -> str:
    """`Linear: lm_head, q_proj, ...; Embedding: embed_tokens` for an error message."""
    return "; ".join(f"{kind}: {', '.join(names)}" for kind, names in adaptable_modules(model).items())


def attention_targets(model: torch.nn.Module) -> list[str]:
    """The leaf names of adaptable layers inside attention blocks and nowhere else."""
    inside: set[str] = set()
    outside: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, _ADAPTABLE) and not isinstance(module, torch.nn.Embedding):
            (inside if _is_attention(path) else outside).add(path.rsplit(".", 1)[-1])
    return sorted(inside - outside)


def resolve_targets(model: torch.nn.Module, setting: list[str] | str) -> list[str]:
    """`lora.target_modules` as the list of names PEFT gets."""
    if setting != AUTO:
        return list(setting)
    targets = attention_targets(model)
    if not targets:
        raise ConfigError(
            "lora.target_modules = 'auto' found no attention projections in this model; name the modules "
            f"to adapt, from: {describe_adaptable(model)}"
        )
    return targets


def fused_conv1d(model: torch.nn.Module, targets: list[str]) -> bool:
    """Whether any targeted layer is a transformers `Conv1D` (PEFT then needs `fan_in_fan_out`)."""
    wanted = set(targets)
    return any(
        isinstance(m, Conv1D) and path.rsplit(".", 1)[-1] in wanted for path, m in model.named_modules()
    )
