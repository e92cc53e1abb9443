"""A training phase's replies on the server, in the clear: checked, decoded, clipped again under DP, summed.

`PlainCollection.deliver` is the `Exchange.deliver` of a plain round. Each submission is decoded as the
server would off the wire (float32 values, or a `fedtune.compress` payload), refused if it is malformed or
not finite, clipped to the DP norm (a client that skipped its own clip gains nothing), weighted by the
one `WeightRule`, and added to a running sum (FedAvg, streaming: O(adapter) whatever the cohort) or kept
for a rule that needs every update. Replies beyond the round's target are taken as late (stragglers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedtune.aggregate import RunningSum, StackedUpdates, SummedUpdates, UpdateStack
from fedtune.compress import PayloadError, decode
from fedtune.errors import Refusal
from fedtune.privacy.clip import clip_l2
from fedtune.round.messages import ClientReport, CompressedUpdate, DenseUpdate, MaskedUpdate, Submission
from fedtune.round.plan import WeightRule


def submission(reply: object) -> Submission:
    """The reply of a training phase, or a refusal."""
    if not isinstance(reply, Submission):
        raise Refusal("malformed", f"a training phase takes an update, not a {type(reply).__name__}")
    return reply


def train_loss(reports: Mapping[int, ClientReport]) -> float | None:
    """Example-weighted mean of the aggregated clients' mean local losses, in slot order."""
    ok = [reports[slot] for slot in sorted(reports) if math.isfinite(reports[slot].train_loss)]
    if not ok:
        return None
    return sum(r.train_loss * r.num_examples for r in ok) / sum(r.num_examples for r in ok)


class PlainCollection:
    def __init__(
        self,
        *,
        numel: int,
        weights: WeightRule,
        linear: bool,
        shared_seed: bytes | None = None,
        clip_l2_norm: float | None = None,
        target: int | None = None,
        coordinates: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        """`linear`: the rule is the weighted mean (sum as they come); `clip_l2_norm`: client-level DP's C;
        `coordinates`: by slot, the adapter values a lower-rank client sends (a bool mask; the rest is 0)."""
        self.numel = numel
        self.coordinates = coordinates or {}
        self.weights = weights
        self.shared_seed = shared_seed
        self.clip_l2_norm = clip_l2_norm
        self.target = target
        self.updates: RunningSum | UpdateStack = RunningSum() if linear else UpdateStack()
        self.reports: dict[int, ClientReport] = {}  # every submission's report, accepted or not
        self.accepted: dict[int, ClientReport] = {}
        self.failures: dict[int, tuple[str, str]] = {}  # slot -> (client id, reason)
        self.bytes_up = 0

    def deliver(self, slot: int, reply: object) -> bool:
        sub = submission(reply)
        self.bytes_up += sub.nbytes()
        if self.target is not None and len(self.accepted) >= self.target:
            return False
        report = sub.report
        self.reports[slot] = report
        if sub.update is None:
            self.failures[slot] = (report.client_id, report.error or "refused by the client")
            return True
        try:
            delta = self._decode(sub.update, self.coordinates.get(slot))
            weight = self.weights.of(report.num_examples)
            if weight < 1:
                raise Refusal("malformed", "an update must come from at least one training example")
        except Refusal as refusal:
            self.failures[slot] = (report.client_id, refusal.detail)
            raise
        if isinstance(self.updates, UpdateStack):
            self.updates.add(delta, weight, position=slot)  # stacked in slot order, whatever the arrival
        else:
            self.updates.add(delta, weight)
        self.accepted[slot] = report
        return True

    def _decode(self, update: object, coordinates: torch.Tensor | None) -> torch.Tensor:
        numel = self.numel if coordinates is None else int(coordinates.sum())
        if isinstance(update, MaskedUpdate):
            raise Refusal("wrong_encoding", "a masked input outside a secure aggregation round")
        if isinstance(update, CompressedUpdate):
            try:
                delta = decode(update.payload, numel, seed=self.shared_seed)
            except PayloadError as exc:
                raise Refusal("invalid_update", str(exc)) from None
        elif isinstance(update, DenseUpdate):
            delta = update.values
            if delta.dtype != torch.float32 or delta.shape != (numel,):
                raise Refusal("wrong_shape", f"an update has {numel} float32 values")
        else:
            raise Refusal("malformed", f"not an update: {type(update).__name__}")
        if not torch.isfinite(delta).all():
            raise Refusal("invalid_update", "the decoded update holds NaN or Inf values")
        if coordinates is not None:
            delta = torch.zeros(self.numel, dtype=delta.dtype).masked_scatter_(coordinates, delta)
        if self.clip_l2_norm is not None:
            delta = clip_l2(delta, self.clip_l2_norm).delta
        return delta

    def summed(self, denominator: float | None = None) -> SummedUpdates | StackedUpdates:
        """The round's updates: a sum over `denominator` (default: the summed weight), or the stack."""
        if isinstance(self.updates, RunningSum):
            return self.updates.summed(self.numel, denominator)
        return self.updates.stacked()
