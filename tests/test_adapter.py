"""The flat adapter view aliases the PEFT parameters, and saved adapters load with plain PEFT."""

import json

import pytest
import torch
from peft import PeftModel

from fedtune.config import LoraSettings
from fedtune.errors import ConfigError
from fedtune.model.adapter import FlatAdapter, attach_lora, save_adapter
from fedtune.model.base import load_base_model


@pytest.fixture
def lora_model(tiny_dir):
    return attach_lora(load_base_model(tiny_dir), LoraSettings(rank=4), torch.Generator().manual_seed(0))


def test_flat_view_aliases_parameters(lora_model):
    adapter = FlatAdapter(lora_model)
    expected = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    assert adapter.numel == expected
    new = torch.arange(adapter.numel, dtype=torch.float32)
    adapter.load(new)
    first = adapter.params[0]
    assert torch.equal(first.reshape(-1), new[: first.numel()])
    assert torch.equal(adapter.get(), new)
    got = adapter.get()
    got.zero_()  # a copy: the model is untouched
    assert torch.equal(adapter.buffer, new)
    with pytest.raises(ValueError, match="expected"):
        adapter.load(torch.zeros(3))


def test_lora_init_is_seeded_and_b_is_zero(tiny_dir):
    def init(seed: int) -> torch.Tensor:
        base = load_base_model(tiny_dir)
        model = attach_lora(base, LoraSettings(rank=4), torch.Generator().manual_seed(seed))
        return FlatAdapter(model).get()

    a, b, c = init(1), init(1), init(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    base = load_base_model(tiny_dir)
    model = attach_lora(base, LoraSettings(rank=4), torch.Generator().manual_seed(1))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert not p.any()


def test_saved_adapter_loads_with_plain_peft(lora_model, tiny_dir, tmp_path):
    adapter = FlatAdapter(lora_model)
    flat = torch.randn(adapter.numel, generator=torch.Generator().manual_seed(3))
    out = save_adapter(lora_model, adapter, flat, tmp_path / "adapter", tiny_dir)
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dir.resolve())
    assert config["r"] == 4

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    loaded = PeftModel.from_pretrained(base, str(out))
    params = [p for n, p in loaded.named_parameters() if "lora_" in n]
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), flat)
    ids = torch.tensor([[1, 2, 3, 4]])
    adapter.load(flat)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, lora_model(input_ids=ids).logits, atol=1e-5)


def test_unknown_target_module_is_a_config_error(tiny_dir):
    with pytest.raises(ConfigError, match=r"lora.target_modules.*linear modules in this model: .*q_proj"):
        attach_lora(load_base_model(tiny_dir), LoraSettings(target_modules=["qkv"]), torch.Generator())
