"""Tokenization: one batched call to a fast Hugging Face tokenizer, an eos token, truncation.

Each example is `ids(text) + [eos]` cut to `max_seq_len` tokens, so a truncated example has no eos:
the model never learns that text ends where it was cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtune.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenize(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> list[list[int]]:
    """Token ids of every text, eos appended, at most `max_seq_len` long; one list per text."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; use a model whose tokenizer defines one")
    if not texts:
        return []
    # Truncating before appending eos gives the same result as after, without building long lists.
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_seq_len)
    return [[*seq, eos][:max_seq_len] for seq in ids["input_ids"]]
