"""Aggregation rules against hand-computed answers, the streaming sum, and rule -> optimizer composed."""

import pytest
import torch

from fedtune.aggregate import (
    Aggregator,
    RunningSum,
    ServerAdaptive,
    ServerMomentum,
    ServerSGD,
    SummedUpdates,
    UpdateStack,
    coordinate_median,
    make_aggregator,
    trimmed_mean,
    weighted_mean,
)
from fedtune.config import ServerConfig
from fedtune.errors import StateError

DELTAS = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 60.0]])
WEIGHTS = torch.tensor([1.0, 2.0, 1.0])


def test_fedavg_equals_hand_computed_weighted_mean():
    # (1*1 + 2*3 + 1*5) / 4 = 3 ; (1*2 + 2*4 + 1*60) / 4 = 17.5
    assert torch.allclose(weighted_mean(DELTAS, WEIGHTS), torch.tensor([3.0, 17.5]))


def test_streaming_aggregator_matches_stacked_rule():
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(7, 1000, generator=gen)
    weights = torch.randint(1, 50, (7,), generator=gen).float()
    agg = Aggregator(rule=weighted_mean, server_opt=ServerSGD(lr=1.0))
    assert agg.linear
    running, stack = RunningSum(), UpdateStack()
    for d, w in zip(deltas, weights, strict=True):
        running.add(d, float(w))
        stack.add(d, float(w))
    summed = running.summed(1000)
    assert summed.count == 7 and summed.denominator == float(weights.sum())
    assert torch.allclose(agg.delta(summed), weighted_mean(deltas, weights), atol=1e-6)
    assert torch.allclose(agg.delta(stack.stacked()), agg.delta(summed), atol=1e-6)


def test_a_sum_over_a_public_denominator_is_divided_by_it():
    agg = Aggregator(rule=weighted_mean, server_opt=ServerSGD(lr=1.0))
    summed = SummedUpdates(torch.tensor([4.0, 8.0], dtype=torch.float64), denominator=4.0, count=2)
    assert torch.equal(agg.delta(summed), torch.tensor([1.0, 2.0]))
    median = make_aggregator(ServerConfig(rule="median"))
    assert not median.linear
    with pytest.raises(ValueError, match="needs every update"):
        median.delta(summed)


def test_median_and_trimmed_mean_known_answers():
    assert torch.equal(coordinate_median(DELTAS, WEIGHTS), torch.tensor([3.0, 4.0]))
    even = torch.tensor([[1.0], [2.0], [10.0], [20.0]])
    assert torch.equal(coordinate_median(even, torch.ones(4)), torch.tensor([6.0]))
    five = torch.tensor([[-100.0], [1.0], [2.0], [3.0], [100.0]])
    assert torch.equal(trimmed_mean(five, torch.ones(5), 0.2), torch.tensor([2.0]))
    assert torch.equal(trimmed_mean(five, torch.ones(5), 0.0), torch.tensor([1.2]))


def test_robust_rule_resists_one_outlier_where_fedavg_does_not():
    honest = torch.zeros(9, 4)
    attack = torch.full((1, 4), 1e6)
    deltas = torch.cat([honest, attack])
    weights = torch.ones(10)
    assert weighted_mean(deltas, weights).abs().max() > 1e4
    assert coordinate_median(deltas, weights).abs().max() == 0
    assert trimmed_mean(deltas, weights, 0.1).abs().max() == 0


def test_aggregator_applies_server_lr_and_resets():
    agg = make_aggregator(ServerConfig(lr=0.5))
    running = RunningSum()
    running.add(torch.tensor([2.0, 4.0]), 1)
    running.add(torch.tensor([4.0, 8.0]), 3)
    new = agg.step(torch.tensor([1.0, 1.0]), running.summed(2))
    assert torch.allclose(new, torch.tensor([1.0 + 0.5 * 3.5, 1.0 + 0.5 * 7.0]))
    with pytest.raises(ValueError, match="no client update"):
        make_aggregator(ServerConfig(rule="median")).delta(_empty())


def _empty():
    from fedtune.aggregate import StackedUpdates

    return StackedUpdates(torch.zeros(0, 2), torch.zeros(0))


def test_a_users_own_rule_replaces_the_configured_one():
    def largest_norm_dropped(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        keep = deltas.norm(dim=1).argsort()[:-1]
        return weighted_mean(deltas[keep], weights[keep])

    agg = make_aggregator(ServerConfig(), rule=largest_norm_dropped)
    assert not agg.linear
    stack = UpdateStack()
    for d, w in zip(DELTAS, WEIGHTS, strict=True):
        stack.add(d, float(w))
    assert torch.allclose(agg.delta(stack.stacked()), torch.tensor([7 / 3, 10 / 3]))


def test_sums_and_stacks_reject_nonpositive_weight():
    for collection in (RunningSum(), UpdateStack()):
        with pytest.raises(ValueError, match="positive"):
            collection.add(torch.ones(2), 0)


def test_server_momentum_accumulates():
    opt = ServerMomentum(lr=1.0, momentum=0.5)
    x = opt.step(torch.zeros(1), torch.ones(1))  # v = 1
    x = opt.step(x, torch.ones(1))  # v = 1.5
    assert torch.allclose(x, torch.tensor([2.5]))


def test_fedadam_first_step_known_answer():
    opt = ServerAdaptive(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    delta = torch.tensor([2.0, -1.0])
    x = opt.step(torch.zeros(2), delta)
    m = 0.1 * delta
    v = 0.01 * delta**2
    assert torch.allclose(x, 0.1 * m / (v.sqrt() + 1e-3))


def test_fedyogi_second_moment_moves_toward_square():
    opt = ServerAdaptive(lr=0.1, yogi=True)
    opt.step(torch.zeros(1), torch.tensor([2.0]))
    assert opt.v is not None and 0 < float(opt.v) < 4.0


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: ServerSGD(lr=0.7),
        lambda: ServerMomentum(lr=0.5, momentum=0.9),
        lambda: ServerAdaptive(lr=0.1),
        lambda: ServerAdaptive(lr=0.1, yogi=True),
    ],
    ids=["sgd", "momentum", "adam", "yogi"],
)
def test_server_optimizer_resumes_bit_identically_from_state_dict(make_opt):
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(64, generator=gen)
    deltas = torch.randn(3, 64, generator=gen)

    straight = make_opt()
    assert straight.state_dict() == {}
    x = start
    for d in deltas:
        x = straight.step(x, d)

    first = make_opt()
    y = first.step(start, deltas[0])
    saved = first.state_dict()
    resumed = make_opt()
    resumed.load_state_dict(saved)
    for d in deltas[1:]:
        y = resumed.step(y, d)
    assert torch.equal(x, y)
    assert straight.state_dict().keys() == resumed.state_dict().keys()
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key])


def test_server_optimizer_load_state_dict_names_bad_keys():
    with pytest.raises(StateError, match="unknown key 'velocity'"):
        ServerSGD().load_state_dict({"velocity": torch.zeros(2)})
    with pytest.raises(StateError, match="unknown key 'm'"):
        ServerMomentum().load_state_dict({"m": torch.zeros(2)})
    with pytest.raises(StateError, match="missing key 'v'"):
        ServerAdaptive().load_state_dict({"m": torch.zeros(2)})
    fresh = ServerAdaptive()
    fresh.load_state_dict({})
    assert fresh.m is None and fresh.v is None
