"""A run's client-side update encoding: compression with each client's error-feedback residual.

The stages themselves live in `compress.pipeline` (clip -> noise -> compress -> quantize -> mask); this
holds what persists across rounds (the residual store) and what is drawn per round (the random-k seed), and
hands the collector what travels: payload bytes in the clear, or the kept values for secure aggregation
to mask. With `compression.method = "none"` the delta goes out as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from fedtune.compress import CompressionSpec, ResidualStore, UpdateEncoder
from fedtune.config import Config
from fedtune.seeding import derive_seed, torch_generator

Clip = Callable[[torch.Tensor], tuple[torch.Tensor, bool]]


class ClientEncoding:
    def __init__(self, config: Config) -> None:
        self.spec = CompressionSpec.from_config(config.compression)
        self.encoder = UpdateEncoder(self.spec)
        self.residuals = ResidualStore()
        self.seed = config.run.seed

    @property
    def active(self) -> bool:
        return self.spec.method != "none"

    def shared_seed(self, round_num: int) -> bytes | None:
        """The round's random-k seed, sent by the server to every client (seeded here for repeatability)."""
        if self.spec.method != "randomk":
            return None
        return derive_seed(self.seed, "compress-randomk", round_num).to_bytes(32, "big")

    def encode(
        self,
        delta: torch.Tensor,
        client_id: str,
        round_num: int,
        index: int,
        *,
        masked: bool,
        clip: Clip | None = None,
    ) -> tuple[torch.Tensor | bytes, bool]:
        """What the client sends (payload bytes, or, `masked`, the values secure aggregation will mask),
        and whether the update fit under the DP clip norm. `clip` (DP) runs inside the pipeline, after the
        error-feedback residual is added, so every vector that leaves the client is within the bound."""
        fits: list[bool] = []

        def clip_stage(update: torch.Tensor) -> torch.Tensor:
            clipped, fit = clip(update)  # type: ignore[misc]
            fits.append(fit)
            return clipped

        if not self.active:
            return (delta, True) if clip is None else (clip_stage(delta), fits[0])
        encoder = self.encoder if clip is None else replace(self.encoder, clip=clip_stage)
        captured: list[torch.Tensor] = []
        encoded = encoder.encode(
            delta,
            generator=torch_generator(self.seed, "compress", round_num, index),
            residual=self.residuals.get(client_id),
            shared_seed=self.shared_seed(round_num),
            mask=captured.append if masked else None,
        )
        if encoded.residual is not None:
            self.residuals.put(client_id, encoded.residual)
        fit = fits[0] if fits else True
        if masked:
            return captured[0], fit
        assert encoded.payload is not None  # the encoder returns bytes whenever no mask took the values
        return encoded.payload, fit
