"""The training phase's failure policy, on typed outcomes (the engine's round tests drive the phases)."""

from __future__ import annotations

import pytest
import torch

from fedtune.aggregate import SummedUpdates
from fedtune.round.phase import Collected, failure
from fedtune.round.results import SecAggMetrics


def collected(count: int | None, *, abort: str | None = None) -> Collected:
    updates = None if count is None else SummedUpdates(torch.zeros(4), float(max(count, 1)), count)
    secagg = None
    if abort is not None:
        secagg = SecAggMetrics((3, 2, 1, 0), 2, 2, None, None, 0.0, 0.0, 0.0, abort)
    return Collected(updates, {}, {}, {}, 0, 0, 0.0, secagg)


@pytest.mark.parametrize(("count", "min_clients"), [(None, 1), (0, 1), (2, 3)])
def test_too_few_updates_fail_the_round_and_say_how_many(count: int | None, min_clients: int) -> None:
    why = failure(collected(count), dp_on=False, min_clients=min_clients)
    assert why is not None
    assert f"{count or 0} updates arrived" in why and f"min_clients = {min_clients}" in why


def test_enough_updates_pass() -> None:
    assert failure(collected(3), dp_on=False, min_clients=3) is None


def test_under_dp_who_answered_changes_nothing() -> None:
    assert failure(collected(0), dp_on=True, min_clients=5) is None


@pytest.mark.parametrize("dp_on", [False, True])
def test_a_secagg_abort_fails_the_round_even_under_dp(dp_on: bool) -> None:
    why = failure(collected(None, abort="2 of 4 masked inputs, threshold 3"), dp_on=dp_on, min_clients=1)
    assert why is not None and why.startswith("2 of 4 masked inputs, threshold 3")
