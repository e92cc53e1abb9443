"""Black-box canary texts and their exposure on the trained model (Carlini et al. 2019, "The Secret Sharer").

A canary text is `prefix + " " + secret`, the secret a random number of `digits` digits. Each is inserted
(`repeats` times, into the training data of one seeded real client) or not by a seeded coin; the ones not
inserted are the control. After the run the model ranks the true secret among `candidates` other random
numbers of as many digits by its loss on the secret's tokens after the prefix, and

    exposure = log2(|candidates| + 1) - log2(rank)

(rank 1: the model finds the true secret likeliest, exposure is the largest possible). A model that learned
nothing of the secret ranks it uniformly: expected exposure about 1/ln 2 - 1 ~ 0.44 bits for a large set.
The candidate set is sampled rather than the whole space (Carlini et al.'s sampling estimate), so the
largest exposure is log2(candidates + 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedtune.data import ClientData
from fedtune.data.batching import IGNORE_INDEX, collate

Tokenize = Callable[[str], list[int]]  # text -> token ids, no special tokens


@dataclass(frozen=True)
class TextCanary:
    secret: str  # the digits
    client_id: str | None  # whose training data holds it; None: not inserted (a control)


def random_numbers(
    count: int, digits: int, rng: np.random.Generator, exclude: Sequence[str] = ()
) -> list[str]:
    """`count` distinct random numbers of `digits` digits (leading zeros kept), none in `exclude`."""
    space = 10**digits
    if count + len(set(exclude)) > space:
        raise ValueError(f"{count} distinct numbers of {digits} digits besides {len(set(exclude))}")
    taken, out = set(exclude), []
    while len(out) < count:
        for value in rng.integers(0, space, size=count - len(out)).tolist():
            text = str(value).zfill(digits)
            if text not in taken:
                taken.add(text)
                out.append(text)
    return out


def plan_texts(count: int, digits: int, clients: Sequence[str], rng: np.random.Generator) -> list[TextCanary]:
    """`count` canary texts, each inserted with probability 1/2 into a client drawn uniformly."""
    secrets = random_numbers(count, digits, rng)
    inserted = rng.random(count) < 0.5
    owners = rng.integers(0, len(clients), size=count)
    return [
        TextCanary(secret, clients[int(owner)] if inside else None)
        for secret, inside, owner in zip(secrets, inserted, owners, strict=True)
    ]


def canary_example(prompt: Sequence[int], secret: Sequence[int], eos: int) -> list[int]:
    return [*prompt, *secret, eos]


def insert_texts(
    clients: Sequence[ClientData],
    canaries: Sequence[TextCanary],
    examples: Callable[[TextCanary], list[int]],
    repeats: int,
) -> list[ClientData]:
    """The clients with each inserted canary's example (`examples(canary)`) added `repeats` times to its
    owner's training data."""
    extra: dict[str, list[list[int]]] = {}
    for canary in canaries:
        if canary.client_id is not None:
            extra.setdefault(canary.client_id, []).extend([examples(canary)] * repeats)
    return [replace(c, train=[*c.train, *extra[c.client_id]]) if c.client_id in extra else c for c in clients]


@torch.inference_mode()
def continuation_nll(
    model: torch.nn.Module,
    prompt: Sequence[int],
    continuations: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 64,
) -> np.ndarray:
    """The summed next-token loss of each continuation after `prompt` (the prompt's own tokens not
    counted): minus the log-likelihood of the continuation given the prompt."""
    model.eval()
    out = []
    for start in range(0, len(continuations), batch_size):
        part = continuations[start : start + batch_size]
        batch = collate([[*prompt, *c] for c in part], pad_id)
        labels = batch.pop("labels")
        labels[:, : len(prompt)] = IGNORE_INDEX
        logits = model(**batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
        )
        out.append(nll.sum(dim=1).double().numpy())
    return np.concatenate(out)


def exposure(true_nll: float, candidate_nll: np.ndarray) -> float:
    """log2(candidates + 1) - log2(rank), the rank of the true secret among the candidates by loss
    (1 + how many candidates have a lower loss; ties go to the true secret)."""
    rank = 1 + int(np.sum(candidate_nll < true_nll))
    return float(np.log2(candidate_nll.size + 1) - np.log2(rank))


@dataclass(frozen=True)
class Exposures:
    inserted: tuple[float, ...]
    controls: tuple[float, ...]  # the canaries not inserted
    candidates: int

    @property
    def max_possible(self) -> float:
        return float(np.log2(self.candidates + 1))


def measure(
    model: torch.nn.Module,
    pad_id: int,
    prompt: Sequence[int],
    canaries: Sequence[TextCanary],
    tokenize: Tokenize,
    *,
    candidates: int,
    digits: int,
    rng: np.random.Generator,
) -> Exposures:
    """Every canary's exposure on `model` (its adapter as loaded), each against its own `candidates`
    random numbers (drawn from `rng`). A secret's tokens are `tokenize(" " + digits)`."""
    inserted, controls = [], []
    for canary in canaries:
        others = random_numbers(candidates, digits, rng, exclude=[canary.secret])
        seqs = [tokenize(" " + s) for s in [canary.secret, *others]]
        nll = continuation_nll(model, prompt, seqs, pad_id)
        value = exposure(float(nll[0]), nll[1:])
        (inserted if canary.client_id is not None else controls).append(value)
    return Exposures(tuple(inserted), tuple(controls), candidates)
