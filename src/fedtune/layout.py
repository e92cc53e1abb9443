"""Where each LoRA tensor sits in the flat adapter vector: one object for the rules, the wire and the files.

The flat adapter (`model.adapter.FlatAdapter`) is every trainable LoRA tensor laid end to end. An
`AdapterLayout` names them: each tensor's name, shape and offset, and the A/B pairs of each adapted module
(A is [rank, in_features], B is [out_features, rank]; their product B @ A is the module's weight update,
before LoRA's alpha / rank scaling). The product-space rules (`aggregate.lora_merge`: SVD re-factoring,
heterogeneous ranks) work on groups of modules of one shape at once (`PairGroup`: index tensors that gather
every module's A, or B, out of a flat vector, or out of a [clients, numel] stack, in one indexing
operation); `split` names a flat vector's pieces for a checkpoint or PEFT's file; the transport checks
sizes against `numel`. Pure torch, no model: the server builds it from names and shapes alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

_A, _B = "lora_A", "lora_B"


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of the adapter: `numel` values from `offset` in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def indices(self) -> torch.Tensor:
        """Its positions in the flat vector, shaped like the tensor."""
        return torch.arange(self.offset, self.offset + self.numel).view(self.shape)


@dataclass(frozen=True)
class LoraPair:
    """An adapted module's A [rank, in] and B [out, rank]."""

    module: str
    a: TensorSlot
    b: TensorSlot

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(out_features, rank, in_features)."""
        return self.b.shape[0], self.rank, self.a.shape[1]


@dataclass(frozen=True, eq=False)
class PairGroup:
    """Modules whose A and B have one shape: `a_index` [modules, rank, in] and `b_index` [modules, out, rank]
    are their positions in the flat vector, so `flat[..., a_index]` is every A of the group at once."""

    pairs: tuple[LoraPair, ...]
    a_index: torch.Tensor
    b_index: torch.Tensor


@dataclass(frozen=True)
class AdapterLayout:
    tensors: tuple[TensorSlot, ...]

    @classmethod
    def of(cls, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> AdapterLayout:
        """The layout of tensors laid end to end in the given order."""
        slots, offset = [], 0
        for name, shape in zip(names, shapes, strict=True):
            slot = TensorSlot(name, tuple(int(s) for s in shape), offset)
            slots.append(slot)
            offset += slot.numel
        return cls(tuple(slots))

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def describe(self) -> list[list[object]]:
        """[name, shape] of every tensor, JSON-able: what a checkpoint records."""
        return [[t.name, list(t.shape)] for t in self.tensors]

    def mismatch(self, described: object) -> str | None:
        """How a recorded `describe()` differs from this layout (the first tensor that differs), or None."""
        if not isinstance(described, list):
            return "the recorded layout is not a list of [name, shape]"
        mine = self.describe()
        for k, (want, got) in enumerate(zip(described, mine, strict=False)):
            if want != got:
                return f"tensor {k} was {want}, this model's is {got}"
        if len(described) != len(mine):
            return f"{len(described)} tensors were recorded, this model has {len(mine)}"
        return None

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named tensors of `flat` (views, shaped)."""
        if flat.shape != (self.numel,):
            raise ValueError(f"an adapter vector has {self.numel} values, this one {flat.numel()}")
        pieces = torch.split(flat, [t.numel for t in self.tensors])
        return {t.name: p.view(t.shape) for t, p in zip(self.tensors, pieces, strict=True)}

    @cached_property
    def pairs(self) -> tuple[LoraPair, ...]:
        """The A/B pair of every adapted module, in layout order; empty when A is not in the vector
        (FFA-LoRA: only B trains and travels)."""
        by_name = {t.name: t for t in self.tensors}
        pairs = []
        for slot in self.tensors:
            if _A not in slot.name:
                continue
            partner = by_name.get(slot.name.replace(_A, _B))
            if partner is None or len(slot.shape) != 2 or len(partner.shape) != 2:
                raise ValueError(f"LoRA tensor {slot.name!r} has no matching 2-D {_B} tensor")
            if partner.shape[1] != slot.shape[0]:
                raise ValueError(f"{slot.name!r} and its B disagree on the rank ({partner.shape})")
            pairs.append(LoraPair(slot.name.split(f".{_A}")[0], slot, partner))
        return tuple(pairs)

    @property
    def ranks(self) -> frozenset[int]:
        return frozenset(p.rank for p in self.pairs)

    @cached_property
    def groups(self) -> tuple[PairGroup, ...]:
        """The pairs grouped by shape, each group with its gather indices."""
        by_shape: dict[tuple[int, int, int], list[LoraPair]] = {}
        for pair in self.pairs:
            by_shape.setdefault(pair.shape, []).append(pair)
        return tuple(
            PairGroup(
                tuple(group),
                torch.stack([p.a.indices() for p in group]),
                torch.stack([p.b.indices() for p in group]),
            )
            for group in by_shape.values()
        )

    @cached_property
    def a_mask(self) -> torch.Tensor:
        """True at every value of every LoRA A (what `personalize.method = "split"` shares); computed
        once per layout, read-only."""
        mask = torch.zeros(self.numel, dtype=torch.bool)
        for pair in self.pairs:
            mask[pair.a.offset : pair.a.offset + pair.a.numel] = True
        return mask

    def rank_mask(self, rank: int) -> torch.Tensor:
        """True where a rank-`rank` client trains: the first `rank` rows of every A and columns of every B
        (of a layout at a higher rank; zero-padding, as HetLoRA pads to the largest rank)."""
        mask = torch.ones(self.numel, dtype=torch.bool)
        for group in self.groups:
            mask[group.a_index[:, rank:, :]] = False
            mask[group.b_index[:, :, rank:]] = False
        return mask
