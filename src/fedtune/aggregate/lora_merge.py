"""LoRA-aware aggregation in product space: the mean of the clients' B_i @ A_i, re-factored by truncated SVD.

Averaging A and B separately does not average what the clients learned: mean(B_i) @ mean(A_i) is not
mean(B_i @ A_i). `SvdMerge` forms, per adapted module, the weighted mean of the clients' products (each
client's factors are the global ones plus its delta), moves the global product toward it by the server's
learning rate, and re-factors the result to the adapter's rank by truncated SVD: by Eckart-Young the best
rank-r approximation in Frobenius norm. What the truncation drops is reported as a relative Frobenius
residual, ||M - M_r|| / ||M|| over all modules together.

The mean product is never formed densely. It is a product of two thin factors, M = Bcat @ Acat, where
Bcat stacks the scaled B_i side by side ([out, k]) and Acat the A_i on top of each other ([k, in]), k the
clients' ranks summed (plus the global pair's). A QR of each factor leaves a k x k core whose SVD is M's:
one batched `torch.linalg.qr` / `svd` per group of same-shape modules (`layout.PairGroup`), in float64,
no Python loop over clients or parameters. The new factors are B = U_r S_r and A = V_r^T: A keeps unit
rows, the scale of its random init, so gradients keep reaching B; splitting S evenly would shrink A with
a small update and slow the next round's training. The global pair enters with weight 1 - lr (0 at the
default lr = 1), which keeps its A directions in the span, so a component with a zero singular value still
gets a unit A row and zero B column (trainable), never a dead all-zero pair.

Heterogeneous ranks (FlexLoRA, Bai et al. 2024): clients that train the first r_i components of a
rank-R adapter have products of rank r_i; the merge is the same, and each client then takes the first r_i
components of the result, the best rank-r_i approximation of the global product (SVD orders them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedtune.layout import AdapterLayout, PairGroup


@dataclass(frozen=True, eq=False)
class Merged:
    global_flat: torch.Tensor  # float32, the new global adapter
    relative_residual: float | None  # ||M - M_r||_F / ||M||_F over every module; None: no truncation


@dataclass(frozen=True, eq=False)
class Refactored:
    b: torch.Tensor  # [modules, out, rank]
    a: torch.Tensor  # [modules, rank, in]
    dropped_sq: torch.Tensor  # [modules]: the squared singular values past the rank
    total_sq: torch.Tensor  # [modules]: ||M||_F^2


def refactor(b_cat: torch.Tensor, a_cat: torch.Tensor, rank: int) -> Refactored:
    """The best rank-`rank` factors of M = b_cat @ a_cat, batched over modules: b_cat [m, out, k],
    a_cat [m, k, in] with k >= rank."""
    if a_cat.shape[-2] < rank:
        raise ValueError(f"the factors have {a_cat.shape[-2]} components, fewer than rank {rank}")
    q_b, r_b = torch.linalg.qr(b_cat)  # [m, out, k'], [m, k', k]
    q_a, r_a = torch.linalg.qr(a_cat.mT)  # [m, in, k''], [m, k'', k]
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)  # the core, [m, k', k'']
    s_sq = s.square()
    return Refactored(
        b=(q_b @ u[..., :rank]) * s[..., None, :rank],
        a=vh[..., :rank, :] @ q_a.mT,
        dropped_sq=s_sq[..., rank:].sum(-1),
        total_sq=s_sq.sum(-1),
    )


def _factors(
    group: PairGroup, global_flat: torch.Tensor, clients: torch.Tensor, coeffs: torch.Tensor, keep: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bcat [m, out, (n+1) r] and Acat [m, (n+1) r, in] of sum_i coeffs_i B_i A_i + keep * B_g A_g, where
    `clients` [n, numel] are the clients' adapters (global + delta)."""
    a_g, b_g = global_flat[group.a_index], global_flat[group.b_index]  # [m, r, in], [m, out, r]
    a_i, b_i = clients[:, group.a_index], clients[:, group.b_index]  # [n, m, r, in], [n, m, out, r]
    n, m, out, r = b_i.shape
    b_scaled = torch.cat([b_i * coeffs.view(n, 1, 1, 1), (b_g * keep).unsqueeze(0)])  # [n+1, m, out, r]
    a_all = torch.cat([a_i, a_g.unsqueeze(0)])  # [n+1, m, r, in]
    b_cat = b_scaled.permute(1, 2, 0, 3).reshape(m, out, (n + 1) * r)
    a_cat = a_all.permute(1, 0, 2, 3).reshape(m, (n + 1) * r, a_g.shape[-1])
    return b_cat, a_cat


