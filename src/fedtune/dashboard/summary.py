"""What the dashboard shows, typed: a run's rows, settings and (deployed) state folded into one summary.

`RoundPoint.from_row` is the one place a `metrics.jsonl` row is read by key: the star rows of
`RoundResult.to_row` and the decentralized rows of `DecentralRound.to_row` alike. A row that is not an
object with an integer `round` is skipped and counted; a value of the wrong type reads as missing, so a
damaged file shows less, never an error. `summarize` is pure: it takes what `watch.RunWatcher` read and
returns the `RunSummary` that `/api/run` sends as JSON. `panels` names the panels whose data exists (a
privacy panel only with `epsilon` in the rows, secure aggregation only with `secagg_survivors`, ...), so
the page draws what the run has and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

RunState = Literal["waiting", "running", "finished"]


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _names(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _reasons(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v if isinstance(v, str) else str(v) for k, v in value.items()}


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if _int(v) is not None}


@dataclass(frozen=True)
class RoundPoint:
    """One finished round, as a `metrics.jsonl` row gives it (None: not in this run's rows)."""

    round_num: int  # 0: the evaluation before training
    failed: str | None  # why the round left the adapter as it was
    selected: int | None  # a star run's cohort (with over-selection)
    aggregated: int | None  # updates in the aggregate; decentralized: clients that trained
    client_ids: tuple[str, ...] | None  # whose updates; None under client-level DP
    stragglers: tuple[str, ...]
    failures: Mapping[str, str]  # client -> why its update was refused
    refused: Mapping[str, int]  # refused messages by kind
    train_loss: float | None
    eval_loss: float | None
    eval_loss_std: float | None  # decentralized: the spread of the clients' own adapters' losses
    personal_eval_loss: float | None  # with [personalize], on the last evaluation
    honest_eval_loss: float | None  # with [attack]
    backdoor_success: float | None
    bytes_up: int | None
    bytes_down: int | None  # training and evaluation downloads together
    seconds: float | None
    train_seconds: float | None
    eval_seconds: float | None
    epsilon: float | None  # client-level DP spent so far
    dpsgd_epsilon: float | None  # the largest DP-SGD epsilon a client reported
    secagg_survivors: tuple[int, ...] | None  # clients left at advertise, share, masked, unmask
    secagg_abort: str | None
    acceptance_rate: float | None  # decentralized: neighbour adapters averaged in

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RoundPoint | None:
        round_num = _int(row.get("round"))
        if round_num is None:
            return None
        ids = row.get("client_ids")
        down, eval_down = _int(row.get("bytes_down")), _int(row.get("eval_bytes_down"))
        survivors = row.get("secagg_survivors")
        return cls(
            round_num=round_num,
            failed=_str(row.get("round_failed")),
            selected=_int(row.get("selected")),
            aggregated=_int(row.get("clients")),
            client_ids=_names(ids) if isinstance(ids, list) else None,
            stragglers=_names(row.get("stragglers")),
            failures=_reasons(row.get("failures")),
            refused=_counts(row.get("refused_messages")),
            train_loss=_float(row.get("train_loss")),
            eval_loss=_float(row.get("eval_loss")),
            eval_loss_std=_float(row.get("eval_loss_std")),
            personal_eval_loss=_float(row.get("personal_eval_loss")),
            honest_eval_loss=_float(row.get("honest_eval_loss")),
            backdoor_success=_float(row.get("backdoor_success")),
            bytes_up=_int(row.get("bytes_up")),
            bytes_down=None if down is None else down + (eval_down or 0),
            seconds=_float(row.get("seconds")),
            train_seconds=_float(row.get("train_seconds")),
            eval_seconds=_float(row.get("eval_seconds")),
            epsilon=_float(row.get("epsilon")),
            dpsgd_epsilon=_float(row.get("dpsgd_epsilon_max")),
            secagg_survivors=(
                tuple(n for n in survivors if _int(n) is not None) if isinstance(survivors, list) else None
            ),
            secagg_abort=_str(row.get("secagg_abort")),
            acceptance_rate=_float(row.get("acceptance_rate")),
        )


@dataclass(frozen=True)
class RunSettings:
    """The few settings of the run the page needs (from its config.toml)."""

    name: str
    rounds: int | None  # federation.rounds
    topology: str  # "star" or "decentralized"
    privacy_mode: str  # "off", "central", "distributed"
    target_epsilon: float | None  # the privacy budget over the whole run
    delta: float | None
    attack: str  # attack.kind, "none" without one
    personalize: str  # personalize.method, "none" without one
    secure_aggregation: bool


@dataclass(frozen=True)
class ParticipantNow:
    client_id: str
    status: str  # selected, sent, submitted, or a terminal status the server gave
    detail: str | None


@dataclass(frozen=True)
class OpenRound:
    """A deployment's round in flight (from state.db): who was selected and where each stands."""

    round_num: int
    started_at: float  # Unix time
    submitted: int
    waiting: tuple[str, ...]
    participants: tuple[ParticipantNow, ...]


@dataclass(frozen=True)
class RefusalLine:
    """A refused message or connection, with its reason (a deployment's, from state.db)."""

    at: float  # Unix time
    round_num: int | None
    client_id: str | None
    kind: str
    detail: str


@dataclass(frozen=True)
class DeploymentState:
    """What state.db adds to the rows: the round in flight, refusals with their reasons."""

    open_round: OpenRound | None
    refused_totals: Mapping[str, int]  # over the whole run, by kind
    latest_refusals: tuple[RefusalLine, ...]  # oldest first


@dataclass(frozen=True)
class ClientActivity:
    """One client over the run's rows. `aggregated` is None when the rows do not publish who took part
    (client-level DP): then only straggling and refusals are known."""

    client_id: str
    aggregated: int | None
    straggled: int
    failed: int
    last_round: int  # the latest round the client appears in
    last_failure: str | None


@dataclass(frozen=True)
class Progress:
    state: RunState
    rounds_done: int  # the latest round in the rows (failed rounds count: the run went past them)
    rounds_total: int | None
    failed_rounds: int
    seconds_per_round: float | None  # mean over the trained rounds (round 0 is an evaluation only)
    eta_s: float | None  # rounds left x seconds per round, while running
    last_update_age_s: float | None  # since metrics.jsonl last changed


@dataclass(frozen=True)
class RunSummary:
    """/api/run: everything the page shows."""

    run_dir: str
    kind: Literal["simulation", "deployment"]
    settings: RunSettings | None  # None: no config.toml yet
    progress: Progress
    rounds: tuple[RoundPoint, ...]
    clients: tuple[ClientActivity, ...]
    refused_totals: Mapping[str, int]
    deployment: DeploymentState | None
    panels: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())
    generated_at: float = 0.0


