"""The `[model]` and `[lora]` config sections."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from fedtune.section import PositiveInt, Section


class ModelConfig(Section):
    """The base model: a built-in name (`smollm2-135m`, `tiny`) or a local Hugging Face directory."""

    name: str = Field("smollm2-135m", min_length=1)


class LoraSettings(Section):
    """LoRA adapter shape, passed to `peft.LoraConfig`."""

    rank: PositiveInt = 8
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "auto": the attention projections of the loaded architecture (`model.targets`); or module names
    target_modules: Literal["auto"] | Annotated[list[str], Field(min_length=1)] = "auto"
