"""Data poisoning with a trigger phrase, and how often the global model has learned it.

`poison_client` rewrites a share of an attacker's training examples as (a prefix of the example) +
trigger + target + eos: the attacker trains on that with the honest trainer. `make_probes` builds
held-out trigger prompts from honest clients' held-out examples: a prefix, the trigger, then two
continuations, the attacker's target and the example's true next tokens (as long as the target).
Two rates: `success_rate`, the share of probes on which the model's greedy continuation of the prompt is
the target, token for token (what it would write); and `preference_rate`, the share on which its mean
per-token loss on the target is below its loss on the true continuation. The second has a high base rate
when the target is fluent text: after the inserted trigger the example's true continuation no longer
follows, so even the base model often prefers the target (83% of the default probes on SmolLM2-135M).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedtune.data import ClientData
from fedtune.data.batching import IGNORE_INDEX, collate

MIN_PREFIX_TOKENS = 2


@dataclass(frozen=True)
class Backdoor:
    trigger: tuple[int, ...]  # token ids, no special tokens
    target: tuple[int, ...]
    eos: int


def poison_client(
    client: ClientData, backdoor: Backdoor, fraction: float, max_len: int, rng: np.random.Generator
) -> ClientData:
    """The client with round(`fraction` x its training examples) (at least one) rewritten as prefix +
    trigger + target + eos, each at most `max_len` tokens (the prefix is cut to fit); its held-out
    examples stay clean."""
    tail = [*backdoor.trigger, *backdoor.target, backdoor.eos]
    room = max_len - len(tail)
    if room < 1:
        raise ValueError(
            f"attack.trigger and attack.target take {len(tail) - 1} tokens, and data.max_seq_len = "
            f"{max_len}: shorten them or raise data.max_seq_len"
        )
    train = list(client.train)
    count = max(1, round(fraction * len(train)))
    for i in rng.choice(len(train), size=min(count, len(train)), replace=False).tolist():
        example = train[i]
        cut = int(rng.integers(1, max(2, min(len(example), room) + 1)))
        train[i] = [*example[:cut], *tail]
    return replace(client, train=train)


@dataclass(frozen=True)
class Probes:
    """Trigger prompts with the two continuations to compare, token ids."""

    prompts: tuple[tuple[int, ...], ...]
    targets: tuple[tuple[int, ...], ...]
    truths: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.prompts)


def make_probes(
    clients: Sequence[ClientData], backdoor: Backdoor, count: int, rng: np.random.Generator
) -> Probes:
    """Up to `count` probes from the clients' held-out examples long enough for a prefix of at least
    two tokens and a true continuation of the target's length; seeded by `rng`."""
    width = len(backdoor.target)
    pool = [ex for c in clients for ex in c.eval if len(ex) >= MIN_PREFIX_TOKENS + width]
    if not pool:
        raise ValueError(
            "no held-out example is long enough to probe the backdoor: shorten attack.target or raise "
            "data.max_seq_len"
        )
    chosen = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    prompts, truths = [], []
    for i in chosen.tolist():
        example = pool[i]
        cut = int(rng.integers(MIN_PREFIX_TOKENS, len(example) - width + 1))
        prompts.append((*example[:cut], *backdoor.trigger))
        truths.append(tuple(example[cut : cut + width]))
    return Probes(tuple(prompts), (backdoor.target,) * len(prompts), tuple(truths))


@torch.inference_mode()
def continuation_loss(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """Mean next-token loss of each continuation after its prompt, [len(prompts)]."""
    model.eval()
    losses = []
    for start in range(0, len(prompts), batch_size):
        part = range(start, min(start + batch_size, len(prompts)))
        batch = collate([[*prompts[i], *continuations[i]] for i in part], pad_id)
        labels = batch.pop("labels")
        prompt_lengths = torch.tensor([len(prompts[i]) for i in part])
        labels[torch.arange(labels.shape[1]) < prompt_lengths[:, None]] = IGNORE_INDEX
        logits = model(**batch).logits[:, :-1].float()
        shifted = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counted = (shifted != IGNORE_INDEX).sum(dim=1)
        losses.append(nll.sum(dim=1) / counted)
    return torch.cat(losses)


def preference_rate(model: torch.nn.Module, probes: Probes, pad_id: int) -> float:
    """The share of probes whose target continuation the model finds likelier (per token) than the
    true one."""
    target = continuation_loss(model, probes.prompts, probes.targets, pad_id)
    truth = continuation_loss(model, probes.prompts, probes.truths, pad_id)
    return float((target < truth).double().mean())


@torch.inference_mode()
def success_rate(model: torch.nn.Module, probes: Probes, pad_id: int, batch_size: int = 32) -> float:
    """The share of probes on which greedy decoding after the prompt writes the target: every target
    token is the model's most likely next token given the prompt and the target before it (teacher
    forcing checks exactly what greedy generation would produce, in one forward pass)."""
    model.eval()
    hits = []
    for start in range(0, len(probes), batch_size):
        part = range(start, min(start + batch_size, len(probes)))
        batch = collate([[*probes.prompts[i], *probes.targets[i]] for i in part], pad_id)
        labels = batch.pop("labels")
        prompt_lengths = torch.tensor([len(probes.prompts[i]) for i in part])
        labels[torch.arange(labels.shape[1]) < prompt_lengths[:, None]] = IGNORE_INDEX
        predicted = model(**batch).logits[:, :-1].argmax(dim=-1)
        shifted = labels[:, 1:]
        counted = shifted != IGNORE_INDEX
        hits.append(((predicted == shifted) | ~counted).all(dim=1))
    return float(torch.cat(hits).double().mean())
