"""The `[train]` config section: each client's local optimizer."""

from __future__ import annotations

from pydantic import Field

from fedtune.section import PositiveInt, Section


class TrainConfig(Section):
    """Each client's local optimizer (AdamW)."""

    lr: float = Field(2e-3, gt=0.0)
    batch_size: PositiveInt = 4
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)  # 0 disables gradient clipping
    proximal_mu: float = Field(0.0, ge=0.0)  # FedProx: + mu/2 ||w - w_global||^2 on the LoRA parameters
