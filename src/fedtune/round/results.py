"""Typed results of a round. They become JSON rows only at the edges (`RunDir`, `Store`), via `to_row`.

One row shape in both modes; which keys appear depends on the run's settings only: `client_ids` is left
out under client-level DP (who took part is part of the guarantee), the `secagg_*` keys appear with secure
aggregation, the privacy keys with `privacy.mode`, `dpsgd_epsilon_max` with `dpsgd.enabled`,
`svd_residual` with `server.lora_aggregation = "svd"` or `"flexlora"`, the simulated clock's
(`simulated_seconds`, `simulated_seconds_total`, `client_seconds`) in a simulation with `[clients]` profiles
or `federation.round_deadline_s` (`client_seconds` left out under client-level DP), a simulated attack's
(`attackers_aggregated`, `honest_eval_loss`, `backdoor_success`, `backdoor_preference`) with `[attack]`,
and on the last evaluation of a run with `[personalize]` the personal adapters' `personal_eval_loss` and
`personal_eval_perplexity`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedtune.privacy.dpfedavg import PrivacyMetrics


@dataclass(frozen=True)
class PersonalEval:
    """Each evaluating client's personal adapter on its held-out data (the same tokens as the global's)."""

    loss: float  # token-weighted over the clients
    perplexity: float
    per_client_loss: Mapping[str, float]


@dataclass(frozen=True)
class EvalSummary:
    """The global adapter after a round, on the evaluating clients' held-out data (token-weighted)."""

    loss: float
    perplexity: float
    per_client_loss: Mapping[str, float]
    clients: int  # clients whose held-out loss is in `loss`
    seconds: float
    bytes_down: int  # the adapter sent to the evaluating clients
    personal: PersonalEval | None = None  # the run's last evaluation, with [personalize]


@dataclass(frozen=True)
class SecAggMetrics:
    survivors: tuple[int, ...]  # clients left after each stage reached: advertise, share, masked, unmask
    neighbours: int
    threshold: int
    excluded: int | None  # shared keys, but too few neighbours survived to hold their secrets
    clipped: int | None  # values the included clients clipped to secure_aggregation.clip_range
    bytes_up_per_client: float
    bytes_down_per_client: float
    server_seconds: float
    abort: str | None  # why the round aborted (fewer than the threshold at a stage), or None


@dataclass(frozen=True)
class SvdMetrics:
    """`server.lora_aggregation = "svd"`: what re-factoring the mean product to the rank dropped."""

    relative_residual: float | None  # ||M - M_r||_F / ||M||_F over every module; None: nothing merged


@dataclass(frozen=True)
class AttackMetrics:
    """A simulated attack (`[attack]`): how much of the round was the attackers', and what it did."""

    attackers_aggregated: int | None  # attackers whose update is in the aggregate (None under DP)
    honest_eval_loss: float | None  # token-weighted over the honest evaluation clients; None: no eval
    backdoor_success: float | None  # backdoor: the share of trigger probes greedily continued by the target
    # (on evaluated rounds)
    backdoor_preference: float | None = None  # ... on which the target's loss is below the true text's


@dataclass(frozen=True)
class ClientTiming:
    """A selected client on the simulated clock (`round.clock`): its seconds from the round's start."""

    online: bool  # False: it never heard of the round (availability), and all its times are 0
    delivered: bool  # its training reply reached the server in time
    download_s: float
    compute_s: float  # 0 when it never trained (offline, or out of a secure round before training)
    upload_s: float
    late: bool = False  # it finished after federation.round_deadline_s: its reply was not delivered

    @property
    def finish_s(self) -> float:
        return self.download_s + self.compute_s + self.upload_s


@dataclass(frozen=True)
class RoundTiming:
    """A round on the simulated clock: the slowest delivered client, or the deadline when one was cut."""

    seconds: float
    total_seconds: float  # the run's simulated time after this round
    clients: Mapping[str, ClientTiming]  # every selected client

    def row(self, *, per_client: bool) -> dict[str, Any]:
        row: dict[str, Any] = {
            "simulated_seconds": self.seconds,
            "simulated_seconds_total": self.total_seconds,
        }
        if per_client:
            row["client_seconds"] = {
                cid: {
                    "online": t.online,
                    "delivered": t.delivered,
                    "download_s": t.download_s,
                    "compute_s": t.compute_s,
                    "upload_s": t.upload_s,
                    "finish_s": t.finish_s,
                    "late": t.late,
                }
                for cid, t in self.clients.items()
            }
        return row


