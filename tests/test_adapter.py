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
    with pytest.raises(ConfigError, match=r"lora.target_modules.*LoRA can adapt in this model: .*q_proj"):
        attach_lora(load_base_model(tiny_dir), LoraSettings(target_modules=["qkv"]), torch.Generator())


def tiny_gpt2(path):
    """A GPT-2 style model (fused Conv1D attention) saved as a local Hugging Face directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_auto_targets_are_the_attention_projections_of_each_architecture(tiny_dir, tmp_path):
    from fedtune.model.targets import attention_targets

    llama = load_base_model(tiny_dir)
    assert attention_targets(llama) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    auto = attach_lora(llama, LoraSettings(rank=4), torch.Generator().manual_seed(0))
    named = attach_lora(
        load_base_model(tiny_dir),
        LoraSettings(rank=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        torch.Generator().manual_seed(0),
    )
    assert torch.equal(FlatAdapter(auto).get(), FlatAdapter(named).get())  # the old default, bit for bit

    gpt2 = load_base_model(tiny_gpt2(tmp_path / "gpt2"))
    assert attention_targets(gpt2) == ["c_attn"]  # c_proj is the MLP's output too: left out


def test_a_gpt2_adapter_trains_saves_and_loads_in_peft(tmp_path):
    base_dir = tiny_gpt2(tmp_path / "gpt2")
    model = attach_lora(load_base_model(base_dir), LoraSettings(rank=4), torch.Generator().manual_seed(0))
    adapter = FlatAdapter(model)
    flat = torch.randn(adapter.numel, generator=torch.Generator().manual_seed(1)) * 0.01
    save_adapter(model, adapter, flat, tmp_path / "adapter", base_dir)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"]
    loaded = PeftModel.from_pretrained(load_base_model(base_dir), str(tmp_path / "adapter"))
    params = [p for n, p in loaded.named_parameters() if "lora_" in n]
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), flat)


def test_a_wrong_target_on_gpt2_lists_every_module_lora_can_adapt(tmp_path):
    base = load_base_model(tiny_gpt2(tmp_path / "gpt2"))
    with pytest.raises(ConfigError) as info:
        attach_lora(base, LoraSettings(target_modules=["q_proj"]), torch.Generator())
    message = str(info.value)
    assert "Conv1D: c_attn, c_fc, c_proj" in message and "Linear: lm_head" in message