def summarize(
    *,
    run_dir: str,
    rows: Sequence[Mapping[str, Any]],
    settings: RunSettings | None,
    deployment: DeploymentState | None,
    finished: bool,
    last_update_age_s: float | None,
    now: float,
    notes: Sequence[str] = (),
) -> RunSummary:
    """The page's summary of a run directory's contents."""
    points, skipped = _points(rows)
    notes = list(notes)
    if skipped:
        notes.append(f"{skipped} line(s) of metrics.jsonl are not rounds and were skipped")
    if points and points[-1].client_ids is None and settings is not None and settings.topology == "star":
        notes.append("who took part is not published under client-level DP: clients show straggling only")
    progress = _progress(points, settings, deployment, finished, last_update_age_s)
    refused = dict(deployment.refused_totals) if deployment is not None else _refused_totals(points)
    return RunSummary(
        run_dir=run_dir,
        kind="simulation" if deployment is None else "deployment",
        settings=settings,
        progress=progress,
        rounds=tuple(points),
        clients=_clients(points),
        refused_totals=refused,
        deployment=deployment,
        panels=_panels(points, settings, deployment, refused),
        notes=tuple(notes),
        generated_at=now,
    )


def _points(rows: Sequence[Mapping[str, Any]]) -> tuple[list[RoundPoint], int]:
    by_round: dict[int, RoundPoint] = {}
    skipped = 0
    for row in rows:
        point = RoundPoint.from_row(row) if isinstance(row, Mapping) else None
        if point is None:
            skipped += 1
        else:
            by_round[point.round_num] = point  # a re-run round (a resumed deployment) keeps its last row
    return [by_round[r] for r in sorted(by_round)], skipped


