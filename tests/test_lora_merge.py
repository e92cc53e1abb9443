"""Product-space aggregation (`server.lora_aggregation = "svd"`): known answers on hand-built matrices (the
mean product, the Eckart-Young optimum and its residual), the layout that finds the pairs, and a run."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from fedtune.aggregate.lora_merge import SvdMerge, refactor
from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.layout import AdapterLayout
from fedtune.model.base import load_base_model
from fedtune.simulation import simulate
from tests.test_simulation import SMALL

OUT, RANK, IN = 7, 3, 5


def best_rank(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The dense truncated SVD of `m` and its relative residual: the Eckart-Young optimum."""
    u, s, vh = torch.linalg.svd(m)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], float((s[rank:].square().sum() / s.square().sum()).sqrt())


def toy_layout() -> AdapterLayout:
    """Two modules of one shape and one of another, with PEFT's names, A before B as PEFT orders them."""
    names, shapes = [], []
    for module, (out, inp) in {
        "layers.0.q_proj": (OUT, IN),
        "layers.1.q_proj": (OUT, IN),
        "lm": (4, 6),
    }.items():
        names += [f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"]
        shapes += [(RANK, inp), (out, RANK)]
    return AdapterLayout.of(names, shapes)


def products(layout: AdapterLayout, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors = layout.split(flat)
    return {p.module: tensors[p.b.name].double() @ tensors[p.a.name].double() for p in layout.pairs}


def test_refactor_is_the_eckart_young_optimum_of_the_thin_product():
    g = torch.Generator().manual_seed(0)
    b_cat, a_cat = torch.randn(2, 9, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, 8, generator=g)
    result = refactor(b_cat, a_cat.double(), 3)
    for k in range(2):
        m = b_cat[k] @ a_cat[k].double()
        best, residual = best_rank(m, 3)
        assert torch.allclose(result.b[k] @ result.a[k], best, atol=1e-10)
        assert (result.dropped_sq[k] / result.total_sq[k]).sqrt().item() == pytest.approx(residual, rel=1e-10)
        assert torch.allclose(result.a[k] @ result.a[k].T, torch.eye(3, dtype=torch.float64), atol=1e-10)


def test_the_layout_pairs_a_with_b_groups_by_shape_and_masks_ranks():
    layout = toy_layout()
    assert [p.module for p in layout.pairs] == ["layers.0.q_proj", "layers.1.q_proj", "lm"]
    assert [len(g.pairs) for g in layout.groups] == [2, 1]
    flat = torch.arange(layout.numel, dtype=torch.float32)
    group = layout.groups[0]
    assert torch.equal(flat[group.a_index][1], layout.split(flat)["layers.1.q_proj.lora_A.default.weight"])
    kept = layout.split(layout.rank_mask(2).float())
    assert kept["lm.lora_A.default.weight"][:2].all() and not kept["lm.lora_A.default.weight"][2:].any()
    assert kept["lm.lora_B.default.weight"][:, :2].all() and not kept["lm.lora_B.default.weight"][:, 2:].any()


def test_a_recorded_layout_names_the_first_tensor_that_differs():
    layout = toy_layout()
    assert layout.mismatch(layout.describe()) is None
    other = AdapterLayout.of([t.name for t in layout.tensors], [(4, *t.shape[1:]) for t in layout.tensors])
    assert "tensor 0 was ['layers.0.q_proj.lora_A.default.weight', [4, 5]]" in str(
        layout.mismatch(other.describe())
    )
    assert "5 tensors were recorded" in str(layout.mismatch(layout.describe()[:5]))


def clients_of(layout: AdapterLayout, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    global_flat = torch.randn(layout.numel, generator=g)
    deltas = torch.randn(n, layout.numel, generator=g) * 0.3
    weights = torch.tensor([float(k + 1) for k in range(n)])
    return global_flat, deltas, weights


@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_svd_merge_is_the_best_rank_r_of_the_weighted_mean_product(lr):
    layout = toy_layout()
    global_flat, deltas, weights = clients_of(layout, 3, seed=1)
    merged = SvdMerge(layout, lr=lr)(global_flat, deltas, weights)
    mine = [products(layout, global_flat + d) for d in deltas]
    start = products(layout, global_flat)
    got = products(layout, merged.global_flat)
    dropped = total = 0.0
    for module in got:
        mean = sum(w * p[module] for w, p in zip(weights.double(), mine, strict=True)) / weights.sum()
        target = (1 - lr) * start[module] + lr * mean
        best, residual = best_rank(target, RANK)
        assert torch.allclose(got[module], best, atol=1e-5)  # float32 factors
        dropped += residual**2 * float(target.square().sum())
        total += float(target.square().sum())
    assert merged.relative_residual == pytest.approx((dropped / total) ** 0.5, rel=1e-6)
    assert 0 < merged.relative_residual < 1


def test_a_mean_product_within_the_rank_is_reproduced_exactly():
    layout = toy_layout()
    global_flat, deltas, weights = clients_of(layout, 1, seed=2)  # one client: a rank-r product
    merged = SvdMerge(layout)(global_flat, deltas, weights)
    want, got = products(layout, global_flat + deltas[0]), products(layout, merged.global_flat)
    assert merged.relative_residual == pytest.approx(0.0, abs=1e-6)
    assert all(torch.allclose(got[m], want[m], atol=1e-5) for m in want)


def test_a_zero_product_keeps_unit_a_rows_so_b_still_trains():
    layout = toy_layout()
    global_flat = torch.randn(layout.numel, generator=torch.Generator().manual_seed(3))
    zero_b = layout.split(global_flat)
    for p in layout.pairs:
        zero_b[p.b.name].zero_()  # B = 0, as PEFT initialises it: every product is 0
    merged = SvdMerge(layout)(global_flat, torch.zeros(2, layout.numel), torch.ones(2))
    tensors = layout.split(merged.global_flat)
    assert merged.relative_residual == 0.0
    for p in layout.pairs:
        assert not tensors[p.b.name].any()
        assert torch.allclose(tensors[p.a.name].norm(dim=1), torch.ones(RANK), atol=1e-5)


def test_svd_needs_both_factors_and_one_rank():
    only_b = AdapterLayout.of(["m.lora_B.default.weight"], [(OUT, RANK)])
    with pytest.raises(ValueError, match="both LoRA factors"):
        SvdMerge(only_b)
    mixed = AdapterLayout.of(
        [f"{m}.lora_{f}.default.weight" for m in ("x", "y") for f in "AB"],
        [(2, IN), (OUT, 2), (3, IN), (OUT, 3)],
    )
    with pytest.raises(ValueError, match="different ranks"):
        SvdMerge(mixed)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("secure_aggregation.enabled=true", "secure aggregation"),
        ("privacy.mode='central'", "client-level DP"),
        ("server.rule='median'", "server.rule = 'median'"),
        ("server.optimizer='adam'", "server.optimizer = 'adam'"),
    ],
)
def test_svd_is_refused_where_it_cannot_see_each_update(override, names):
    extra = ["privacy.noise_multiplier=1.0"] if "privacy" in override else []
    with pytest.raises(ConfigError, match=r"server\.lora_aggregation = 'svd'") as err:
        load_config(None, ["server.lora_aggregation='svd'", override, *extra])
    assert names in str(err.value)


def test_an_svd_run_reports_its_residual_learns_and_loads_in_peft(tmp_path, tiny_dir):
    config = load_config(
        None, [*SMALL, "federation.rounds=2", "server.lora_aggregation='svd'", f"run.dir={tmp_path}"]
    )
    result = simulate(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["svd_residual"] is None  # round 0 merges nothing
    assert all(0 < r["svd_residual"] < 1 for r in rows[1:])
    assert result.after.loss < result.before.loss
    loaded = PeftModel.from_pretrained(load_base_model(tiny_dir), str(tmp_path / "adapter"))
    assert any("lora_A" in n for n, _ in loaded.named_parameters())
