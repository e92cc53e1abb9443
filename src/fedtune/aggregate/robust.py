"""Byzantine-robust aggregation rules over the round's whole update matrix, like `rules`.

Each takes `deltas` [clients, params] and `weights` [clients] (examples per client) and returns one delta
[params]; what is notable:

- pairwise distances (Krum) come from one `torch.cdist` over the stack in float64: the matrix-product
  form |x|^2 + |y|^2 - 2 x.y cancels badly in float32 when updates are close relative to their norms;
- the iterative rules (Weiszfeld's geometric median, centered clipping) start at the coordinate median,
  not at the mean: both converge from their start, and a mean that one huge update dragged away would take
  many iterations to leave (a start inside the honest updates needs few);
- a round with fewer updates than a rule's assumption (Krum's n - f - 2 < 1 after dropouts) falls back as
  each docstring says instead of failing the round; the config refuses a cohort that is too small at start;
- FLTrust's reference (the server's own update on its root data) is an argument: it is trained elsewhere
  (`Aggregator.reference`).

Each says where it ignores `weights`: where the paper's rule does.
"""

from __future__ import annotations

import torch

from fedtune.aggregate.rules import coordinate_median, weighted_mean


def norm_bound(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    bound: float | None = None,
    median_multiple: float = 1.0,
) -> torch.Tensor:
    """Norm bounding (Sun et al. 2019, "Can you really backdoor federated learning?"): each update's L2
    norm is clipped to `bound`, or when it is None to `median_multiple` x the median of the round's update
    norms; then FedAvg's weighted mean. A bound of zero (most updates zero) zeroes every update."""
    norms = torch.linalg.vector_norm(deltas, dim=1)
    if bound is None:
        limit = median_multiple * coordinate_median(norms.unsqueeze(1), weights)[0]
    else:
        limit = torch.tensor(bound, dtype=norms.dtype)
    scale = torch.where(norms > limit, limit / norms, torch.ones_like(norms))
    return weighted_mean(deltas * scale.unsqueeze(1), weights)


