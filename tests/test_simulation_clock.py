"""The simulated clock in a real simulation (tiny model): the deadline cuts exactly the clients the clock
says are late, the adapter is the one a round without them gives, per-client local steps reach the
trainer, a late client in a secure round is a SecAgg+ dropout, and without a deadline nothing changes."""

from __future__ import annotations

import json

import pytest

from fedtune.config import load_config
from fedtune.round.profiles import resolve_profiles
from fedtune.simulation import simulate
from tests.test_simulation import SMALL
from tests.test_simulation_secagg import SECURE

pytestmark = pytest.mark.slow

BATCH = 4  # train.batch_size's default
STEPS = 6  # SMALL's federation.local_steps
DEADLINE_S = 5.0
# half the clients upload over 1 Mbit/s (the ~1.6 MB adapter takes ~13 s: late), the others take 2 steps
SLOW = "{fraction=0.5, upload_mbps=1.0, seconds_per_example=0.01}"
OFFLINE = "{fraction=0.5, availability=0.0}"  # the same share (drawn from the seed), never online
REST = "{seconds_per_example=0.1, local_steps=2}"
TIMING_KEYS = ("seconds", "train_seconds", "eval_seconds", "simulated_seconds", "simulated_seconds_total")


def run(tmp_path, name: str, *settings: str, base=SMALL):
    config = load_config(None, [*base, "federation.rounds=2", f"run.dir={tmp_path / name}", *settings])
    return config, simulate(config)


def comparable(result, strip: tuple[str, ...] = ()) -> list[dict]:
    rows = [r.to_row() for r in result.rounds]
    return [{k: v for k, v in r.items() if k not in (*TIMING_KEYS, "client_seconds", *strip)} for r in rows]


def test_a_round_deadline_drops_exactly_the_late_clients_and_the_rest_is_as_without_them(tmp_path):
    config, result = run(
        tmp_path,
        "deadline",
        "federation.clients_per_round=4",
        f"federation.round_deadline_s={DEADLINE_S}",
        f"clients.profiles=[{SLOW}, {REST}]",
    )
    population = sorted(json.loads((result.run_dir / "clients.json").read_text()))
    profiles = resolve_profiles(config.clients, population, config.run.seed)
    up_bytes = result.adapter_numel * 4
    total = 0.0
    for r in result.rounds[1:]:
        assert r.timing is not None and set(r.timing.clients) == {*r.client_ids, *r.stragglers}
        finish = {}
        for cid, t in r.timing.clients.items():
            p = profiles[cid]
            steps = p.local_steps or STEPS
            assert t.compute_s == pytest.approx(p.seconds_per_example * BATCH * steps)  # its own steps
            assert t.upload_s == pytest.approx(0.0 if p.upload_mbps == float("inf") else up_bytes * 8 / 1e6)
            finish[cid] = t.compute_s + t.upload_s
        late = tuple(sorted(cid for cid, f in finish.items() if f > DEADLINE_S))
        assert late and r.stragglers == late and r.client_ids == tuple(sorted(set(finish) - set(late)))
        assert r.timing.seconds == DEADLINE_S
        total += r.timing.seconds
        assert r.timing.total_seconds == pytest.approx(total)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["simulated_seconds_total"] for r in rows] == [0.0, DEADLINE_S, 2 * DEADLINE_S]
    assert (result.run_dir / "time.png").stat().st_size > 0
    assert "time-to-accuracy" in (result.run_dir / "report.md").read_text()

    # the same share never online: the same rounds, bit for bit (the late ones trained for nothing);
    # only the adapter sent to the late clients differs: they were sent it, the offline ones were not
    _, offline = run(
        tmp_path,
        "offline",
        "federation.clients_per_round=4",
        f"federation.round_deadline_s={DEADLINE_S}",
        f"clients.profiles=[{OFFLINE}, {REST}]",
    )
    assert [r.bytes_down for r in result.rounds[1:]] == [4 * up_bytes] * 2
    assert [r.bytes_down for r in offline.rounds[1:]] == [r.clients * up_bytes for r in offline.rounds[1:]]
    strip = ("bytes_down",)
    assert comparable(offline, strip) == comparable(result, strip)
    assert offline.after.per_client_loss == result.after.per_client_loss


def test_without_a_deadline_the_clock_changes_nothing(tmp_path):
    _, plain = run(tmp_path, "plain")
    _, timed = run(tmp_path, "timed", "clients.profiles=[{upload_mbps=2.0, seconds_per_example=0.01}]")
    assert all(r.timing is None for r in plain.rounds) and "simulated_seconds" not in plain.rounds[1].to_row()
    assert comparable(timed) == comparable(plain)
    assert timed.after.loss == plain.after.loss
    assert all(r.timing is not None and r.timing.seconds > 6.0 for r in timed.rounds[1:])  # ~6.4 s up


def test_a_late_client_in_a_secure_round_is_a_dropout_at_the_masked_input(tmp_path):
    four = [
        "federation.num_clients=4",
        "federation.clients_per_round=4",
        "secure_aggregation.neighbours='all'",
    ]
    late_one = "{fraction=0.25, upload_mbps=1.0}"  # one of four; its masked input (~1.6 MB) takes ~13 s
    config, secure = run(
        tmp_path,
        "secure",
        *four,
        f"federation.round_deadline_s={DEADLINE_S}",
        f"clients.profiles=[{late_one}]",
        base=SECURE,
    )
    population = sorted(json.loads((secure.run_dir / "clients.json").read_text()))
    profiles = resolve_profiles(config.clients, population, config.run.seed)
    late = tuple(c for c in population if profiles[c].profile == 0)
    assert len(late) == 1
    for r in secure.rounds[1:]:
        assert r.stragglers == late and r.failed is None and r.secagg.abort is None
        assert r.secagg.survivors == (4, 4, 3, 3)  # it shared keys, then its masked input never came
        assert r.clients == 3
    # as if it had not been online: the same sum of the other three
    _, away = run(
        tmp_path,
        "away",
        *four,
        f"federation.round_deadline_s={DEADLINE_S}",
        "clients.profiles=[{fraction=0.25, availability=0.0}]",
        base=SECURE,
    )
    assert all(r.secagg.survivors == (3, 3, 3, 3) for r in away.rounds[1:])
    for a, s in zip(away.rounds, secure.rounds, strict=True):
        assert a.eval.loss == pytest.approx(s.eval.loss, rel=1e-6)
