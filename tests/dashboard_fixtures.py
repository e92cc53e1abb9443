"""Rows for the dashboard's tests, made by the engine's own result types so their keys cannot drift."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.privacy.dpfedavg import PrivacyMetrics
from fedtune.round.results import AttackMetrics, EvalSummary, RoundResult, SecAggMetrics


def round_result(
    round_num: int,
    *,
    ids: tuple[str, ...] | None = ("a", "b"),
    stragglers: tuple[str, ...] = (),
    failures: dict[str, str] | None = None,
    epsilon: float | None = None,
    secagg: tuple[int, ...] | None = None,
    attack: bool = False,
    failed: str | None = None,
) -> RoundResult:
    """A star round as the engine returns it; its row is `to_row()`'s, so the keys cannot drift."""
    aggregated = len(ids) if ids is not None else 3 - len(stragglers) - len(failures or {})
    ev = EvalSummary(3.0 - 0.1 * round_num, 20.0, {"a": 3.0}, 2, 0.2, 1000)
    return RoundResult(
        round_num=round_num,
        selected=0 if round_num == 0 else 3,
        clients=0 if round_num == 0 else aggregated,
        client_ids=() if round_num == 0 else ids,
        stragglers=stragglers,
        failures=failures or {},
        train_loss=None if round_num == 0 else 3.1 - 0.1 * round_num,
        eval=ev,
        bytes_up=0 if round_num == 0 else 2**20,
        bytes_down=0 if round_num == 0 else 3 * 2**20,
        refused_messages={"stale_round": 1} if round_num == 2 else {},
        seconds=1.5,
        train_seconds=1.0,
        failed=failed,
        privacy=None if epsilon is None else PrivacyMetrics(epsilon, 2 * epsilon, 1.0, 0.5, None),
        secagg=None
        if secagg is None
        else SecAggMetrics(secagg, 2, 2, 0, 0, 100.0, 200.0, 0.1, "too few" if secagg[-1] < 2 else None),
        attack=AttackMetrics(1, 2.5, 0.25) if attack else None,
    )


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
