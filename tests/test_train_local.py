"""Local training: batch schedules, the delta, and refusal of non-finite updates."""

import pytest
import torch

from fedtune.config import TrainConfig
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


def prox_trainer(trainer, mu: float) -> LocalTrainer:
    return LocalTrainer(trainer.model, trainer.adapter, TrainConfig(lr=1e-2, proximal_mu=mu), trainer.pad_id)


def reference_fedprox_delta(trainer, client, global_flat, mu: float, seed: int, steps: int) -> torch.Tensor:
    """FedProx written as its paper states it: the proximal term in the loss, differentiated by autograd."""
    from fedtune.data.batching import collate

    adapter = trainer.adapter
    schedule = batch_schedule(len(client.train), 4, torch.Generator().manual_seed(seed), steps=steps)
    adapter.load(global_flat)
    anchors = [
        t.view(p.shape)
        for t, p in zip(
            torch.split(global_flat, [p.numel() for p in adapter.params]), adapter.params, strict=True
        )
    ]
    optimizer = torch.optim.AdamW(adapter.params, lr=1e-2, weight_decay=0.0)
    trainer.model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for indices in schedule:
            batch = collate([client.train[i] for i in indices.tolist()], trainer.pad_id)
            prox = sum(((p - a) ** 2).sum() for p, a in zip(adapter.params, anchors, strict=True))
            (trainer.model(**batch).loss + mu / 2 * prox).backward()
            torch.nn.utils.clip_grad_norm_(adapter.params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    trainer.model.eval()
    return adapter.buffer - global_flat


def test_fedprox_adds_the_proximal_gradient_of_the_paper(trainer, client):
    start = trainer.adapter.get()
    global_flat = start + torch.randn(start.shape, generator=torch.Generator().manual_seed(3)) * 0.05
    mu = 5.0
    got = prox_trainer(trainer, mu).train(global_flat, client, seed=7, steps=3).delta
    expected = reference_fedprox_delta(trainer, client, global_flat, mu, seed=7, steps=3)
    assert got is not None and torch.allclose(got, expected, atol=1e-6, rtol=1e-5)


def test_fedprox_with_mu_zero_is_fedavg_and_a_larger_mu_stays_closer(trainer, client):
    start = trainer.adapter.get()
    plain = trainer.train(start, client, seed=1, steps=4).delta
    zero = prox_trainer(trainer, 0.0).train(start, client, seed=1, steps=4).delta
    assert plain is not None and zero is not None and torch.equal(plain, zero)
    # from a global adapter with a non-zero B, the proximal term pulls the local one back toward it
    global_flat = start + torch.randn(start.shape, generator=torch.Generator().manual_seed(3)) * 0.05
    norms = []
    for mu in (0.0, 10.0, 100.0):
        delta = prox_trainer(trainer, mu).train(global_flat, client, seed=1, steps=4).delta
        assert delta is not None
        norms.append(float(delta.norm()))
    assert norms[0] > norms[1] > norms[2]


def test_fedprox_with_dpsgd_is_refused_with_the_reason():
    from fedtune.config import load_config
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.proximal_mu = 0\.1 with dpsgd\.enabled"):
        load_config(None, ["train.proximal_mu=0.1", "dpsgd.enabled=true"])
