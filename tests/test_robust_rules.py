"""Robust rules against known answers on synthetic updates, their wiring from `[server]`, and refusals."""

import math

import pytest
import torch

from fedtune.aggregate import (
    ServerConfig,
    StackedUpdates,
    centered_clip,
    coordinate_median,
    fltrust,
    geometric_median,
    krum,
    krum_scores,
    make_aggregator,
    multi_krum,
    norm_bound,
    trimmed_mean,
    weighted_mean,
)
from fedtune.config import check, load_config
from fedtune.errors import ConfigError


def _honest_and_attackers(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """7 honest updates near +1 and 3 attackers far away (near -10), 20 values each."""
    gen = torch.Generator().manual_seed(seed)
    honest = 1.0 + 0.05 * torch.randn(7, 20, generator=gen)
    attackers = -10.0 + 0.01 * torch.randn(3, 20, generator=gen)
    return honest, attackers


def test_krum_picks_an_honest_update_and_multi_krum_averages_the_honest_ones():
    honest, attackers = _honest_and_attackers()
    deltas = torch.cat([attackers[:2], honest, attackers[2:]])  # attackers in the first and last slots
    weights = torch.arange(1.0, 11.0)
    chosen = krum(deltas, weights, byzantine=3)
    assert any(torch.equal(chosen, row) for row in honest)
    assert torch.equal(krum(deltas, torch.ones(10), byzantine=3), chosen)  # weights are not Krum's
    scores = krum_scores(deltas, byzantine=3)
    assert scores[2:9].max() < scores[[0, 1, 9]].min()
    mean = multi_krum(deltas, weights, byzantine=3)  # keeps n - f = 7: the honest ones
    assert torch.allclose(mean, weighted_mean(honest, weights[2:9]), atol=1e-6)
    assert (weighted_mean(deltas, weights) - honest.mean(0)).norm() > 10
    fewer = multi_krum(deltas, weights, byzantine=3, keep=3)
    assert (fewer - honest.mean(0)).norm() < 0.2


def test_krum_falls_back_when_the_round_has_too_few_updates():
    one = torch.tensor([[1.0, 2.0]])
    assert torch.equal(krum(one, torch.ones(1), byzantine=1), one[0])
    two = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    assert torch.equal(krum(two, torch.ones(2), byzantine=1), two[0])  # a tie: the lowest slot
    three = torch.tensor([[0.0], [0.1], [9.0]])  # n - f - 2 < 1: scored by the nearest other update
    assert float(krum(three, torch.ones(3), byzantine=2)) in (0.0, 0.1)
    assert torch.allclose(multi_krum(three, torch.ones(3), byzantine=5), torch.tensor([0.0]))  # keeps 1
    assert torch.allclose(multi_krum(three, torch.ones(3), byzantine=0, keep=99), three.mean(0))
    with pytest.raises(ValueError, match="at least 0"):
        krum(three, torch.ones(3), byzantine=-1)


def test_geometric_median_of_symmetric_points_is_their_center():
    gen = torch.Generator().manual_seed(1)
    center = torch.randn(6, generator=gen)
    offsets = torch.randn(4, 6, generator=gen)
    deltas = torch.cat([center + offsets, center - offsets])
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(2)  # each point and its mirror weigh the same
    assert torch.allclose(geometric_median(deltas, weights), center, atol=1e-5)


def test_geometric_median_barely_moves_for_a_huge_outlier():
    gen = torch.Generator().manual_seed(2)
    honest = torch.randn(20, 8, generator=gen)
    attacked = torch.cat([honest, torch.full((1, 8), 1e4)])
    clean = geometric_median(honest, torch.ones(20), iterations=50)
    moved = geometric_median(attacked, torch.ones(21), iterations=50)
    assert (moved - clean).norm() < 0.3
    assert (weighted_mean(attacked, torch.ones(21)) - clean).norm() > 1000


def test_weights_in_the_geometric_median_count_like_duplicated_points():
    gen = torch.Generator().manual_seed(3)
    points = torch.randn(5, 3, generator=gen)
    counts = torch.tensor([3, 1, 1, 2, 1])
    weighted = geometric_median(points, counts.float(), iterations=300, tolerance=0.0)
    duplicated = points.repeat_interleave(counts, dim=0)
    plain = geometric_median(duplicated, torch.ones(len(duplicated)), iterations=300, tolerance=0.0)
    assert torch.allclose(weighted, plain, atol=1e-4)
    assert (weighted - geometric_median(points, torch.ones(5), iterations=300, tolerance=0.0)).norm() > 1e-2


def test_fltrust_known_answer_and_no_trust_for_an_opposite_update():
    deltas = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    reference = torch.tensor([1.0, 1.0])
    # trust: cos 1/sqrt2, 1/sqrt2, and -1/sqrt2 -> 0; each rescaled to |reference| = sqrt2
    expected = torch.tensor([math.sqrt(2) / 2, math.sqrt(2) / 2])
    result = fltrust(deltas, torch.tensor([1.0, 5.0, 100.0]), reference=reference)
    assert torch.allclose(result, expected)
    assert torch.allclose(fltrust(deltas[:2], torch.ones(2), reference=reference), expected)
    parallel = torch.tensor([[0.5, 0.5], [30.0, 30.0]])
    assert torch.allclose(fltrust(parallel, torch.ones(2), reference=reference), reference)


def test_fltrust_without_trust_is_a_zero_delta():
    reference = torch.tensor([1.0, 0.0])
    opposite = torch.tensor([[-1.0, 0.0], [-3.0, 1.0], [0.0, 0.0]])
    assert torch.equal(fltrust(opposite, torch.ones(3), reference=reference), torch.zeros(2))
    assert torch.equal(fltrust(opposite, torch.ones(3), reference=torch.zeros(2)), torch.zeros(2))
    with pytest.raises(ValueError, match="reference has shape"):
        fltrust(opposite, torch.ones(3), reference=torch.zeros(3))


def test_norm_bound_clips_big_updates_and_leaves_small_ones():
    deltas = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0], [100.0, 0.0]])
    ones = torch.ones(5)
    # median norm 3: [0, 4] -> [0, 3] and [100, 0] -> [3, 0]
    assert torch.allclose(norm_bound(deltas, ones), torch.tensor([7 / 5, 5 / 5]))
    assert torch.allclose(norm_bound(deltas, ones, median_multiple=2.0), torch.tensor([10 / 5, 6 / 5]))
    assert torch.allclose(norm_bound(deltas, ones, bound=1.0), torch.tensor([3 / 5, 2 / 5]))
    assert torch.allclose(norm_bound(deltas, ones, bound=1e9), weighted_mean(deltas, ones))
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 6.0])
    assert torch.allclose(norm_bound(deltas, weights), torch.tensor([22 / 10, 5 / 10]))
    zeros = torch.zeros(3, 2)
    assert torch.equal(norm_bound(zeros, torch.ones(3)), torch.zeros(2))


