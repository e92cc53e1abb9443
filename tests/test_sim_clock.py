"""The simulated clock on its own: known answers, a deadline cutting exactly the late clients, availability.

Scripted participants over the in-process transport (as in test_round_engine), so every time is a known
answer: a 3-value adapter is 12 bytes down and 12 bytes up, and each scripted client takes one step.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fedtune.aggregate import ServerSGD, weighted_mean
from fedtune.aggregate.aggregator import Aggregator
from fedtune.round.clock import SimulatedClock, compute_seconds, round_seconds, transfer_seconds
from fedtune.round.engine import RoundEngine
from fedtune.round.inprocess import InProcessTransport
from fedtune.round.profiles import ClientProfile, ClientsConfig, online, resolve_profiles
from fedtune.round.results import ClientTiming
from tests.test_round_engine import NUMEL, Scripted, plan

BATCH = 4
ADAPTER_BYTES = NUMEL * 4


class Counting(Scripted):
    """A scripted participant that counts the training requests it answered."""

    def __init__(self, cid: str, delta: list[float], examples: int) -> None:
        super().__init__(cid, delta, examples)
        self.trained = 0

    def respond(self, message: object) -> object:
        reply = super().respond(message)
        self.trained += type(message).__name__ == "TrainRequest"
        return reply


def scripts_for(ids: list[str]) -> dict[str, Counting]:
    return {cid: Counting(cid, [float(i + 1), float(-i), 0.5 * i], 10 + i) for i, cid in enumerate(ids)}


def clocked(scripts, run_plan, profiles, deadline_s=None, seed=0):
    inner = InProcessTransport(lambda m: scripts[m.client_id])
    clock = SimulatedClock(inner, profiles, batch_size=BATCH, seed=seed, deadline_s=deadline_s)
    aggregator = Aggregator(weighted_mean, ServerSGD(lr=1.0))
    return RoundEngine(run_plan, clock, aggregator, torch.zeros(NUMEL)), clock


def test_known_answers():
    assert transfer_seconds(1_000_000, 8.0) == 1.0  # 8 Mbit over 8 Mbit/s
    assert transfer_seconds(250_000, 1.0) == 2.0
    assert transfer_seconds(10**9, math.inf) == 0.0
    assert compute_seconds(0.05, 8, 10) == pytest.approx(4.0)  # latency x batch x steps
    assert compute_seconds(0.0, 8, 10) == 0.0
    fast = ClientTiming(True, True, 1.0, 2.0, 3.0)
    cut = ClientTiming(True, False, 1.0, 20.0, 3.0, late=True)
    away = ClientTiming(False, False, 0.0, 0.0, 0.0)
    assert fast.finish_s == 6.0
    assert round_seconds({"a": fast}, None) == 6.0 and round_seconds({"a": fast}, 10.0) == 6.0
    assert round_seconds({"a": fast, "b": cut}, 10.0) == 10.0  # someone cut: the deadline
    assert round_seconds({"a": fast, "c": away}, 10.0) == 10.0  # offline is silent: waited out
    assert round_seconds({"a": fast, "c": away}, None) == 6.0
    assert round_seconds({"c": away}, None) == 0.0


PROFILES = ClientsConfig.model_validate(
    {
        "profiles": [
            {"match": "fast", "seconds_per_example": 1.0},  # 4 s
            {"match": "slow", "seconds_per_example": 3.0},  # 12 s: late
            {"match": "thin", "upload_mbps": ADAPTER_BYTES * 8 / 11e6},  # uploads in 11 s: late
            {"match": "edge", "seconds_per_example": 1.5, "download_mbps": ADAPTER_BYTES * 8 / 4e6},  # 6 + 4
        ]
    }
)
DEADLINE_S = 10.0


def expected_finish(profile: ClientProfile, steps: int = 1) -> float:
    """The clock's answer, written out: bytes / bandwidth down and up, latency x batch x steps."""
    down = 0.0 if math.isinf(profile.download_mbps) else ADAPTER_BYTES * 8 / (profile.download_mbps * 1e6)
    up = 0.0 if math.isinf(profile.upload_mbps) else ADAPTER_BYTES * 8 / (profile.upload_mbps * 1e6)
    return down + profile.seconds_per_example * BATCH * steps + up


