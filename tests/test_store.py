"""The server's SQLite state: round trips, atomic round ends, crash recovery, corruption, threads, status."""

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fedtune.store as store_module
from fedtune.aggregate import ServerAdaptive
from fedtune.checkpoint import Checkpoint
from fedtune.errors import StateError
from fedtune.status import status_lines
from fedtune.store import Store

DP_STATE = {
    "accountant": {"version": 1, "accountant": "rdp", "history": [{"z": 1.1, "rounds": 3}]},
    "clip_l2_norm": 0.123456789012345,
}


def _checkpoint(round_num: int, seed: int = 0) -> Checkpoint:
    gen = torch.Generator().manual_seed(seed)
    return Checkpoint(
        round_num=round_num,
        global_flat=torch.randn(257, generator=gen),
        optimizer_state={"m": torch.randn(257, generator=gen), "v": torch.rand(257, generator=gen)},
        dp_state=DP_STATE,
        extra={"rows_written": round_num},
    )


def _finish(store: Store, round_num: int, clients: list[str]) -> Checkpoint:
    store.open_round(round_num, clients)
    for c in clients:
        store.set_participant(round_num, c, "submitted")
    checkpoint = _checkpoint(round_num, seed=round_num)
    store.finish_round(round_num, {"loss": 1.0 / round_num}, checkpoint)
    return checkpoint


def _assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert a.round_num == b.round_num
    assert torch.equal(a.global_flat, b.global_flat)
    assert a.optimizer_state.keys() == b.optimizer_state.keys()
    for key, value in a.optimizer_state.items():
        assert torch.equal(value, b.optimizer_state[key])
    assert a.dp_state == b.dp_state
    assert a.extra == b.extra


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "state.sqlite"


def test_second_start_run_is_refused_with_resume_hint(path):
    with Store(path) as store:
        assert store.run_config() is None
        store.start_run("[run]\nname = 'a'\n")
        with pytest.raises(StateError, match="--resume"):
            store.start_run("[run]\nname = 'b'\n")
    with Store(path) as store:
        assert store.run_config() == "[run]\nname = 'a'\n"


def test_rounds_and_participants_round_trip(path):
    with Store(path) as store:
        store.open_round(1, ["c2", "c0", "c1"])
        store.set_participant(1, "c0", "sent")
        store.set_participant(1, "c0", "submitted", "412 examples")
        store.set_participant(1, "c1", "refused", "bad signature")
        store.finish_round(1, {"loss": 0.5, "clients": 2}, None)
        store.open_round(2, ["c0"])
    with Store(path) as store:
        first, second = store.rounds()
        assert (first.round_num, first.status, first.metrics) == (1, "done", {"loss": 0.5, "clients": 2})
        assert first.finished_at is not None and first.finished_at >= first.started_at
        assert [(p.client_id, p.status, p.detail) for p in first.participants] == [
            ("c2", "selected", None),
            ("c0", "submitted", "412 examples"),
            ("c1", "refused", "bad signature"),
        ]
        assert (second.status, second.finished_at, second.metrics) == ("open", None, None)
        assert store.completed_rounds() == 1


def test_unopened_or_finished_rounds_are_refused(path):
    with Store(path) as store:
        with pytest.raises(StateError, match="never opened"):
            store.set_participant(4, "c0", "sent")
        with pytest.raises(StateError, match="never opened"):
            store.finish_round(4, {}, None)
        store.open_round(4, ["c0"])
        store.fail_round(4, "too few clients", {"submitted": 0})
        with pytest.raises(StateError, match="already failed"):
            store.finish_round(4, {}, None)
        with pytest.raises(StateError, match="already finished"):
            store.open_round(4, ["c0"])
        assert store.rounds()[0].metrics == {"submitted": 0, "round_failed": "too few clients"}
        assert store.completed_rounds() == 4


def test_crash_mid_round_resumes_from_last_finished_round(path):
    with Store(path) as store:
        store.start_run("cfg")
        store.save_checkpoint(_checkpoint(0))
        _finish(store, 1, ["a", "b"])
        done = _finish(store, 2, ["a", "b"])
        store.open_round(3, ["a", "b", "c"])
        store.set_participant(3, "a", "submitted")
        store.record_event("refused_stale_round", "round 2 message", round_num=3, client_id="c")
    # The process dies here: the Store is closed without finishing round 3.
    with Store(path) as store:
        assert store.completed_rounds() == 2
        latest = store.latest_checkpoint()
        assert latest is not None
        _assert_same(latest, done)
        # The re-run of round 3 replaces its participants.
        store.open_round(3, ["b", "d"])
        record = store.rounds()[-1]
        assert [(p.client_id, p.status) for p in record.participants] == [
            ("b", "selected"),
            ("d", "selected"),
        ]


