"""Local training: batch schedules, the delta, and refusal of non-finite updates."""

import pytest
import torch

from fedtune.config import LoraSettings, TrainConfig
from fedtune.data import ClientData
from fedtune.model.adapter import FlatAdapter, attach_lora
from fedtune.model.base import load_base_model
from fedtune.train.local import LocalTrainer, batch_schedule


def test_batch_schedule_by_steps_and_epochs():
    gen = torch.Generator().manual_seed(0)
    steps = batch_schedule(10, 4, gen, steps=5)
    assert len(steps) == 5 and all(len(b) == 4 for b in steps)
    flat = torch.cat(steps)
    assert torch.equal(flat[:10].sort().values, torch.arange(10))  # the first pass is a permutation
    epochs = batch_schedule(10, 4, gen, epochs=2)
    assert [len(b) for b in epochs] == [4, 4, 2, 4, 4, 2]
    assert torch.equal(torch.cat(epochs[:3]).sort().values, torch.arange(10))
    with pytest.raises(ValueError):
        batch_schedule(10, 4, gen, steps=1, epochs=1)


@pytest.fixture
def trainer(tiny_dir, tokenizer):
    model = attach_lora(load_base_model(tiny_dir), LoraSettings(rank=4), torch.Generator().manual_seed(0))
    return LocalTrainer(model, FlatAdapter(model), TrainConfig(lr=1e-2), tokenizer.pad_token_id)


@pytest.fixture
def client(tokenizer):
    texts = ["To be, or not to be, that is the question."] * 6
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    return ClientData("hamlet/HAMLET", train=ids[:4], eval=ids[4:])


def test_training_returns_a_delta_and_restores_nothing_global(trainer, client):
    start = trainer.adapter.get()
    update = trainer.train(start, client, seed=1, steps=3)
    assert update.ok and update.delta is not None
    assert update.num_steps == 3 and update.num_examples == 4
    assert update.delta.abs().sum() > 0
    assert torch.allclose(trainer.adapter.buffer, start + update.delta, atol=1e-6)
    again = trainer.train(start, client, seed=1, steps=3)
    assert again.delta is not None and torch.equal(again.delta, update.delta)  # seeded


def test_nan_loss_refuses_the_update(trainer, client):
    poisoned = trainer.adapter.get()
    poisoned[:] = float("nan")
    update = trainer.train(poisoned, client, seed=1, steps=3)
    assert not update.ok and update.delta is None
    assert "non-finite loss at step 0" in (update.error or "")


def test_diverged_loss_has_infinite_perplexity_not_an_error():
    import math

    from fedtune.evaluate import EvalResult

    assert EvalResult({}, 1e4, 1).perplexity == math.inf
    assert EvalResult({}, 2.0, 1).perplexity == pytest.approx(math.exp(2.0))
