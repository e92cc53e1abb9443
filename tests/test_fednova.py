"""FedNova (`server.step_normalization = "fednova"`): clients send their delta per local step, and the
round's mean is scaled by the aggregated clients' weighted mean of steps. Known answers on the engine,
FedAvg again when every client takes the same steps, and a difference when they do not."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedtune.aggregate import ServerSGD, weighted_mean
from fedtune.aggregate.aggregator import Aggregator
from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.round.engine import RoundEngine
from fedtune.round.inprocess import InProcessTransport
from fedtune.round.messages import (
    ClientReport,
    DenseUpdate,
    EvalReport,
    EvalRequest,
    Submission,
    TrainRequest,
)
from fedtune.simulation import simulate
from tests.test_round_engine import NUMEL, plan
from tests.test_simulation import SMALL


class PerStep:
    """Sends `per_step` (its delta over `steps` local steps, as a FedNova client encodes it)."""

    def __init__(self, cid: str, per_step: list[float], steps: int, examples: int) -> None:
        self.cid, self.per_step, self.steps, self.examples = cid, per_step, steps, examples

    def respond(self, message: object) -> object:
        if isinstance(message, EvalRequest):
            return EvalReport(self.cid, 1.0, 1)
        assert isinstance(message, TrainRequest)
        report = ClientReport(self.cid, self.examples, self.steps, 1.0)
        return Submission(report, DenseUpdate(torch.tensor(self.per_step)))


def test_the_mean_per_step_update_is_scaled_by_the_weighted_mean_steps():
    scripts = {"a": PerStep("a", [1.0, 0.0, 2.0], 2, 10), "b": PerStep("b", [0.0, 3.0, 1.0], 6, 30)}
    transport = InProcessTransport(lambda m: scripts[m.client_id])
    e = RoundEngine(
        plan(("a", "b"), rounds=1, normalize_steps=True),
        transport,
        Aggregator(weighted_mean, ServerSGD(lr=1.0)),
        torch.zeros(NUMEL),
    )
    list(e.run())
    tau_eff = (10 * 2 + 30 * 6) / 40  # 5 steps
    mean = (10 * torch.tensor([1.0, 0.0, 2.0]) + 30 * torch.tensor([0.0, 3.0, 1.0])) / 40
    assert torch.allclose(e.global_flat, tau_eff * mean)


def adapter_after(tmp_path, name: str, *overrides: str) -> torch.Tensor:
    config = load_config(None, [*SMALL, "federation.rounds=1", f"run.dir={tmp_path / name}", *overrides])
    result = simulate(config)
    tensors = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    return torch.cat([tensors[k].flatten() for k in sorted(tensors)])


@pytest.mark.slow
def test_fednova_is_fedavg_when_steps_are_equal_and_differs_when_they_are_not(tmp_path):
    fedavg = adapter_after(tmp_path, "fedavg")
    nova = adapter_after(tmp_path, "nova", "server.step_normalization='fednova'")
    assert torch.allclose(nova, fedavg, atol=1e-6)  # delta / tau * tau: one round, only rounding apart
    # whole epochs: the clients' data sizes differ, so do their steps
    epochs = ["federation.local_epochs=1", "data.max_examples_per_client='all'"]
    avg_epochs = adapter_after(tmp_path, "avg-epochs", *epochs)
    nova_epochs = adapter_after(tmp_path, "nova-epochs", *epochs, "server.step_normalization='fednova'")
    assert not torch.allclose(nova_epochs, avg_epochs, atol=1e-4)


def test_fednova_is_refused_with_svd():
    with pytest.raises(ConfigError, match=r"server\.step_normalization = 'fednova'"):
        load_config(None, ["server.lora_aggregation='svd'", "server.step_normalization='fednova'"])