def test_killed_process_leaves_the_last_finished_round(path):
    script = f"""
import os, torch
from fedtune.checkpoint import Checkpoint
from fedtune.store import Store
store = Store({str(path)!r})
store.open_round(1, ["a"])
store.finish_round(1, {{"loss": 1.0}}, Checkpoint(1, torch.ones(4), {{}}))
store.open_round(2, ["a", "b"])
store.set_participant(2, "a", "submitted")
os._exit(9)
"""
    done = subprocess.run([sys.executable, "-c", script], check=False)
    assert done.returncode == 9
    with Store(path) as store:
        assert store.completed_rounds() == 1
        latest = store.latest_checkpoint()
        assert latest is not None and latest.round_num == 1 and torch.equal(latest.global_flat, torch.ones(4))
        assert [(p.client_id, p.status) for p in store.rounds()[-1].participants] == [
            ("a", "submitted"),
            ("b", "selected"),
        ]


def test_finish_round_rolls_back_when_the_checkpoint_write_fails(path, monkeypatch):
    with Store(path) as store:
        _finish(store, 1, ["a"])
        store.open_round(2, ["a"])

        def disk_full(*args: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(store_module, "_insert_checkpoint", disk_full)
        with pytest.raises(sqlite3.OperationalError):
            store.finish_round(2, {"loss": 0.1}, _checkpoint(2))
        assert store.completed_rounds() == 1
        assert store.rounds()[-1].status == "open"
        assert store.latest_checkpoint().round_num == 1


def test_finish_round_refuses_unserializable_state_before_writing(path):
    with Store(path) as store:
        _finish(store, 1, ["a"])
        store.open_round(2, ["a"])
        bad = Checkpoint(2, torch.zeros(3), {"m": torch.zeros(3)}, dp_state={"x": object()})
        with pytest.raises(StateError, match="not JSON-able"):
            store.finish_round(2, {"loss": 0.1}, bad)
        not_json = Checkpoint(2, torch.zeros(3), {})
        with pytest.raises(StateError, match="not JSON-able"):
            store.finish_round(2, {"loss": object()}, not_json)
        assert store.completed_rounds() == 1
        assert store.rounds()[-1].status == "open"
        assert store.latest_checkpoint().round_num == 1


def test_checkpoint_round_trip_is_bit_identical_with_real_optimizer_state(path):
    opt = ServerAdaptive(lr=0.1, yogi=True)
    flat = opt.step(torch.randn(100), torch.randn(100))
    original = Checkpoint(1, flat, opt.state_dict(), dp_state=DP_STATE, extra={"rows_written": 3})
    empty = Checkpoint(0, torch.randn(100), {})
    with Store(path) as store:
        store.save_checkpoint(empty)
        store.save_checkpoint(original)
    with Store(path) as store:
        latest = store.latest_checkpoint()
    assert latest is not None
    _assert_same(latest, original)
    assert latest.global_flat.dtype == torch.float32 and latest.global_flat.dim() == 1
    resumed = ServerAdaptive(lr=0.1, yogi=True)
    resumed.load_state_dict(latest.optimizer_state)
    delta = torch.randn(100)
    assert torch.equal(opt.step(flat, delta), resumed.step(latest.global_flat, delta))


def test_checkpoint_of_an_empty_optimizer_state_round_trips(path):
    with Store(path) as store:
        store.save_checkpoint(Checkpoint(0, torch.arange(5, dtype=torch.float32), {}))
        latest = store.latest_checkpoint()
    assert latest is not None
    assert latest.optimizer_state == {} and latest.dp_state is None and latest.extra is None


def test_non_float32_adapter_is_refused_on_save(path):
    with Store(path) as store, pytest.raises(StateError, match="float32"):
        store.save_checkpoint(Checkpoint(0, torch.zeros(4, dtype=torch.float64), {}))


@pytest.mark.parametrize(
    "blob",
    [
        b"not safetensors at all",
        b"",
        "text",
        # valid safetensors, wrong content: a 2-D tensor / another key / another dtype
        "2d",
        "key",
        "dtype",
    ],
)
def test_corrupt_adapter_blob_is_state_error(path, blob):
    from safetensors.torch import save

    forged = {
        "2d": save({"global": torch.zeros(2, 2)}),
        "key": save({"weights": torch.zeros(3)}),
        "dtype": save({"global": torch.zeros(3, dtype=torch.float16)}),
    }.get(blob, blob)
    with Store(path) as store:
        store.save_checkpoint(_checkpoint(0))
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE checkpoints SET adapter = ? WHERE round = 0", (forged,))
    raw.close()
    with Store(path) as store, pytest.raises(StateError, match="corrupt"):
        store.latest_checkpoint()


def test_schema_version_mismatch_is_refused(path):
    Store(path).close()
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version = 2")
    raw.close()
    with pytest.raises(StateError, match="schema version 2"):
        Store(path)


def test_foreign_files_are_refused(path, tmp_path):
    path.parent.mkdir(parents=True)
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE other (x)")
    raw.close()
    with pytest.raises(StateError, match="another database"):
        Store(path)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(StateError, match="not a fedtune state file"):
        Store(garbage)
    with pytest.raises(StateError, match="no server state"):
        Store(tmp_path / "missing.sqlite", create=False)


def test_concurrent_writers_all_land(path):
    threads, calls = 8, 50
    with Store(path) as store:
        store.open_round(1, [f"c{t}" for t in range(threads)])
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                for i in range(calls):
                    store.set_participant(1, f"c{t}", "sent", f"call {i}")
                    store.record_event("refused_replay" if i % 2 else "update", f"{t}/{i}", round_num=1)
            except BaseException as err:  # surfaced below: a thread's exception is otherwise lost
                errors.append(err)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert errors == []
        assert store.event_counts(1) == {
            "refused_replay": threads * calls // 2,
            "update": threads * calls // 2,
        }
        assert sum(store.event_counts().values()) == threads * calls
        assert store.event_counts(2) == {}
        assert {p.detail for p in store.rounds()[0].participants} == {f"call {calls - 1}"}


def test_keep_checkpoints_keeps_the_newest(path):
    with Store(path) as store:
        store.save_checkpoint(_checkpoint(0))
        for r in range(1, 6):
            _finish(store, r, ["a"])
        store.keep_checkpoints(last=2)
        raw = sqlite3.connect(path)
        assert [r for (r,) in raw.execute("SELECT round FROM checkpoints ORDER BY round")] == [4, 5]
        raw.close()
        store.keep_checkpoints(last=1)
        assert store.latest_checkpoint().round_num == 5
        with pytest.raises(StateError, match="keep >= 1"):
            store.keep_checkpoints(last=0)


def test_nan_and_inf_metrics_are_stored_as_null(path):
    with Store(path) as store:
        store.open_round(1, ["a"])
        metrics = {"loss": float("nan"), "grad": [1.5, float("inf")], "eps": torch.tensor(2.5), "n": 3}
        store.finish_round(1, metrics, None)
    raw = sqlite3.connect(path)
    (text,) = raw.execute("SELECT metrics_json FROM rounds").fetchone()
    raw.close()
    assert "NaN" not in text and "Infinity" not in text
    with Store(path) as store:
        assert store.rounds()[0].metrics == {"loss": None, "grad": [1.5, None], "eps": 2.5, "n": 3}


def test_status_lines_show_stragglers_and_refusals(path):
    with Store(path) as store:
        _finish(store, 1, ["a", "b"])
        store.open_round(2, ["a", "b", "c", "d"])
        store.set_participant(2, "a", "submitted")
        store.set_participant(2, "b", "sent")
        store.set_participant(2, "d", "dropped", "disconnected")
        store.fail_round(2, "1 of 3 required updates", {})
        store.record_event("refused_bad_signature", "x", client_id="z")
        store.record_event("refused_bad_signature", "y", client_id="z")
        store.record_event("refused_stale_round", "z", round_num=2)
        store.record_event("update", "ok", round_num=2)
        lines = status_lines(store.rounds(), store.event_counts())
    text = "\n".join(lines)
    assert lines[0] == "rounds: 1 done, 1 failed, 0 open (latest 2)"
    round_two = next(line for line in lines if line.startswith("round    2"))
    assert "submitted 1/4" in round_two
    assert "stragglers 2 (b, c)" in round_two
    assert "dropped 1" in round_two
    assert "reason: 1 of 3 required updates" in round_two
    assert "stragglers 0" in next(line for line in lines if line.startswith("round    1"))
    assert "refused messages: 3 (refused_bad_signature 2, refused_stale_round 1)" in text
    assert status_lines([], {}) == ["no rounds yet", "refused messages: 0"]
