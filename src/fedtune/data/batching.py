"""Batches for causal LM training: right padding, an attention mask, and labels that ignore padding.

The mask comes from each example's length, not from comparing ids with `pad_id`, so a pad id that
is also the eos id (as in SmolLM2) still leaves every real eos token in the loss. The batch is built
with one numpy fill, not per-token Python loops.
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and Hugging Face models) skip


def collate(examples: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and `labels`, each a LongTensor [batch, longest example]."""
    if not examples:
        raise ValueError("collate needs at least one example")
    lengths = np.fromiter((len(ids) for ids in examples), dtype=np.int64, count=len(examples))
    real = np.arange(lengths.max()) < lengths[:, None]
    input_ids = np.full(real.shape, pad_id, dtype=np.int64)
    tokens = chain.from_iterable(examples)
    input_ids[real] = np.fromiter(tokens, dtype=np.int64, count=int(lengths.sum()))
    labels = np.where(real, input_ids, IGNORE_INDEX)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(real.astype(np.int64)),
        "labels": torch.from_numpy(labels),
    }