def krum_scores(deltas: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Krum's score of each update (Blanchard et al. 2017): the sum of its squared distances to its
    n - f - 2 nearest other updates, float64 [clients]. With n - f - 2 < 1 (a round that lost updates)
    it scores by the one nearest other update; a lone update scores 0."""
    if byzantine < 0:
        raise ValueError(f"the number of attackers per round must be at least 0, got {byzantine}")
    n = deltas.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    x = deltas.to(torch.float64)
    squared = torch.cdist(x, x).square()
    squared.fill_diagonal_(float("inf"))  # an update is not its own neighbour
    neighbours = max(n - byzantine - 2, 1)
    return squared.topk(neighbours, dim=1, largest=False).values.sum(dim=1)


def krum(deltas: torch.Tensor, weights: torch.Tensor, *, byzantine: int) -> torch.Tensor:
    """Krum (Blanchard et al. 2017): the one update with the lowest score (`krum_scores`) with `byzantine`
    = f attackers assumed per round. Weights are ignored, as in the paper: a client's example count would
    be the attacker's to claim. Ties go to the lowest slot: with two updates nothing tells them apart."""
    del weights
    return deltas[int(krum_scores(deltas, byzantine).argmin())]


def multi_krum(
    deltas: torch.Tensor, weights: torch.Tensor, *, byzantine: int, keep: int | None = None
) -> torch.Tensor:
    """Multi-Krum (Blanchard et al. 2017): the weighted mean of the `keep` lowest-scoring updates
    (default n - f, at least 1, at most n). The weights enter only that mean, not the scores (the paper
    averages uniformly; weighting the kept updates is FedAvg's mean over the ones Krum trusts)."""
    n = deltas.shape[0]
    kept = min(max(n - byzantine if keep is None else keep, 1), n)
    order = krum_scores(deltas, byzantine).sort(stable=True).indices[:kept]
    return weighted_mean(deltas[order], weights[order])


def geometric_median(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    iterations: int = 8,
    eps: float = 1e-8,
    tolerance: float = 1e-6,
) -> torch.Tensor:
    """The weighted geometric median argmin_v sum_i w_i ||v - delta_i|| by smoothed Weiszfeld (RFA,
    Pillutla et al. 2022): v <- sum_i b_i delta_i / sum_i b_i with b_i = w_i / max(eps, ||v - delta_i||),
    for at most `iterations` steps, stopping once the objective improves by less than `tolerance` of
    itself. `eps` (RFA's nu) keeps a step finite when v sits on an update. Starts at the coordinate median
    (RFA starts at the mean, which a huge update drags away from the honest ones)."""
    if iterations < 1:
        raise ValueError(f"the geometric median needs at least one Weiszfeld iteration, got {iterations}")
    w = weights.to(deltas.dtype)
    median = coordinate_median(deltas, weights)
    distances = torch.linalg.vector_norm(deltas - median, dim=1)
    objective = float(w @ distances)
    for _ in range(iterations):
        beta = w / distances.clamp(min=eps)
        median = (beta @ deltas) / beta.sum()
        distances = torch.linalg.vector_norm(deltas - median, dim=1)
        improved, objective = objective, float(w @ distances)
        if improved - objective <= tolerance * objective:
            break
    return median


def centered_clip(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    tau: float | None = None,
    iterations: int = 3,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """Centered clipping (Karimireddy et al. 2021, "Learning from history"): v <- v + sum_i w_i
    clip_tau(delta_i - v) / sum_i w_i, `iterations` times, where clip_tau scales a vector down to L2 norm
    `tau`. The paper weighs clients equally and starts at the previous round's aggregate; here the mean
    is weighted and v starts at `center`, by default the round's coordinate median (`Aggregator` has no
    previous aggregate, and zeros would put every honest update a whole norm away, so tau would have to
    admit each attacker that far per iteration). `tau` None: the median distance of the updates to the
    start, which a minority of attackers cannot inflate; so an attacker moves v by at most tau x its
    weight share per iteration."""
    if iterations < 1:
        raise ValueError(f"centered clipping needs at least one iteration, got {iterations}")
    w = weights.to(deltas.dtype)
    v = coordinate_median(deltas, weights) if center is None else center.to(deltas.dtype)
    radius = None if tau is None else torch.tensor(tau, dtype=deltas.dtype)
    for _ in range(iterations):
        offsets = deltas - v
        distances = torch.linalg.vector_norm(offsets, dim=1)
        if radius is None:
            radius = coordinate_median(distances.unsqueeze(1), weights)[0]
        scale = torch.where(distances > radius, radius / distances, torch.ones_like(distances))
        v = v + ((w * scale) @ offsets) / w.sum()
    return v


def fltrust(deltas: torch.Tensor, weights: torch.Tensor, *, reference: torch.Tensor) -> torch.Tensor:
    """FLTrust (Cao et al. 2021): trust TS_i = ReLU(cos(delta_i, reference)), each update rescaled to
    ||reference||, and sum_i TS_i * rescaled_i / sum_i TS_i. `reference` is the server's own update on its
    trusted root data. Weights are ignored, as in the paper: trust comes from the direction alone. A zero
    update, or a zero reference, has no direction and no trust; when no update has any (all point away from
    the reference) the result is a zero delta: the round leaves the adapter as it is."""
    if reference.shape != deltas.shape[1:]:
        raise ValueError(
            f"FLTrust's reference has shape {tuple(reference.shape)}, the updates {tuple(deltas.shape[1:])}"
        )
    del weights
    ref = reference.to(deltas.dtype)
    ref_norm = torch.linalg.vector_norm(ref)
    norms = torch.linalg.vector_norm(deltas, dim=1)
    usable = (norms > 0) & (ref_norm > 0)
    safe = torch.where(usable, norms, torch.ones_like(norms))
    trust = torch.where(usable, (deltas @ ref) / (safe * ref_norm.clamp(min=torch.finfo(ref.dtype).tiny)), 0)
    trust = trust.clamp(min=0)
    total = trust.sum()
    if total <= 0:
        return torch.zeros_like(ref)
    return ((trust * ref_norm / safe) @ deltas) / total
