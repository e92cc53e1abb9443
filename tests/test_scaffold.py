"""SCAFFOLD (`server.control_variates = "scaffold"`): the control update's known answers, the corrected
trainer, the engine's split of the packed sum, zero controls giving FedAvg's first round, the server
control against the clients' committed controls, the client state with controls, and the refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedtune.aggregate import ServerSGD, weighted_mean
from fedtune.aggregate.aggregator import Aggregator
from fedtune.checkpoint import Checkpoint, decode_checkpoint, encode_checkpoint
from fedtune.compress import CompressionSpec
from fedtune.config import Config, check, load_config
from fedtune.data import ClientData
from fedtune.deploy.site_state import STATE_FILE, SiteRunIdentity, SiteStateStore, fingerprint
from fedtune.errors import ConfigError, StateError
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
from fedtune.round.plan import RunPlan, WeightRule
from fedtune.round.scaffold import (
    ControlSpec,
    client_step,
    client_step_from_gradients,
    correction,
    pack,
    server_step,
    split,
)
from fedtune.round.state import ClientState, ClientStateStore
from fedtune.simulation import Silent, setup
from tests.test_simulation import SMALL

# ---- the formulas ------------------------------------------------------------------------------------


def test_client_step_is_option_two_on_a_hand_built_case():
    delta = torch.tensor([0.5, -1.0])
    server, client = torch.tensor([0.25, 0.0]), torch.tensor([0.5, 0.75])
    step = client_step(delta, server, client, steps=2, lr=0.25)  # delta / (K eta) = [1, -2]
    assert torch.equal(step.control, torch.tensor([-0.75, 2.75]))  # c_i - c - delta / (K eta)
    assert torch.equal(step.delta, torch.tensor([-1.25, 2.0]))  # c_i+ - c_i
    fresh = client_step(delta, server, None, steps=2, lr=0.25)  # no control yet: c_i = 0
    assert torch.equal(fresh.control, fresh.delta) and torch.equal(fresh.delta, torch.tensor([-1.25, 2.0]))
    assert torch.equal(correction(server, client), torch.tensor([-0.25, -0.75]))
    assert torch.equal(correction(server, None), server)
    with pytest.raises(ValueError):
        client_step(delta, server, client, steps=0, lr=0.25)


def test_pack_split_and_the_server_step():
    packed = pack(torch.tensor([1.0, 2.0]), torch.tensor([4.0, -8.0]), 0.25)
    assert torch.equal(packed, torch.tensor([1.0, 2.0, 1.0, -2.0]))
    first, second = split(packed)
    assert torch.equal(first, torch.tensor([1.0, 2.0])) and torch.equal(second, torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError):
        split(torch.zeros(3))
    # c + (|S| / N) * mean / s: mean of s * Delta c = [0.5, -1], s = 0.5, 2 of 4 clients
    moved = server_step(
        torch.tensor([0.0, 1.0]),
        torch.tensor([0.5, -1.0], dtype=torch.float64),
        count=2,
        population=4,
        scale=0.5,
    )
    assert moved.dtype == torch.float32 and torch.equal(moved, torch.tensor([0.5, 0.0]))


# ---- the engine, with scripted clients -----------------------------------------------------------------

NUMEL = 2
SPEC = ControlSpec(lr=0.25, scale=0.5)


class Scripted:
    """Sends [delta, s * Delta c] as given, and records the control its tasks carried."""

    def __init__(self, cid: str, packed: list[float], examples: int) -> None:
        self.cid, self.packed, self.examples = cid, packed, examples
        self.controls: list[torch.Tensor | None] = []

    def respond(self, message: object) -> object:
        if isinstance(message, EvalRequest):
            return EvalReport(self.cid, 1.0, 1)
        assert isinstance(message, TrainRequest)
        self.controls.append(message.task.control)
        return Submission(
            ClientReport(self.cid, self.examples, 1, 1.0), DenseUpdate(torch.tensor(self.packed))
        )


def scripted_plan(population: tuple[str, ...], cohort: int) -> RunPlan:
    return RunPlan(
        seed=0,
        rounds=2,
        population=population,
        cohort=cohort,
        selected=cohort,
        min_clients=1,
        eval_every=2,
        eval_members=(0,),
        weights=WeightRule(cap=100),
        compression=CompressionSpec("none"),
        adapter_numel=NUMEL,
        control=SPEC,
    )


def test_the_engine_splits_the_packed_mean_between_the_adapter_and_the_control():
    # every client in the cohort: |S| / N = 1/2 with 2 clients of a population of 4
    scripts = {
        "a": Scripted("a", [1.0, 0.0, 0.5, 1.0], 1),
        "b": Scripted("b", [0.0, 1.0, 1.5, -1.0], 3),
        "c": Scripted("c", [0.0, 0.0, 0.0, 0.0], 1),
        "d": Scripted("d", [0.0, 0.0, 0.0, 0.0], 1),
    }
    run_plan = scripted_plan(("a", "b", "c", "d"), cohort=4)
    engine = RoundEngine(
        run_plan,
        InProcessTransport(lambda m: scripts[m.client_id]),
        Aggregator(weighted_mean, ServerSGD(1.0)),
        torch.zeros(NUMEL),
    )
    result = engine.run_round(1)
    assert result.clients == 4 and result.bytes_down == 4 * 2 * NUMEL * 4  # adapter and control, float32
    assert all(torch.equal(s.controls[0], torch.zeros(NUMEL)) for s in scripts.values())  # c starts at 0
    # weights 1, 3, 1, 1 (sum 6): delta mean [1/6, 3/6]; scaled control mean [(0.5 + 4.5) / 6, (1 - 3) / 6]
    assert torch.allclose(engine.global_flat, torch.tensor([1 / 6, 0.5]))
    expected = torch.tensor([5 / 6, -2 / 6]) / SPEC.scale * (4 / 4)
    assert torch.allclose(engine.control, expected)
    state = engine.state(1)
    assert state.control is engine.control
    engine.run_round(2)
    assert all(torch.equal(s.controls[1], expected) for s in scripts.values())  # the next task carries c


def test_a_partial_cohort_moves_the_control_by_its_share_of_the_population():
    scripts = {cid: Scripted(cid, [0.0, 0.0, 1.0, -1.0], 5) for cid in "abcd"}
    engine = RoundEngine(
        scripted_plan(tuple("abcd"), cohort=2),
        InProcessTransport(lambda m: scripts[m.client_id]),
        Aggregator(weighted_mean, ServerSGD(1.0)),
        torch.zeros(NUMEL),
    )
    engine.run_round(1)
    assert torch.equal(engine.control, torch.tensor([1.0, -1.0]) / SPEC.scale * (2 / 4))


class Drifting(Scripted):
    """Sends an update that depends on the control it was sent (as a corrected client's does)."""

    def respond(self, message: object) -> object:
        reply = super().respond(message)
        if isinstance(message, TrainRequest) and isinstance(reply, Submission):
            assert isinstance(reply.update, DenseUpdate) and message.task.control is not None
            control = message.task.control
            moved = reply.update.values + torch.cat([control * 0.3, -control * 0.7])
            return Submission(reply.report, DenseUpdate(moved))
        return reply


def test_an_engine_resumed_from_its_checkpoint_continues_bit_identically():
    def scripts() -> dict[str, Scripted]:
        return {c: Drifting(c, [0.1 * k, -0.2, 0.3, 0.1 * k], k) for k, c in enumerate("abcd", 1)}

    def engine_for(parts: dict[str, Scripted], **options) -> RoundEngine:
        run_plan = replace(scripted_plan(tuple("abcd"), cohort=2), rounds=3)
        return RoundEngine(
            run_plan,
            InProcessTransport(lambda m: parts[m.client_id]),
            Aggregator(weighted_mean, ServerSGD(0.5)),
            options.pop("global_flat", torch.zeros(NUMEL)),
            **options,
        )

    straight = engine_for(scripts())
    for r in (1, 2, 3):
        straight.run_round(r)
    first = engine_for(scripts())
    first.run_round(1)
    state = first.state(1)
    encoded = encode_checkpoint(
        Checkpoint(1, state.global_flat, state.optimizer_state, control=state.control)
    )
    saved = decode_checkpoint(1, *encoded, where="test")
    resumed = engine_for(scripts(), global_flat=saved.global_flat, control=saved.control)
    for r in (2, 3):
        resumed.run_round(r)
    assert torch.equal(resumed.global_flat, straight.global_flat)
    assert torch.equal(resumed.control, straight.control) and float(straight.control.abs().max()) > 0


def test_the_engine_refuses_scaffold_with_a_rule_that_is_not_a_mean():
    from fedtune.aggregate import coordinate_median

    with pytest.raises(ConfigError, match=r"server\.rule = 'fedavg'"):
        RoundEngine(
            scripted_plan(("a", "b"), 2),
            InProcessTransport(lambda m: None),
            Aggregator(coordinate_median, ServerSGD(1.0)),
            torch.zeros(NUMEL),
        )


# ---- the corrected trainer ---------------------------------------------------------------------------


def test_a_zero_correction_gives_the_uncorrected_delta_bit_for_bit(trainer, client):
    start = trainer.adapter.get()
    plain = trainer.train(start, client, seed=3, steps=3)
    zero = trainer.train(start, client, seed=3, steps=3, correction=torch.zeros_like(start))
    assert plain.delta is not None and zero.delta is not None
    assert torch.equal(plain.delta, zero.delta)
    nudged = trainer.train(start, client, seed=3, steps=3, correction=torch.full_like(start, 0.5))
    assert nudged.delta is not None and not torch.equal(nudged.delta, plain.delta)
    with pytest.raises(ValueError, match="adapter's"):
        trainer.train(start, client, seed=3, steps=1, correction=torch.zeros(3))


def test_the_correction_is_added_to_the_gradient_before_clipping(trainer, client):
    """With a huge constant correction the clipped gradient is (almost) the correction's direction: AdamW's
    first step then moves every value by about -lr * sign(correction)."""
    start = trainer.adapter.get()
    push = torch.where(torch.arange(start.numel()) % 2 == 0, 1e6, -1e6)
    update = trainer.train(start, client, seed=3, steps=1, correction=push)
    assert update.delta is not None
    assert torch.equal(torch.sign(update.delta), -torch.sign(push))


def reference_scaffold_steps(trainer, client, global_flat, correction, seed: int, steps: int):
    """SCAFFOLD's local steps written out: raw gradient recorded, + (c - c_i), clipped, AdamW."""
    from fedtune.data.batching import collate
    from fedtune.train.local import batch_schedule

    adapter = trainer.adapter
    schedule = batch_schedule(len(client.train), 4, torch.Generator().manual_seed(seed), steps=steps)
    adapter.load(global_flat)
    optimizer = torch.optim.AdamW(adapter.params, lr=1e-2, weight_decay=0.0)
    raw = torch.zeros_like(global_flat)
    trainer.model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for indices in schedule:
            batch = collate([client.train[i] for i in indices.tolist()], trainer.pad_id)
            trainer.model(**batch).loss.backward()
            raw += torch.cat([p.grad.flatten() for p in adapter.params])
            offset = 0
            for p in adapter.params:
                p.grad += correction[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()
            torch.nn.utils.clip_grad_norm_(adapter.params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    trainer.model.eval()
    return adapter.buffer - global_flat, raw / steps


def test_the_trainer_corrects_every_step_and_reports_its_mean_raw_gradient(trainer, client):
    start = trainer.adapter.get()
    fix = torch.randn(start.shape, generator=torch.Generator().manual_seed(5)) * 0.01
    got = trainer.train(start, client, seed=7, steps=3, correction=fix)
    delta, mean_gradient = reference_scaffold_steps(trainer, client, start, fix, seed=7, steps=3)
    assert got.delta is not None and got.mean_gradient is not None
    assert torch.allclose(got.delta, delta, atol=1e-6, rtol=1e-5)
    assert torch.allclose(got.mean_gradient, mean_gradient, atol=1e-6, rtol=1e-5)
    assert float(mean_gradient.abs().max()) > 0
    assert trainer.train(start, client, seed=7, steps=1).mean_gradient is None  # only under SCAFFOLD


def test_the_gradient_form_of_the_client_step():
    """c_i+ = mean raw gradient: what option II's formula gives for plain SGD steps."""
    mean_gradient, client, server = (
        torch.tensor([0.5, -1.0]),
        torch.tensor([0.25, 0.25]),
        torch.tensor([1.0, 0.0]),
    )
    step = client_step_from_gradients(mean_gradient, client)
    assert torch.equal(step.control, mean_gradient) and torch.equal(step.delta, torch.tensor([0.25, -1.25]))
    # K SGD steps y <- y - eta (g + c - c_i) with the same g every step: the formula agrees
    steps, lr = 4, 0.125
    delta = -steps * lr * (mean_gradient + server - client)
    formula = client_step(delta, server, client, steps=steps, lr=lr)
    assert torch.equal(formula.control, step.control) and torch.equal(formula.delta, step.delta)


# ---- a tiny simulation ---------------------------------------------------------------------------------


def small(tmp_path, name: str, *overrides: str) -> Config:
    return load_config(None, [*SMALL, "federation.rounds=2", f"run.dir={tmp_path / name}", *overrides])


@pytest.mark.slow
def test_round_one_is_fedavg_and_the_control_is_the_clients_mean(tmp_path):
    plain = setup(small(tmp_path, "plain"), Silent(), lambda _m: None)
    plain.engine.run_round(1)
    scaffold = setup(
        small(tmp_path, "scaffold", "server.control_variates='scaffold'"), Silent(), lambda _m: None
    )
    engine, states = scaffold.engine, scaffold.states
    result = engine.run_round(1)
    assert torch.equal(engine.global_flat, plain.engine.global_flat)  # c = c_i = 0: no correction
    # c = (|S| / N) * weighted mean of Delta c_i, and Delta c_i = c_i+ here (c_i was 0)
    ids = result.client_ids
    assert ids is not None and len(ids) == 3
    examples = {c.client_id: min(len(c.train), 48) for c in scaffold.clients}
    weights = torch.tensor([float(examples[cid]) for cid in ids])
    controls = torch.stack([states.get(cid).control for cid in ids])
    expected = (weights[:, None] * controls).sum(0) / weights.sum() * (3 / 6)
    assert torch.allclose(engine.control, expected, rtol=1e-5, atol=1e-7)
    assert float(engine.control.abs().max()) > 0
    # the second round: the correction is on, so it no longer matches FedAvg's
    before = {cid: states.get(cid).control for cid in ids}
    plain.engine.run_round(2)
    second = engine.run_round(2)
    assert not torch.equal(engine.global_flat, plain.engine.global_flat)
    ids2 = second.client_ids
    assert ids2 is not None
    zero = torch.zeros_like(engine.control)
    changes = torch.stack([states.get(cid).control - before.get(cid, zero) for cid in ids2])
    weights2 = torch.tensor([float(examples[cid]) for cid in ids2])
    moved = (weights2[:, None] * changes).sum(0) / weights2.sum() * (len(ids2) / 6)
    assert torch.allclose(engine.control, expected + moved, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_scaffold_composes_with_ffa_lora(tmp_path):
    config = small(tmp_path, "ffa", "server.control_variates='scaffold'", "server.lora_aggregation='ffa'")
    s = setup(config, Silent(), lambda _m: None)
    s.engine.run_round(1)
    assert s.engine.control is not None and s.engine.control.numel() == s.local.adapter.numel
    assert all("lora_B" in name for name in s.local.adapter.names)


# ---- client state --------------------------------------------------------------------------------------


def test_the_client_state_store_round_trips_controls_and_the_state_before():
    store = ClientStateStore(repeatable=True)
    first = ClientState(torch.tensor([1.0]), 2, torch.tensor([0.5, -0.5]))
    store.commit("a", 1, first)
    store.commit("a", 2, ClientState(None, 4, torch.tensor([0.25, 0.0])))
    tensors, meta = store.state_dict()
    assert set(tensors) == {"control/a", "before/residual/a", "before/control/a"}
    again = ClientStateStore(repeatable=True)
    again.load_state_dict(tensors, meta)
    assert torch.equal(again.get("a").control, torch.tensor([0.25, 0.0])) and again.get("a").dpsgd_steps == 4
    repeated = again.begin("a", 2)  # round 2 again, after a restart: from the state before it
    assert torch.equal(repeated.control, first.control) and torch.equal(repeated.residual, first.residual)
    assert again.nbytes == store.nbytes == (2 + 1 + 2) * 4


# ---- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sections,fields",
    [
        ({"server": {"rule": "median"}}, "server.rule = 'median'"),
        ({"privacy": {"mode": "central", "noise_multiplier": 1.0}}, "privacy.mode = 'central'"),
        ({"dpsgd": {"enabled": True}}, "dpsgd.enabled"),
    ],
)
def test_scaffold_refuses_what_it_cannot_compose_with(sections, fields):
    server = {"control_variates": "scaffold", **sections.pop("server", {})}
    config = Config.model_validate({"server": server, **sections})
    with pytest.raises(ConfigError, match=r"server\.control_variates = 'scaffold'") as refused:
        check(config)
    assert fields in str(refused.value) and "server.control_variates = 'none'" in str(refused.value)


def test_dpsgd_trainer_refuses_a_correction():
    from fedtune.train.dpsgd import DpSgdTrainer

    trainer = DpSgdTrainer.__new__(DpSgdTrainer)  # the refusal comes before any state is read
    with pytest.raises(ValueError, match="control variates"):
        trainer.train(torch.zeros(2), ClientData("a", [], []), seed=0, steps=1, correction=torch.zeros(2))


# ---- deployment: the state file, the checkpoint, the wire ------------------------------------------------


def site_identity(**changes) -> SiteRunIdentity:
    return SiteRunIdentity(
        **{
            **dict(
                client_id="site-a", run_name="r", run_seed=1, adapter_numel=2, config_fingerprint="f" * 32
            ),
            **changes,
        }
    )


def test_the_site_state_file_is_written_reloaded_after_a_restart_and_refused_for_another_run(tmp_path):
    store = SiteStateStore(tmp_path, site_identity())
    assert not (tmp_path / STATE_FILE).exists() and len(store) == 0  # nothing until a commit
    store.commit("site-a", 1, ClientState(None, 0, torch.tensor([0.5, -0.5])))
    store.commit("site-a", 2, ClientState(torch.tensor([1.0, 2.0]), 0, torch.tensor([0.25, 0.0])))
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # written atomically: no temporary left
    assert (tmp_path / STATE_FILE).stat().st_mode & 0o777 == 0o600  # derived from the site's data
    restarted = SiteStateStore(tmp_path, site_identity())
    assert torch.equal(restarted.get("site-a").control, torch.tensor([0.25, 0.0]))
    assert torch.equal(restarted.get("site-a").residual, torch.tensor([1.0, 2.0]))
    again = restarted.begin("site-a", 2)  # the server hands round 2 out again: from the state before it
    assert torch.equal(again.control, torch.tensor([0.5, -0.5])) and again.residual is None
    assert torch.equal(restarted.begin("site-a", 3).control, torch.tensor([0.25, 0.0]))
    for other in ({"run_seed": 2}, {"run_name": "s"}, {"adapter_numel": 3}, {"config_fingerprint": "0" * 32}):
        with pytest.raises(StateError, match="belongs to another run"):
            SiteStateStore(tmp_path, site_identity(**other))
    with pytest.raises(StateError, match="delete it if this is a new run"):
        SiteStateStore(tmp_path, site_identity()).begin("site-a", 1)  # a new run with the same config
    (tmp_path / STATE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(StateError, match="corrupt"):
        SiteStateStore(tmp_path, site_identity())


def test_the_config_fingerprint_ignores_what_a_resumed_server_may_change():
    base = load_config(None, [*SMALL])
    assert fingerprint(base) == fingerprint(load_config(None, [*SMALL, "federation.rounds=9"]))
    assert fingerprint(base) == fingerprint(load_config(None, [*SMALL, "deploy.round_timeout_s=5"]))
    assert fingerprint(base) != fingerprint(load_config(None, [*SMALL, "train.lr=0.5"]))


def test_a_checkpoint_keeps_the_server_control():
    flat, control = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -0.25])
    encoded = encode_checkpoint(Checkpoint(3, flat, {}, control=control))
    decoded = decode_checkpoint(3, *encoded, where="test")
    assert decoded.control is not None and torch.equal(decoded.control, control)
    assert decode_checkpoint(3, *encode_checkpoint(Checkpoint(3, flat, {})), where="t").control is None
    with pytest.raises(StateError):
        encode_checkpoint(Checkpoint(3, flat, {}, control=torch.zeros(3)))


def test_the_task_carries_the_control_over_the_wire():
    from fedtune.round.messages import TrainTask
    from fedtune.round.plan import Member
    from fedtune.transport import convert

    task = TrainTask(4, torch.tensor([1.0, 2.0]), None, None, control=torch.tensor([0.5, -0.5]))
    request = TrainRequest(task, Member(0, 1, "site-a"))
    assert request.nbytes() == 4 * 4
    header = convert.task_to_pb(request, b"n", 10.0)
    assert header.control_numel == 2 and header.adapter_numel == 2
    assert [t.tolist() for t in convert.task_values(request)] == [[1.0, 2.0], [0.5, -0.5]]
    back = convert.request_from_pb(header, task.global_flat, "site-a", torch.tensor([0.5, -0.5]))
    assert isinstance(back, TrainRequest) and torch.equal(back.task.control, task.control)
    plain = convert.task_to_pb(
        TrainRequest(TrainTask(4, task.global_flat, None, None), request.member), b"n", 1
    )
    assert plain.control_numel == 0


def test_the_control_scale_is_public_eta_times_the_local_steps():
    from fedtune.config.plan import control_spec, participant_spec

    assert control_spec(load_config(None, [*SMALL])) is None
    steps = control_spec(load_config(None, [*SMALL, "server.control_variates='scaffold'"]))
    assert steps == ControlSpec(lr=0.05, scale=0.05 * 6)
    epochs = load_config(None, [*SMALL, "server.control_variates='scaffold'", "federation.local_epochs=2"])
    assert control_spec(epochs) == ControlSpec(lr=0.05, scale=0.05)  # K differs per client: eta alone
    assert participant_spec(epochs).control == control_spec(epochs) and participant_spec(epochs).keeps_state


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("server.lora_aggregation='svd'", "server.lora_aggregation = 'svd'"),
        ("server.lora_aggregation='hetlora'", "server.lora_aggregation = 'hetlora'"),
        ("server.step_normalization='fednova'", "choose one"),
    ],
)
def test_scaffold_is_refused_with_what_reshapes_its_coordinates(override, words):
    with pytest.raises(ConfigError, match=r"server\.control_variates = 'scaffold'") as err:
        load_config(None, ["server.control_variates='scaffold'", override])
    assert words in str(err.value)
