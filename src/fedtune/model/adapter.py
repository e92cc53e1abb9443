"""LoRA adapters through `peft`, viewed as one flat float32 vector.

Every trainable LoRA tensor is re-pointed into a single contiguous buffer, so reading a client's adapter,
loading the global one, or computing a delta is one vectorized copy, not a loop over parameters. This is
what lets one base model in memory serve any number of simulated clients. The buffer's `layout`
(`fedtune.layout`: each tensor's name, shape and offset, and the A/B pairs) is what the product-space
aggregation rules and the checkpoints read.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedtune.errors import ConfigError
from fedtune.layout import AdapterLayout
from fedtune.model.settings import LoraSettings
from fedtune.model.targets import describe_adaptable, fused_conv1d, resolve_targets


class FlatAdapter:
    """The trainable adapter tensors of a PEFT model, aliased into one flat buffer."""

    def __init__(self, model: torch.nn.Module) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters to federate")
        self.layout = AdapterLayout.of([n for n, _ in named], [p.shape for _, p in named])
        self.names = [t.name for t in self.layout.tensors]
        self.params = [p for _, p in named]
        self.numel = self.layout.numel
        self.buffer = torch.empty(self.numel, dtype=torch.float32)
        offset = 0
        for p in self.params:
            n = p.numel()
            self.buffer[offset : offset + n].copy_(p.detach().reshape(-1))
            p.data = self.buffer[offset : offset + n].view(p.shape)
            offset += n

    def get(self) -> torch.Tensor:
        """A copy of the current adapter as a flat vector."""
        return self.buffer.clone()

    def load(self, flat: torch.Tensor) -> None:
        """Overwrite the adapter with `flat` (in place: the parameters stay the same objects)."""
        if flat.shape != self.buffer.shape:
            raise ValueError(f"adapter vector has {flat.numel()} values, expected {self.numel}")
        self.buffer.copy_(flat)

    def state_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named tensors of `flat`, keyed like `model.named_parameters()`."""
        return {name: t.contiguous() for name, t in self.layout.split(flat).items()}


def attach_lora(
    base: torch.nn.Module, settings: LoraSettings, generator: torch.Generator, *, train_a: bool = True
) -> PeftModel:
    """Wrap `base` with LoRA; A matrices are initialised from `generator` (B is zero, as in PEFT). With
    `train_a` False (FFA-LoRA) the A matrices are frozen at that init: only B is trainable, so only B is
    in the flat adapter, trained, sent and aggregated; the saved adapter holds both."""
    targets = resolve_targets(base, settings.target_modules)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        fan_in_fan_out=fused_conv1d(base, targets),  # GPT-2 style Conv1D layers store weights transposed
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(base, config)
    except ValueError as exc:
        raise ConfigError(
            f"lora.target_modules = {targets}: {exc}; "
            f"the modules LoRA can adapt in this model: {describe_adaptable(base)}"
        ) from None
    for name, param in model.named_parameters():
        if "lora_A" in name:
            torch.nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)
            param.requires_grad_(train_a)
    return model


def save_adapter(
    model: PeftModel, adapter: FlatAdapter, flat: torch.Tensor, out_dir: Path, base_dir: Path
) -> Path:
    """Write `flat` with PEFT's own `save_pretrained`, naming `base_dir` as the base model."""
    adapter.load(flat)
    model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
    # base weights are frozen, so the adapter file never needs a copy of the (tied) embeddings
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
    return out_dir