def _progress(
    points: list[RoundPoint],
    settings: RunSettings | None,
    deployment: DeploymentState | None,
    finished: bool,
    last_update_age_s: float | None,
) -> Progress:
    total = None if settings is None else settings.rounds
    done = points[-1].round_num if points else 0
    in_flight = deployment is not None and deployment.open_round is not None
    state: RunState
    if finished and not in_flight:
        state = "finished"
    elif points or in_flight:
        state = "running"
    else:
        state = "waiting"
    trained = [p.seconds for p in points if p.round_num > 0 and p.seconds is not None]
    per_round = sum(trained) / len(trained) if trained else None
    eta = None
    if state == "running" and per_round is not None and total is not None:
        eta = max(total - done, 0) * per_round
    return Progress(
        state=state,
        rounds_done=done,
        rounds_total=total,
        failed_rounds=sum(p.failed is not None for p in points),
        seconds_per_round=per_round,
        eta_s=eta,
        last_update_age_s=last_update_age_s,
    )


def _refused_totals(points: list[RoundPoint]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for p in points:
        for kind, n in p.refused.items():
            totals[kind] = totals.get(kind, 0) + n
    return dict(sorted(totals.items()))


def _clients(points: list[RoundPoint]) -> tuple[ClientActivity, ...]:
    published = bool(points) and all(p.client_ids is not None for p in points if p.round_num > 0)
    seen: dict[str, dict[str, Any]] = {}

    def entry(cid: str, round_num: int) -> dict[str, Any]:
        e = seen.setdefault(cid, {"aggregated": 0, "straggled": 0, "failed": 0, "last": None})
        e["round"] = round_num
        return e

    for p in points:
        if p.round_num == 0:
            continue  # the evaluation before training: nobody was selected
        for cid in p.client_ids or ():
            entry(cid, p.round_num)["aggregated"] += 1
        for cid in p.stragglers:
            entry(cid, p.round_num)["straggled"] += 1
        for cid, reason in p.failures.items():
            e = entry(cid, p.round_num)
            e["failed"] += 1
            e["last"] = reason
    return tuple(
        ClientActivity(
            client_id=cid,
            aggregated=e["aggregated"] if published else None,
            straggled=e["straggled"],
            failed=e["failed"],
            last_round=e["round"],
            last_failure=e["last"],
        )
        for cid, e in sorted(seen.items())
    )


def _panels(
    points: list[RoundPoint],
    settings: RunSettings | None,
    deployment: DeploymentState | None,
    refused: Mapping[str, int],
) -> tuple[str, ...]:
    def any_of(attr: str) -> bool:
        return any(getattr(p, attr) is not None for p in points)

    panels = ["progress", "rounds"]
    if points:
        panels += ["loss", "time", "participation", "bytes"]
    budget = settings is not None and settings.target_epsilon is not None
    if any_of("epsilon") or any_of("dpsgd_epsilon") or (budget and points):
        panels.append("privacy")
    if any_of("secagg_survivors"):
        panels.append("secagg")
    if any_of("honest_eval_loss") or any_of("backdoor_success"):
        panels.append("attack")
    if any_of("personal_eval_loss"):
        panels.append("personal")
    if any_of("acceptance_rate"):
        panels.append("decentral")
    if points:
        panels.append("clients")
    if refused or any(p.failures for p in points) or any(p.failed for p in points):
        panels.append("refusals")
    if deployment is not None and deployment.open_round is not None:
        panels.append("open_round")
    return tuple(panels)
