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

The scale s. By the formula Delta c_i is delta_i / (K eta) in size: with eta = 2e-3 and K = 8 about 60
times the delta, which would overflow secure aggregation's fixed-point range
(`secure_aggregation.clip_range`, sized for deltas) or, in one quantized vector, cost the delta its
precision. The control half therefore travels multiplied by the public s = eta * K_ref, K_ref =
`federation.local_steps` (1 when clients train whole epochs: their K differs and is not public):
s * Delta c_i = -s c - delta_i in the steps mode, the size of a delta or twice it, so a clip range that
fits the deltas fits the control half within a factor 2. Values past the clip range are clipped by the
fixed point like any delta coordinate.

How c_i+ is computed, and why not by the formula above. For K plain SGD steps y <- y - eta (g + c - c_i),
(x - y_i) / (K eta) = mean(g) + c - c_i, so option II's c_i+ is exactly the mean of the client's raw
minibatch gradients g over its steps. fedtune's local optimizer is AdamW, whose steps are about eta per
coordinate whatever the gradient's size: there the formula gives c_i ~ mean Adam step / eta, values of
order 1 in units that are not the gradient's, and the correction c - c_i then swamps the gradient it is
added to (on the tests' tiny random-init model, one seed, 6 rounds at train.lr = 0.01: final eval loss
9.39 with the formula against 8.57 for FedAvg and 8.47 with the mean gradient; at lr = 0.05 the formula's
run diverged, from 10.3 to 13.5). So a trainer
that reports its mean raw gradient (`ClientUpdate.mean_gradient`: `LocalTrainer` does, summed in one
vectorized pass per step, before the correction, FedProx's term and clipping) sets c_i+ to it
(`client_step_from_gradients`), which is option II's value under SGD and stays in gradient units under
AdamW; a trainer that does not falls back to the formula (`client_step`). Either way Delta c_i = c_i+ - c_i
travels: under SGD in the steps mode s * Delta c_i = -s c - delta_i as above; under AdamW it is
eta K (mean g - c_i), gradient-sized values times eta K, below an Adam delta's eta K per coordinate while
gradients are below 1.

Caveats, stated where they bite: SCAFFOLD's analysis assumes SGD local steps; with AdamW the corrected
gradient g + c - c_i is normalized by Adam like any gradient (the common practice with adaptive local
optimizers), so the correction removes drift in the gradient's direction, not in the step's size. A
client's c_i+ is computed exactly; the server's c is updated with what arrived of the Delta c_i, so under
lossy compression c only approximates the mean of the c_i (error feedback carries the difference into
later rounds). A client whose update never joins a sum (a straggler, a refused update, a failed or aborted
round) keeps its c_i+ all the same, while c does not move: c then lags the mean of the c_i, a stale
estimate the correction tolerates, not a broken invariant.
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


def client_step_from_gradients(mean_gradient: torch.Tensor, client: torch.Tensor | None) -> ClientControlStep:
    """c_i+ = the mean of the client's raw minibatch gradients over its steps (what option II's formula
    computes for plain SGD steps, in gradient units whatever the optimizer)."""
    change = mean_gradient.clone() if client is None else mean_gradient - client
    return ClientControlStep(mean_gradient.clone(), change)


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
