"""White-box canaries (directions, inclusion, the update they send, their scores) and the black-box
exposure computation on a toy model whose next-token table has memorised one secret."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedtune.audit.canary import CanaryTrainer, plan_canaries
from fedtune.audit.exposure import (
    TextCanary,
    continuation_nll,
    exposure,
    insert_texts,
    measure,
    plan_texts,
    random_numbers,
)
from fedtune.data import ClientData

NUMEL = 4096


def test_canaries_are_seeded_unit_directions_sent_only_when_included():
    plan = plan_canaries(32, seed=7, l2_norm=0.5, num_examples=10)
    assert plan == plan_canaries(32, seed=7, l2_norm=0.5, num_examples=10)
    assert plan.included != plan_canaries(32, seed=8, l2_norm=0.5, num_examples=10).included
    assert 0 < sum(plan.included) < 32
    u = plan.direction(3, NUMEL)
    assert float(u.norm()) == pytest.approx(1.0) and torch.equal(u, plan.direction(3, NUMEL))
    assert abs(float(u @ plan.direction(4, NUMEL))) < 0.1  # nearly orthogonal in high dimension
    trainer = CanaryTrainer(plan, pad_id=0)
    for index, cid in enumerate(plan.ids):
        update = trainer.train(torch.zeros(NUMEL), plan.clients()[index], seed=0, steps=3)
        assert update.num_examples == 10 and update.num_steps == 3 and update.ok
        expected = 0.5 if plan.included[index] else 0.0
        assert float(update.delta.norm()) == pytest.approx(expected, abs=1e-6), cid


def test_a_canary_trainer_refuses_a_real_client():
    plan = plan_canaries(4, seed=0, l2_norm=1.0, num_examples=1)
    with pytest.raises(ValueError, match="not one of the audit's canaries"):
        CanaryTrainer(plan, pad_id=0).train(torch.zeros(8), ClientData("alice", [[1, 2]], [[1, 2]]), seed=0)
    with pytest.raises(ValueError, match="already named"):
        plan_canaries(4, seed=0, l2_norm=1.0, num_examples=1, taken=["audit-canary-0002"])


def test_included_canaries_score_high_against_their_sum():
    plan = plan_canaries(64, seed=1, l2_norm=1.0, num_examples=1)
    honest = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0)) * 0.01
    change = honest + sum(plan.delta(cid, NUMEL) for cid in plan.ids) / 16
    scores = plan.scores(change)
    included = np.array(plan.included)
    assert scores[included].min() > scores[~included].max()
    assert plan.scores(torch.zeros(NUMEL)).tolist() == [0.0] * 64


def test_random_numbers_are_distinct_and_keep_their_digits():
    rng = np.random.default_rng(0)
    numbers = random_numbers(90, 2, rng, exclude=["07"])
    assert len(set(numbers)) == 90 and "07" not in numbers and all(len(n) == 2 for n in numbers)
    with pytest.raises(ValueError):
        random_numbers(100, 2, rng, exclude=["07"])


def test_texts_go_into_their_owners_training_data():
    clients = [ClientData(c, [[1, 2]], [[3, 4]]) for c in ("a", "b")]
    canaries = [TextCanary("12", "b"), TextCanary("34", None)]
    planted = insert_texts(clients, canaries, lambda t: [9, int(t.secret)], repeats=3)
    assert planted[0] == clients[0]
    assert planted[1].train == [[1, 2], [9, 12], [9, 12], [9, 12]] and planted[1].eval == [[3, 4]]
    texts = plan_texts(40, 4, ["a", "b"], np.random.default_rng(0))
    assert 5 < sum(t.client_id is not None for t in texts) < 35
    assert {t.client_id for t in texts} <= {"a", "b", None}


def test_exposure_is_log2_of_the_candidates_over_the_rank():
    assert exposure(1.0, np.array([2.0, 3.0, 4.0])) == pytest.approx(2.0)  # rank 1 of 4
    assert exposure(5.0, np.array([2.0, 3.0, 4.0])) == pytest.approx(0.0)  # rank 4 of 4
    assert exposure(1.5, np.arange(1, 8, dtype=float)) == pytest.approx(3 - 1)  # rank 2 of 8


class Memorised(torch.nn.Module):
    """A bigram model of 12 tokens (digit d is token d, a space 10, the prompt 11) that has learned
    "11 10 4 2" by heart and is uniform elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(12, 12)
        table[11, 10] = table[10, 4] = table[4, 2] = 8.0
        self.table = table

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def _tokenize(text: str) -> list[int]:
    return [10 if ch == " " else int(ch) for ch in text]


def test_continuation_nll_counts_only_the_continuation():
    model = Memorised()
    nll = continuation_nll(model, [11], [[10, 4, 2], [10, 4, 3]], pad_id=0)
    assert nll[0] < nll[1]
    assert nll[1] - nll[0] == pytest.approx(8.0, rel=1e-4)  # the last token's log-odds; the rest is shared


def test_a_memorised_secret_has_the_largest_exposure():
    canaries = [TextCanary("42", "a"), TextCanary("17", None)]
    result = measure(
        Memorised(), 0, [11], canaries, _tokenize, candidates=63, digits=2, rng=np.random.default_rng(0)
    )
    assert result.inserted == (pytest.approx(6.0),)  # rank 1 of 64
    assert result.controls[0] < 3.0
    assert result.max_possible == pytest.approx(6.0)