def test_a_round_deadline_drops_exactly_the_clients_the_clock_says_are_late():
    ids = ["edge", "fast", "slow", "thin"]
    profiles = resolve_profiles(PROFILES, ids, seed=0)
    finish = {cid: expected_finish(profiles[cid]) for cid in ids}
    late = tuple(cid for cid in ids if finish[cid] > DEADLINE_S)
    assert late == ("slow", "thin") and finish["edge"] == pytest.approx(DEADLINE_S)  # on time, just

    scripts = scripts_for(ids)
    engine, clock = clocked(scripts, plan(tuple(ids), rounds=1), profiles, DEADLINE_S)
    _, first = list(engine.run())
    assert first.stragglers == late and first.client_ids == ("edge", "fast") and first.failed is None
    timing = clock.timing(1)
    assert timing.seconds == DEADLINE_S and timing.total_seconds == DEADLINE_S
    for cid in ids:
        assert timing.clients[cid].finish_s == pytest.approx(finish[cid])
        assert timing.clients[cid].late == (cid in late) and timing.clients[cid].delivered != (cid in late)
    assert all(s.trained == 1 for s in scripts.values())  # the late ones trained: the server moved on
    assert first.bytes_up == 2 * ADAPTER_BYTES  # only what arrived

    # the adapter equals a round where the late clients were never selected
    on_time = {cid: s for cid, s in scripts_for(ids).items() if cid not in late}
    baseline, _ = clocked(on_time, plan(("edge", "fast"), rounds=1), {})
    list(baseline.run())
    assert torch.equal(engine.global_flat, baseline.global_flat)

    row = first.to_row()
    assert "simulated_seconds" not in row  # the engine's row; the simulation adds its clock's timing
    row = replace(first, timing=timing).to_row()
    assert row["simulated_seconds"] == DEADLINE_S and row["simulated_seconds_total"] == DEADLINE_S
    assert row["client_seconds"]["thin"]["late"] and row["client_seconds"]["thin"][
        "upload_s"
    ] == pytest.approx(11)


def test_without_a_deadline_everyone_arrives_and_the_round_lasts_as_long_as_the_slowest():
    ids = ["edge", "fast", "slow", "thin"]
    profiles = resolve_profiles(PROFILES, ids, seed=0)
    engine, clock = clocked(scripts_for(ids), plan(tuple(ids), rounds=2), profiles)
    rounds = list(engine.run())
    assert all(r.stragglers == () and r.clients == 4 for r in rounds[1:])
    slowest = max(expected_finish(p) for p in profiles.values())
    assert slowest == pytest.approx(12.0)
    assert clock.timing(1).seconds == pytest.approx(slowest)
    assert clock.timing(2).total_seconds == pytest.approx(2 * slowest)
    assert clock.timing(0).seconds == 0.0  # the evaluation before training takes no simulated time


def test_offline_clients_are_silent_stragglers_drawn_per_round_from_the_seed():
    ids = [f"c{i}" for i in range(8)]
    config = ClientsConfig.model_validate({"profiles": [{"availability": 0.5}]})

    def run(seed: int):
        scripts = scripts_for(ids)
        profiles = resolve_profiles(config, ids, seed=seed)
        engine, _ = clocked(scripts, plan(tuple(ids), rounds=20, seed=seed), profiles, seed=seed)
        rounds = list(engine.run())[1:]
        for r in rounds:
            expected = tuple(c for c in ids if not online(profiles[c], r.round_num, seed))
            assert r.stragglers == expected
        # an offline client never heard of the round: it trained only in the rounds it was online
        for cid, s in scripts.items():
            assert s.trained == sum(cid in (r.client_ids or ()) for r in rounds)
        return [r.stragglers for r in rounds]

    first = run(0)
    assert first == run(0)  # seeded
    assert first != run(1)
    offline = sum(len(s) for s in first)
    assert 0.35 < offline / (20 * len(ids)) < 0.65  # about half, of 160 draws


def test_availability_zero_and_one():
    ids = ["a", "b", "c"]
    config = ClientsConfig.model_validate(
        {"profiles": [{"match": "a", "availability": 0.0}, {"match": "b", "availability": 1.0}]}
    )
    profiles = resolve_profiles(config, ids, seed=3)
    scripts = scripts_for(ids)
    engine, clock = clocked(scripts, plan(tuple(ids), rounds=3), profiles, deadline_s=5.0)
    rounds = list(engine.run())[1:]
    assert all(r.stragglers == ("a",) for r in rounds) and scripts["a"].trained == 0
    assert all(clock.timing(r.round_num).seconds == 5.0 for r in rounds)  # waited for "a" to the deadline
    assert not clock.timing(1).clients["a"].online
