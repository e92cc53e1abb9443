"""Clients of different LoRA ranks: a rank-r client trains the first r components of the global adapter
(zero-padded past them), HetLoRA averages each component over the clients that train it, FlexLoRA merges
the clients' products by SVD; known answers on hand-built adapters, and a real trainer's zero padding."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from fedtune.aggregate.lora_merge import RankWeightedMean, SvdMerge, rank_masks
from fedtune.config import LoraSettings, TrainConfig, load_config
from fedtune.data import ClientData
from fedtune.errors import ConfigError
from fedtune.layout import AdapterLayout
from fedtune.model.adapter import FlatAdapter, attach_lora
from fedtune.model.base import load_base_model
from fedtune.simulation import simulate
from fedtune.train.local import LocalTrainer
from tests.test_lora_merge import best_rank, products, toy_layout
from tests.test_simulation import SMALL


def test_hetlora_averages_each_component_over_the_clients_that_train_it():
    layout = toy_layout()  # rank 3
    g = torch.Generator().manual_seed(0)
    masks = rank_masks(layout, [1, 3])
    deltas = torch.randn(2, layout.numel, generator=g) * masks  # zero past each client's rank
    weights = [1.0, 3.0]
    total = torch.tensor(weights, dtype=torch.float64) @ deltas.double()
    mean = RankWeightedMean(layout).mean(total, weights, [1, 3])
    first, rest = layout.rank_mask(1), ~layout.rank_mask(1)
    assert torch.allclose(mean[first], ((deltas[0] + 3 * deltas[1]) / 4).double()[first])
    assert torch.allclose(mean[rest], deltas[1].double()[rest])  # only the rank-3 client trains these


def test_a_coordinate_nobody_trains_stays_where_it_was():
    layout = toy_layout()
    weights, ranks = [2.0, 1.0], [1, 2]
    mean = RankWeightedMean(layout).mean(torch.ones(layout.numel, dtype=torch.float64), weights, ranks)
    assert not mean[~layout.rank_mask(2)].any()
    assert torch.allclose(
        mean[layout.rank_mask(1)], torch.full((int(layout.rank_mask(1).sum()),), 1 / 3).double()
    )


def test_flexlora_merges_the_products_of_the_clients_truncated_adapters():
    layout = toy_layout()
    g = torch.Generator().manual_seed(1)
    global_flat = torch.randn(layout.numel, generator=g)
    ranks = [1, 2, 3]
    masks = rank_masks(layout, ranks)
    deltas = torch.randn(3, layout.numel, generator=g) * 0.3 * masks
    weights = torch.tensor([1.0, 2.0, 3.0])
    merged = SvdMerge(layout)(global_flat, deltas, weights, ranks)
    got = products(layout, merged.global_flat)
    theirs = [products(layout, global_flat * m + d) for m, d in zip(masks, deltas, strict=True)]
    for module in got:
        mean = sum(w * p[module] for w, p in zip(weights.double(), theirs, strict=True)) / weights.sum()
        assert torch.allclose(got[module], best_rank(mean, 3)[0], atol=1e-5)
    # a client of rank r then takes the first r components: the best rank-r approximation (SVD's order)
    tensors = layout.split(merged.global_flat)
    for pair in layout.pairs:
        b, a = tensors[pair.b.name].double(), tensors[pair.a.name].double()
        assert torch.allclose(b[:, :1] @ a[:1], best_rank(b @ a, 1)[0], atol=1e-5)


def test_a_low_rank_client_trains_only_its_components(tiny_dir, tokenizer):
    model = attach_lora(load_base_model(tiny_dir), LoraSettings(rank=4), torch.Generator().manual_seed(0))
    adapter = FlatAdapter(model)
    layout = adapter.layout
    start = adapter.get() + torch.randn(adapter.numel, generator=torch.Generator().manual_seed(1)) * 0.02
    mask = layout.rank_mask(2)
    trainer = LocalTrainer(model, adapter, TrainConfig(lr=5e-2, weight_decay=0.01), tokenizer.pad_token_id)
    client = ClientData("c", train=[tokenizer("To be, or not to be")["input_ids"]] * 4, eval=[])
    update = trainer.train(start * mask, client, seed=0, steps=3)
    assert update.delta is not None
    assert not update.delta[~mask].any()  # past rank 2: zero A rows and B columns get zero gradients
    assert update.delta[mask].abs().sum() > 0
    assert isinstance(layout, AdapterLayout) and layout.ranks == {4}


MIXED = ["lora.rank=4", "lora.alpha=8", "federation.rounds=2", "clients.profiles=[{fraction=0.5, rank=2}]"]


def mixed_run(tmp_path, name: str, *overrides: str):
    config = load_config(None, [*SMALL, *MIXED, f"run.dir={tmp_path / name}", *overrides])
    return simulate(config), [
        json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"),
    [("hetlora", ()), ("flexlora", ()), ("hetlora", ("secure_aggregation.enabled=true",))],
)
def test_mixed_rank_runs_learn_send_less_and_load_in_peft(tmp_path, tiny_dir, method, extra):
    result, rows = mixed_run(tmp_path, method, f"server.lora_aggregation='{method}'", *extra)
    assert result.after.loss < result.before.loss
    if not extra:  # plain rounds: a rank-2 client sends its components only
        _, full = mixed_run(tmp_path, "full", "clients.profiles=[]")
        # round 2's cohort is the three rank-2 clients: half the values of round 1's full-rank three
        assert [r["bytes_up"] for r in rows[1:]] == [full[1]["bytes_up"], full[2]["bytes_up"] // 2]
    if method == "flexlora":
        assert all(0 <= r["svd_residual"] < 1 for r in rows[1:])
    loaded = PeftModel.from_pretrained(load_base_model(tiny_dir), str(result.run_dir / "adapter"))
    ranks = {p.shape[0] for n, p in loaded.named_parameters() if "lora_A" in n}
    assert ranks == {4}  # the global adapter is at the largest rank


def test_a_lower_rank_needs_a_method_that_merges_ranks_and_no_rank_exceeds_the_adapters():
    with pytest.raises(ConfigError, match=r"cannot merge different ranks"):
        load_config(None, [*MIXED])
    with pytest.raises(ConfigError, match=r"exceeds lora\.rank = 4"):
        load_config(
            None,
            ["lora.rank=4", "clients.profiles=[{fraction=0.5, rank=8}]", "server.lora_aggregation='hetlora'"],
        )