@dataclass(frozen=True)
class RoundResult:
    round_num: int  # 0: the evaluation before training
    selected: int
    clients: int  # updates in the aggregate
    client_ids: tuple[str, ...] | None  # whose updates; None (not published) under client-level DP
    stragglers: tuple[str, ...]  # selected, but no update arrived in time (dropped, late, silent)
    failures: Mapping[str, str]  # client -> why its update was refused (by itself or the server)
    train_loss: float | None  # example-weighted over the aggregated updates
    eval: EvalSummary | None  # on evaluated rounds
    bytes_up: int
    bytes_down: int
    refused_messages: Mapping[str, int]  # messages the transport refused during the round, by kind
    seconds: float
    train_seconds: float
    failed: str | None = None  # why the round failed (the adapter was left as it was)
    secagg: SecAggMetrics | None = None
    privacy: PrivacyMetrics | None = None
    dpsgd_epsilon_max: float | None = None
    svd: SvdMetrics | None = None
    timing: RoundTiming | None = None  # the simulated clock's, when the simulation runs one
    attack: AttackMetrics | None = None  # a simulated attack's, with [attack]

    def to_row(self) -> dict[str, Any]:
        """The metrics.jsonl row."""
        ev = self.eval
        row: dict[str, Any] = {
            "round": self.round_num,
            "clients": self.clients,
            "selected": self.selected,
            "stragglers": list(self.stragglers),
            "failed_clients": list(self.failures),
            "failures": dict(self.failures),
            "train_loss": self.train_loss,
            "eval_loss": None if ev is None else ev.loss,
            "eval_perplexity": None if ev is None else ev.perplexity,
            "eval_clients": None if ev is None else ev.clients,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "eval_bytes_down": 0 if ev is None else ev.bytes_down,
            "refused_messages": dict(self.refused_messages),
            "round_failed": self.failed,
            "seconds": self.seconds,
            "train_seconds": self.train_seconds,
            "eval_seconds": None if ev is None else ev.seconds,
        }
        if ev is not None and ev.personal is not None:
            row |= {
                "personal_eval_loss": ev.personal.loss,
                "personal_eval_perplexity": ev.personal.perplexity,
            }
        if self.client_ids is not None:
            row["client_ids"] = list(self.client_ids)
        if self.secagg is not None:
            s = self.secagg
            row |= {
                "secagg_survivors": list(s.survivors),
                "secagg_neighbours": s.neighbours,
                "secagg_threshold": s.threshold,
                "secagg_excluded": s.excluded,
                "secagg_clipped": s.clipped,
                "secagg_bytes_up_per_client": s.bytes_up_per_client,
                "secagg_bytes_down_per_client": s.bytes_down_per_client,
                "secagg_server_seconds": s.server_seconds,
                "secagg_abort": s.abort,
            }
        if self.privacy is not None:
            p = self.privacy
            row |= {
                "epsilon": p.epsilon,
                "epsilon_known_cohort": p.epsilon_known_cohort,
                "dp_clip_l2_norm": p.clip_l2_norm,
                "dp_noise_std": p.noise_std,
                "dp_unclipped_fraction": p.unclipped_fraction,
            }
        if self.dpsgd_epsilon_max is not None:
            row["dpsgd_epsilon_max"] = self.dpsgd_epsilon_max
        if self.svd is not None:
            row["svd_residual"] = self.svd.relative_residual
        if self.timing is not None:
            row |= self.timing.row(per_client=self.client_ids is not None)
        if self.attack is not None:
            a = self.attack
            row |= {
                "attackers_aggregated": a.attackers_aggregated,
                "honest_eval_loss": a.honest_eval_loss,
                "backdoor_success": a.backdoor_success,
                "backdoor_preference": a.backdoor_preference,
            }
        return row