def test_centered_clip_is_the_mean_with_a_large_tau_and_resists_an_outlier_with_a_small_one():
    gen = torch.Generator().manual_seed(4)
    deltas = torch.randn(6, 5, generator=gen)
    weights = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    mean = weighted_mean(deltas, weights)
    assert torch.allclose(centered_clip(deltas, weights, tau=1e6), mean, atol=1e-5)
    assert torch.allclose(centered_clip(deltas, weights, tau=1e6, center=torch.zeros(5)), mean, atol=1e-5)
    honest = 1.0 + 0.1 * torch.randn(9, 5, generator=gen)
    attacked = torch.cat([honest, torch.full((1, 5), 1e3)])
    ones = torch.ones(10)
    assert (weighted_mean(attacked, ones) - honest.mean(0)).norm() > 100
    for tau in (None, 0.2):
        assert (centered_clip(attacked, ones, tau=tau) - honest.mean(0)).norm() < 0.3


def test_every_rule_ignores_an_outlier_fedavg_follows():
    honest, attackers = _honest_and_attackers(5)
    deltas = torch.cat([honest, attackers[:1]])
    weights = torch.ones(8)
    target = honest.mean(0)
    for rule in ("median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "centered_clip"):
        agg = make_aggregator(ServerConfig(rule=rule, trim_fraction=0.2))
        assert (agg.delta(StackedUpdates(deltas, weights)) - target).norm() < 0.5, rule
    assert (weighted_mean(deltas, weights) - target).norm() > 5


@pytest.mark.parametrize(
    ("settings", "direct"),
    [
        (dict(rule="fedavg"), weighted_mean),
        (dict(rule="median"), coordinate_median),
        (dict(rule="trimmed_mean", trim_fraction=0.2), lambda d, w: trimmed_mean(d, w, 0.2)),
        (dict(rule="norm_bound"), norm_bound),
        (dict(rule="norm_bound", norm_bound=0.5), lambda d, w: norm_bound(d, w, bound=0.5)),
        (
            dict(rule="norm_bound", norm_bound_median_multiple=0.5),
            lambda d, w: norm_bound(d, w, median_multiple=0.5),
        ),
        (dict(rule="krum", byzantine=2), lambda d, w: krum(d, w, byzantine=2)),
        (
            dict(rule="multi_krum", byzantine=2, multi_krum_keep=3),
            lambda d, w: multi_krum(d, w, byzantine=2, keep=3),
        ),
        (
            dict(rule="geometric_median", geometric_median_iterations=2),
            lambda d, w: geometric_median(d, w, iterations=2),
        ),
        (
            dict(rule="centered_clip", centered_clip_tau=0.3, centered_clip_iterations=5),
            lambda d, w: centered_clip(d, w, tau=0.3, iterations=5),
        ),
    ],
    ids=[
        "fedavg",
        "median",
        "trimmed_mean",
        "norm_bound-median",
        "norm_bound-absolute",
        "norm_bound-multiple",
        "krum",
        "multi_krum",
        "geometric_median",
        "centered_clip",
    ],
)
def test_make_aggregator_builds_each_rule_from_config(settings, direct):
    gen = torch.Generator().manual_seed(6)
    deltas = torch.randn(8, 16, generator=gen)
    weights = torch.randint(1, 9, (8,), generator=gen).float()
    agg = make_aggregator(ServerConfig(**settings))
    assert agg.linear == (settings["rule"] == "fedavg")
    assert torch.allclose(agg.delta(StackedUpdates(deltas, weights)), direct(deltas, weights))


def test_fltrust_asks_the_reference_for_the_servers_own_delta_from_the_global_adapter():
    asked: list[torch.Tensor] = []

    def reference(global_flat: torch.Tensor) -> torch.Tensor:  # a root-data trainer's stand-in
        asked.append(global_flat)
        return torch.tensor([1.0, 1.0]) - global_flat

    deltas = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    agg = make_aggregator(ServerConfig(rule="fltrust", lr=0.5), reference=reference)
    assert not agg.linear
    start = torch.zeros(2)
    new = agg.step(start, StackedUpdates(deltas, torch.ones(3)))
    assert len(asked) == 1 and torch.equal(asked[0], start)
    assert torch.allclose(new, 0.5 * torch.tensor([math.sqrt(2) / 2, math.sqrt(2) / 2]))
    with pytest.raises(ValueError, match="pass reference="):
        agg.delta(StackedUpdates(deltas, torch.ones(3)))


def test_fltrust_without_a_reference_and_a_reference_without_fltrust_are_refused():
    with pytest.raises(ValueError, match=r"server\.rule = 'fltrust'.*pass make_aggregator a reference"):
        make_aggregator(ServerConfig(rule="fltrust"))
    with pytest.raises(ValueError, match="not 'krum'"):
        make_aggregator(ServerConfig(rule="krum"), reference=lambda flat: flat)
    with pytest.raises(ValueError, match="not a user's own rule"):
        make_aggregator(ServerConfig(rule="fltrust"), rule=weighted_mean, reference=lambda flat: flat)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            ["secure_aggregation.enabled=true", "server.rule='krum'"],
            ["server.rule = 'krum' needs every client's update", "reveals only their sum"],
        ),
        (
            ["federation.clients_per_round=3", "server.rule='krum'"],
            ["server.byzantine = f = 1", "federation.clients_per_round to at least 4", "byzantine to 0"],
        ),
        (
            ["federation.clients_per_round=2", "server.rule='multi_krum'", "server.byzantine=0"],
            ["n = 2", "federation.clients_per_round to at least 3"],
        ),
        (
            ["server.rule='multi_krum'", "server.multi_krum_keep=5"],
            ["server.multi_krum_keep = 5 exceeds the 4 updates", "federation.clients_per_round"],
        ),
        (
            ["privacy.mode='central'", "privacy.noise_multiplier=1.0", "server.rule='norm_bound'"],
            ["already clips every update to privacy.clip_l2_norm", "server.rule = 'fedavg'"],
        ),
        (
            ["privacy.mode='central'", "privacy.noise_multiplier=1.0", "server.rule='geometric_median'"],
            ["server.rule = 'geometric_median' is not a sum"],
        ),
        (
            ["server.rule='centered_clip'", "server.control_variates='scaffold'"],
            ["server.rule = 'centered_clip'", "does not move the adapter by that mean"],
        ),
        (
            ["server.rule='fltrust'", "server.step_normalization='fednova'"],
            ["server.rule = 'fltrust' rescales every update", "set it to 'none' with fltrust"],
        ),
        (
            ["server.rule='geometric_median'", "compression.method='topk'"],
            ["server.rule = 'geometric_median' compares", "never sent", "'randomk'"],
        ),
        (["server.norm_bound=0"], ["server.norm_bound = 0"]),
        (["server.byzantine=-1"], ["server.byzantine = -1"]),
    ],
)
def test_config_refuses_what_a_robust_rule_cannot_run_with(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for fragment in words:
        assert fragment in str(info.value)


def test_a_cohort_krum_cannot_guarantee_is_noted_and_a_known_population_is_checked():
    config = load_config(None, ["server.rule='krum'"])  # 4 per round, f = 1: 4 <= 2f + 2
    assert any("more than 2f + 2" in note for note in check(config))
    assert check(load_config(None, ["server.rule='krum'", "federation.clients_per_round=5"])) == []
    fraction = load_config(
        None, ["server.rule='krum'", "federation.num_clients='all'", "federation.fraction_per_round=0.1"]
    )  # the cohort is unknown until the data gives the population
    with pytest.raises(ConfigError, match=r"federation\.fraction_per_round gives n = 2"):
        check(fraction, "simulate", population=20)
    topk_fltrust = load_config(None, ["server.rule='fltrust'", "compression.method='topk'"])
    assert topk_fltrust.server.rule == "fltrust"
