"""SCAFFOLD (Karimireddy et al. 2020): control variates that correct client drift, "option II" update.

The server keeps a control c and every client its own c_i (both float32, one value per adapter value,
zero at the start). A selected client receives c with the global adapter x, takes its K local steps with
every gradient corrected by (c - c_i) (`Trainer.train(correction=...)`), and ends at y_i with the delta
delta_i = y_i - x. Option II then sets

    c_i+ = c_i - c + (x - y_i) / (K eta) = c_i - c - delta_i / (K eta),    Delta c_i = c_i+ - c_i,

with eta the local learning rate (`train.lr`). The client sends [delta_i, s * Delta c_i] as ONE vector of
twice the adapter's size, so error feedback, compression, secure aggregation's fixed point and masks,
and the server's weighted sum treat both halves alike (the control deltas are securely aggregated
whenever the deltas are). The server splits the round's weighted mean: the first half is the round's
delta for the rule and the server optimizer, as without SCAFFOLD; the second half, divided by s, is the
mean control delta, and c <- c + (|S| / N) mean(Delta c_i), |S| the updates in the sum, N the population.

The scale s. Delta c_i is delta_i / (K eta) in size: with eta = 2e-3 and K = 8 about 60 times the delta,
which would overflow secure aggregation's fixed-point range (`secure_aggregation.clip_range`, sized for
deltas) or, in one quantized vector, cost the delta its precision. The control half therefore travels
multiplied by the public s = eta * K_ref, K_ref = `federation.local_steps` (1 when clients train whole
epochs: their K differs and is not public): s * Delta c_i = -s c - delta_i in the steps mode, the size of
a delta or twice it, so a clip range that fits the deltas fits the control half within a factor 2. Values
past the clip range are clipped by the fixed point like any delta coordinate.

Caveats, stated where they bite: option II assumes the K local steps are plain SGD steps of size eta; with
AdamW (fedtune's local optimizer) (x - y_i) / (K eta) is not the mean gradient but a scaled mean of Adam
steps. Using it anyway is the common practice with adaptive local optimizers (and c - c_i is added to the
gradient, before clipping, as the paper's correction of the SGD direction). A client's c_i+ is computed
exactly; the server's c is updated with what arrived of the Delta c_i, so under lossy compression c only
approximates the mean of the c_i (error feedback carries the difference into later rounds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ControlSpec:
    """SCAFFOLD's public numbers, the same on the server and every client."""

    lr: float  # the local learning rate eta (train.lr)
    scale: float  # s: the control half of an update travels as s * Delta c_i

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.scale > 0):
            raise ValueError("SCAFFOLD's learning rate and scale must be positive")


@dataclass(frozen=True, eq=False)
class ClientControlStep:
    """A client's control after its round: c_i+, and Delta c_i = c_i+ - c_i."""

    control: torch.Tensor  # c_i+
    delta: torch.Tensor  # Delta c_i


def correction(server: torch.Tensor, client: torch.Tensor | None) -> torch.Tensor:
    """c - c_i, added to every local gradient (a client with no control yet has c_i = 0)."""
    return server.clone() if client is None else server - client


def client_step(
    delta: torch.Tensor, server: torch.Tensor, client: torch.Tensor | None, *, steps: int, lr: float
) -> ClientControlStep:
    """Option II: c_i+ = c_i - c - delta / (K eta), with K = `steps` and eta = `lr`."""
    if steps < 1:
        raise ValueError("a control update needs at least one local step")
    change = (-server).sub_(delta / (steps * lr))  # Delta c_i = -c - delta / (K eta)
    current = torch.zeros_like(server) if client is None else client
    return ClientControlStep(current + change, change)


def pack(delta: torch.Tensor, control_delta: torch.Tensor, scale: float) -> torch.Tensor:
    """What a client sends: [delta, s * Delta c_i], one float32 vector of twice the adapter's size."""
    return torch.cat([delta, control_delta * scale])


def split(total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed vector (or a sum of them) as its delta half and its (scaled) control half."""
    if total.dim() != 1 or total.numel() % 2:
        raise ValueError(f"a SCAFFOLD update has an even number of values, not shape {tuple(total.shape)}")
    half = total.numel() // 2
    return total[:half], total[half:]


def server_step(
    server: torch.Tensor, mean_scaled: torch.Tensor, *, count: int, population: int, scale: float
) -> torch.Tensor:
    """c + (|S| / N) * mean(Delta c_i): `mean_scaled` is the round's weighted mean of s * Delta c_i."""
    mean = mean_scaled.to(torch.float32) / scale
    return server + mean * (count / population)
