"""Typed results of a decentralized run; rows are made at the edge (`to_row`, written by `RunDir`).

There is no global adapter: an evaluation is each evaluating client's OWN adapter on its own held-out data,
summarized by the unweighted mean and the spread (population standard deviation) of those losses across
clients, with every client's loss in the row. `accepted` and `rejected` count, over all the clients of a
round, the neighbour adapters the rule averaged in or turned away (gossip averaging accepts them all);
`acceptance_rate` is accepted / (accepted + rejected), None when nothing was received. Under BALANCE a
trained round's row also gives its bound on ||w_i - w_j|| / ||w_i|| (`balance_bound`) and the median of
that ratio over every client and neighbour (`distance_ratio_median`): how far the neighbours are, to set
`server.balance_gamma` by (None otherwise). A row also carries
`eval_loss` (= `eval_loss_mean`) and `eval_perplexity` (its exp: the geometric mean of the clients'
perplexities), so the run report reads it as it reads a star run's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.evaluate import perplexity
from fedtune.round.results import AttackMetrics


@dataclass(frozen=True)
class PeerEval:
    """Each evaluating client's own adapter on its own held-out data."""

    per_client_loss: Mapping[str, float]  # mean next-token loss per client
    loss_mean: float  # over the clients, unweighted
    loss_std: float  # over the clients (population standard deviation)
    seconds: float

    @property
    def clients(self) -> int:
        return len(self.per_client_loss)


@dataclass(frozen=True)
class DecentralRound:
    round_num: int  # 0: the evaluation before training
    trained: int  # clients whose local training gave an adapter (the others sat the round out)
    failures: Mapping[str, str]  # client -> why it has no trained adapter this round
    train_loss: float | None  # example-weighted over the trained clients
    accepted: int  # neighbour adapters averaged in, over every client
    rejected: int  # neighbour adapters turned away (BALANCE's distance bound)
    eval: PeerEval | None  # on evaluated rounds
    bytes_up: int  # adapter bytes the clients sent their neighbours, all together
    refused_messages: Mapping[str, int]
    seconds: float
    train_seconds: float
    distance_ratio_median: float | None = None  # BALANCE: median ||w_i - w_j|| / ||w_i|| over all pairs
    balance_bound: float | None = None  # BALANCE: the round's bound on it, gamma * exp(-kappa * t / T)
    attack: AttackMetrics | None = None  # a simulated attack's, with [attack]

    @property
    def acceptance_rate(self) -> float | None:
        received = self.accepted + self.rejected
        return None if received == 0 else self.accepted / received

    def to_row(self) -> dict[str, Any]:
        """The metrics.jsonl row."""
        ev = self.eval
        return {
            "round": self.round_num,
            "clients": self.trained,
            "failed_clients": list(self.failures),
            "failures": dict(self.failures),
            "train_loss": self.train_loss,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "acceptance_rate": self.acceptance_rate,
            "eval_loss_mean": None if ev is None else ev.loss_mean,
            "eval_loss_std": None if ev is None else ev.loss_std,
            "eval_loss_per_client": None if ev is None else dict(ev.per_client_loss),
            "eval_loss": None if ev is None else ev.loss_mean,
            "eval_perplexity": None if ev is None else perplexity(ev.loss_mean),
            "eval_clients": None if ev is None else ev.clients,
            "bytes_up": self.bytes_up,
            "refused_messages": dict(self.refused_messages),
            "seconds": self.seconds,
            "train_seconds": self.train_seconds,
            "eval_seconds": None if ev is None else ev.seconds,
            "balance_bound": self.balance_bound,
            "distance_ratio_median": self.distance_ratio_median,
            **(
                {}
                if self.attack is None
                else {
                    "honest_eval_loss": self.attack.honest_eval_loss,
                    "backdoor_success": self.attack.backdoor_success,
                    "backdoor_preference": self.attack.backdoor_preference,
                }
            ),
        }


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def round_line(result: DecentralRound, rounds: int) -> str:
    """One line per finished round, for `fedtune run`."""
    ev, rate = result.eval, result.acceptance_rate
    line = (
        f"round {result.round_num:>3}/{rounds}  trained {result.trained}"
        + (f" ({len(result.failures)} failed)" if result.failures else "")
        + f"  accepted {result.accepted}/{result.accepted + result.rejected}"
        + f" ({_fmt(None if rate is None else 100 * rate, '.0f')}%)"
        + (
            f"  distance {_fmt(result.distance_ratio_median, '.2f')} x own (bound {result.balance_bound:.2f})"
            if result.balance_bound is not None
            else ""
        )
        + f"  train loss {_fmt(result.train_loss, '.4f')}"
        + f"  eval loss {_fmt(None if ev is None else ev.loss_mean, '.4f')}"
        + (f" ± {ev.loss_std:.4f}" if ev is not None else "")
        + f"  {result.seconds:.1f}s"
    )
    return line


@dataclass
class DecentralResult:
    run_dir: Path
    rounds: list[DecentralRound]
    before: PeerEval
    after: PeerEval
    seconds: float
    num_clients: int
    adapter_numel: int
    adapter_client: str  # whose adapter was saved as the run's adapter/ (the lowest final eval loss)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What `fedtune run` prints at the end."""
        b, a = self.before, self.after
        change = (a.loss_mean / b.loss_mean - 1) * 100 if b.loss_mean else math.nan
        received = sum(r.accepted + r.rejected for r in self.rounds)
        accepted = sum(r.accepted for r in self.rounds)
        rate = f"{100 * accepted / received:.0f}%" if received else "–"
        return [
            f"done in {self.seconds:.0f}s: mean eval loss over {a.clients} clients' own adapters "
            f"{b.loss_mean:.4f} -> {a.loss_mean:.4f} ({change:+.1f}%), spread {a.loss_std:.4f}; "
            f"{rate} of neighbour adapters accepted",
            f"adapter ({self.adapter_client}'s, the lowest final eval loss): {self.run_dir / 'adapter'}   "
            f"report: {self.run_dir / 'report.md'}",
        ]
