"""FFA-LoRA (`server.lora_aggregation = "ffa"`): A frozen at its shared seeded init, only B trains and
travels, so the aggregate of B_i A is exact; and the separate averaging it replaces, which is not."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedtune.config import LoraSettings, TrainConfig, load_config
from fedtune.data import ClientData
from fedtune.local import load_model
from fedtune.model.adapter import FlatAdapter, attach_lora
from fedtune.model.base import load_base_model
from fedtune.simulation import simulate
from fedtune.train.local import LocalTrainer
from tests.test_simulation import SMALL


def lora_model(tiny_dir, *, train_a: bool):
    return attach_lora(
        load_base_model(tiny_dir), LoraSettings(rank=4), torch.Generator().manual_seed(0), train_a=train_a
    )


def clients(tokenizer) -> list[ClientData]:
    texts = ["To be, or not to be", "All the world's a stage", "Now is the winter of our discontent"]
    return [
        ClientData(f"c{k}", train=[tokenizer(t * (k + 1))["input_ids"]] * 4, eval=[])
        for k, t in enumerate(texts)
    ]


def products(model: torch.nn.Module, flat: torch.Tensor, adapter: FlatAdapter) -> list[torch.Tensor]:
    """B A of every adapted module, with `flat` loaded."""
    adapter.load(flat)
    return [
        (m.lora_B["default"].weight @ m.lora_A["default"].weight).detach().clone()
        for m in model.modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    ]


def mean_product_error(tiny_dir, tokenizer, *, train_a: bool) -> float:
    """Relative error of the averaged adapter's products against the mean of the clients' products."""
    model = lora_model(tiny_dir, train_a=train_a)
    adapter = FlatAdapter(model)
    trainer = LocalTrainer(model, adapter, TrainConfig(lr=5e-2), tokenizer.pad_token_id)
    start = adapter.get() + torch.randn(adapter.numel, generator=torch.Generator().manual_seed(1)) * 0.02
    locals_ = [
        start + trainer.train(start, c, seed=k, steps=3).delta for k, c in enumerate(clients(tokenizer))
    ]
    mean_of_products = [
        torch.stack(ps).mean(0) for ps in zip(*(products(model, f, adapter) for f in locals_), strict=True)
    ]
    product_of_mean = products(model, torch.stack(locals_).mean(0), adapter)
    num = sum(float((a - b).norm() ** 2) for a, b in zip(mean_of_products, product_of_mean, strict=True))
    den = sum(float(a.norm() ** 2) for a in mean_of_products)
    return (num / den) ** 0.5


def test_only_b_is_in_the_flat_adapter(tiny_dir):
    model = lora_model(tiny_dir, train_a=False)
    adapter = FlatAdapter(model)
    assert all("lora_B" in name for name in adapter.names)
    assert adapter.numel == sum(p.numel() for n, p in model.named_parameters() if "lora_B" in n)


def test_ffa_aggregates_the_clients_products_exactly_and_separate_does_not(tiny_dir, tokenizer):
    assert mean_product_error(tiny_dir, tokenizer, train_a=False) <= 1e-5
    assert mean_product_error(tiny_dir, tokenizer, train_a=True) > 1e-3  # mean(B_i A_i) != mean B mean A


@pytest.fixture(scope="module")
def ffa_and_separate(tmp_path_factory):
    out = tmp_path_factory.mktemp("ffa")
    runs = {}
    for rule in ("ffa", "separate"):
        overrides = [
            *SMALL,
            "federation.rounds=1",
            f"server.lora_aggregation='{rule}'",
            f"run.dir={out / rule}",
        ]
        config = load_config(None, overrides)
        runs[rule] = (config, simulate(config))
    return runs


def a_factors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The lora_A tensors, keyed as PEFT saves them (without the adapter's name)."""
    return {n.replace(".default", ""): t for n, t in tensors.items() if "lora_A" in n}


def test_an_ffa_run_keeps_a_at_its_init_sends_less_and_loads_in_peft(ffa_and_separate, tiny_dir, tokenizer):
    config, ffa = ffa_and_separate["ffa"]
    _, separate = ffa_and_separate["separate"]
    assert ffa.rounds[1].bytes_up < separate.rounds[1].bytes_up  # only B travels
    initial = a_factors(dict(load_model(config, tiny_dir, tokenizer.pad_token_id).model.named_parameters()))
    saved = a_factors(load_file(str(ffa.run_dir / "adapter" / "adapter_model.safetensors")))
    moved = a_factors(load_file(str(separate.run_dir / "adapter" / "adapter_model.safetensors")))
    assert saved.keys() == initial.keys() == moved.keys() and saved
    assert all(torch.equal(saved[n], initial[n].detach()) for n in saved)  # A never left its init
    assert any(not torch.equal(moved[n], initial[n].detach()) for n in moved)  # while separate moved it
    loaded = PeftModel.from_pretrained(load_base_model(tiny_dir), str(ffa.run_dir / "adapter"))
    got = a_factors(dict(loaded.named_parameters()))
    assert all(torch.equal(got[n], saved[n]) for n in saved)
