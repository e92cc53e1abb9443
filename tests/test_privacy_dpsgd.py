"""DP-SGD through Opacus on the PEFT LoRA model with fedtune's flat adapter buffer."""

import pytest
import torch
from opacus import GradSampleModule

from fedtune.config import LoraSettings, TrainConfig
from fedtune.data import ClientData
from fedtune.data.batching import collate
from fedtune.model.adapter import FlatAdapter, attach_lora
from fedtune.model.base import load_base_model
from fedtune.privacy.dpsgd import record_epsilon
from fedtune.train.dpsgd import DpSgdSettings, DpSgdTrainer, per_example_loss, poisson_batches
from fedtune.train.local import LocalTrainer


def lora_model(tiny_dir, dropout):
    model = attach_lora(
        load_base_model(tiny_dir), LoraSettings(rank=4, dropout=dropout), torch.Generator().manual_seed(0)
    )
    return model, FlatAdapter(model)


@pytest.fixture(scope="module")
def client(tokenizer):
    texts = ["To be, or not to be,", "that is the question:", "Whether 'tis nobler in the mind", "to suffer"]
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts * 2]
    return ClientData("hamlet", train=ids, eval=ids[:2])


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_example_gradients_equal_single_example_backward(tiny_dir, client, tokenizer):
    model, adapter = lora_model(tiny_dir, dropout=0.0)  # no dropout: both computations see one function
    model.train()  # Opacus records activations only in training mode
    batch = collate(client.train[:3], tokenizer.pad_token_id)  # different lengths: padding in the batch
    module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        per_example_loss(module, batch).sum().backward()
        per_sample = torch.cat([p.grad_sample.reshape(3, -1) for p in adapter.params], dim=1)
    finally:
        module.to_standard_module()
    single = []
    for i in range(3):
        model.zero_grad(set_to_none=True)
        one = collate([client.train[i]], tokenizer.pad_token_id)
        per_example_loss(model, one).sum().backward()
        single.append(torch.cat([p.grad.reshape(-1) for p in adapter.params]))
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(per_sample, torch.stack(single), rtol=1e-4, atol=1e-6)
    assert all(not hasattr(p, "grad_sample") for p in adapter.params)  # hooks and attributes removed


def test_dpsgd_trains_the_flat_adapter_and_leaves_the_model_clean(tiny_dir, client, tokenizer):
    model, adapter = lora_model(tiny_dir, dropout=0.1)
    cfg = TrainConfig(lr=1e-2, batch_size=2)
    # a sampling generator whose schedule holds an empty Poisson batch, to exercise that path too
    seed = next(
        s
        for s in range(100)
        if any(len(b) == 0 for b in poisson_batches(8, 0.25, 4, torch.Generator().manual_seed(s)))
    )
    trainer = DpSgdTrainer(
        model,
        adapter,
        cfg,
        tokenizer.pad_token_id,
        DpSgdSettings(noise_multiplier=1.0, max_grad_norm=0.5),
        noise_generator=torch.Generator().manual_seed(1),
        sampling_generator=torch.Generator().manual_seed(seed),
    )
    start = adapter.get()
    update = trainer.train(start, client, seed=3, steps=4)
    assert update.ok and update.delta is not None and update.num_steps == 4
    assert torch.isfinite(update.delta).all() and update.delta.abs().sum() > 0
    assert torch.allclose(adapter.buffer, start + update.delta, atol=1e-6)  # the steps hit the flat buffer
    assert all(p.data.data_ptr() == adapter.buffer[o:].data_ptr() for p, o in _offsets(adapter))
    assert all(not hasattr(p, "grad_sample") for p in adapter.params)
    plain = LocalTrainer(model, adapter, cfg, tokenizer.pad_token_id).train(start, client, seed=3, steps=2)
    assert plain.ok  # the shared model still trains without Opacus afterwards


def _offsets(adapter):
    offset = 0
    for p in adapter.params:
        yield p, offset
        offset += p.numel()


def test_record_epsilon_matches_dp_accounting():
    import dp_accounting as dpa
    from dp_accounting import rdp

    event = dpa.PoissonSampledDpEvent(4 / 64, dpa.GaussianDpEvent(1.1))
    expected = rdp.RdpAccountant().compose(dpa.SelfComposedDpEvent(event, 40)).get_epsilon(1e-5)
    assert record_epsilon(64, 4, 1.1, 40, 1e-5) == pytest.approx(expected, rel=0.01)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_lora_on_an_embedding_is_refused_with_the_reason(tiny_dir):
    from fedtune.errors import ConfigError
    from fedtune.train.dpsgd import check_dpsgd_model

    model, _ = lora_model(tiny_dir, dropout=0.0)
    check_dpsgd_model(model)  # the attention projections: linear, fine
    settings = LoraSettings(rank=4, target_modules=["embed_tokens", "q_proj"])
    embedded = attach_lora(load_base_model(tiny_dir), settings, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="lora_embedding_A"):
        check_dpsgd_model(embedded)