@dataclass(frozen=True, eq=False)
class SvdMerge:
    """`server.lora_aggregation = "svd"` (or `"flexlora"`, with clients' ranks): the weighted mean of the
    clients' products, re-factored to the adapter's rank."""

    layout: AdapterLayout
    lr: float = 1.0  # the server's step toward the mean product: (1 - lr) P_global + lr M

    def __post_init__(self) -> None:
        if not self.layout.pairs:
            raise ValueError("SVD aggregation needs both LoRA factors in the adapter vector (not FFA-LoRA)")
        if len(self.layout.ranks) != 1:
            raise ValueError(f"the adapter's modules have different ranks {sorted(self.layout.ranks)}")

    @property
    def rank(self) -> int:
        return next(iter(self.layout.ranks))

    def __call__(
        self,
        global_flat: torch.Tensor,
        deltas: torch.Tensor,
        weights: torch.Tensor,
        ranks: Sequence[int] | None = None,
    ) -> Merged:
        """The new global adapter from every client's delta [n, numel] and weight [n]. With `ranks`, client
        i trained the first ranks[i] components from the global adapter truncated to them, and its delta
        is from that truncated start."""
        x = global_flat.to(torch.float64)
        d = deltas.to(torch.float64)
        w = weights.to(torch.float64)
        coeffs = self.lr * w / w.sum()
        # what is not a LoRA pair (nothing, for PEFT's LoRA) moves by the weighted mean, as in FedAvg
        new = x + coeffs @ d
        clients = x + d if ranks is None else x * rank_masks(self.layout, ranks).to(x.dtype) + d
        dropped = total = 0.0
        for group in self.layout.groups:  # one batched QR/SVD per module shape (a handful per model)
            b_cat, a_cat = _factors(group, x, clients, coeffs, 1.0 - self.lr)
            result = refactor(b_cat, a_cat, self.rank)
            new[group.a_index] = result.a
            new[group.b_index] = result.b
            dropped += float(result.dropped_sq.sum())
            total += float(result.total_sq.sum())
        residual = (dropped / total) ** 0.5 if total > 0 else 0.0
        return Merged(new.to(torch.float32), residual)


def rank_masks(layout: AdapterLayout, ranks: Sequence[int]) -> torch.Tensor:
    """[clients, numel]: where each client, at its rank, trains (`AdapterLayout.rank_mask`)."""
    masks = {r: layout.rank_mask(r) for r in set(ranks)}
    return torch.stack([masks[r] for r in ranks])


@dataclass(frozen=True, eq=False)
class RankWeightedMean:
    """`server.lora_aggregation = "hetlora"` (HetLoRA, Cho et al. 2024): clients train the first r_i
    components of the rank-R adapter (zero-padded past r_i), and each component is averaged over the
    clients that train it: delta_j = sum_i w_i delta_ij / sum_{i: r_i > j} w_i. A client's delta is zero
    past its rank, so the numerator is the plain weighted sum (streaming, or secure aggregation's), and
    the per-coordinate denominator follows from the public ranks and weights alone."""

    layout: AdapterLayout

    def denominator(self, weights: Sequence[float], ranks: Sequence[int]) -> torch.Tensor:
        """[numel] float64: the summed weight of the clients that train each coordinate."""
        by_rank: dict[int, float] = {}
        for w, r in zip(weights, ranks, strict=True):
            by_rank[r] = by_rank.get(r, 0.0) + float(w)
        total = torch.zeros(self.layout.numel, dtype=torch.float64)
        for r, w in by_rank.items():  # a handful of distinct ranks
            total += self.layout.rank_mask(r).to(torch.float64) * w
        return total

    def mean(self, total: torch.Tensor, weights: Sequence[float], ranks: Sequence[int]) -> torch.Tensor:
        """The rank-weighted mean from the weighted sum `total`; 0 where no client trains."""
        denominator = self.denominator(weights, ranks)
        trained = denominator > 0
        out = torch.zeros_like(total, dtype=torch.float64)
        out[trained] = total.to(torch.float64)[trained] / denominator[trained]
        return out
