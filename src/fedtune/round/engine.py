"""The round engine: one federated round, the same in simulation and in a deployment.

Per round: draw the cohort (`sampling`), open the round on the transport, hand every member the task (the
global adapter, the DP clip, the random-k seed), take their submissions (`phase`: into a sum or a stack in the
clear through `collect`, or SecAgg+ through the transport, `secure`), then on the sum: noise (central DP; a
distributed sum already holds it) -> rule (the weighted mean over the public or summed denominator, or a rule
over every update) -> server optimizer, or a product-space merge (`server.lora_aggregation = "svd"`) over
every update. Under SCAFFOLD (`round.scaffold`) the task carries the server control c, an update is
[delta, s * Delta c_i], and the sum's second half moves c. After every `eval.every` rounds, and after the
round a run ends with, the new global adapter is evaluated by the evaluation clients (a second exchange,
`Purpose.EVALUATE`); with `[personalize]` the last evaluation also asks each client for its personal
adapter's loss (`round.personal`), and under split personalization the updates are A's deltas only, placed
into the adapter (B left as it is) before the rule.

Policy, one rule for both modes:
- weights: `WeightRule` (training examples capped at `data.max_examples_per_client`; 1 under DP);
- FedNova (`normalize_steps`): the updates are deltas per local step and the round's aggregate is scaled
  by the aggregated clients' weighted mean of their steps;
- a round with fewer than `federation.min_clients` updates, or a SecAgg+ abort, fails: the adapter is
  left as it was and nothing is accounted. Under client-level DP a round always releases its noised sum
  (a missing or refused update counts as a zero delta over the public denominator), so whether it fails
  cannot depend on who answered; only a SecAgg+ abort, which releases nothing, fails it;
- under a privacy budget the run stops before a round that could exceed it (distributed noise: assuming
  only the threshold's worth of noise shares), and the round it ends with is evaluated;
- stragglers are the selected clients whose update did not arrive in time: silent, dropped, or late.
`run` yields a typed `RoundResult` per round; the caller writes it (run directory, state file).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.aggregate import Aggregator, StackedUpdates, SummedUpdates
from fedtune.errors import ConfigError
from fedtune.evaluate import combine, perplexity
from fedtune.privacy.dpfedavg import ClientLevelDp, PrivacyMetrics
from fedtune.round.collect import train_loss
from fedtune.round.evaluation import evaluate_on
from fedtune.round.messages import ClientReport, TrainTask
from fedtune.round.personal import expand
from fedtune.round.phase import Collected, collect_plain, collect_secure, failure
from fedtune.round.plan import DpRandomness, Member, RunPlan
from fedtune.round.ranks import contributors, step_scale
from fedtune.round.results import EvalSummary, PersonalEval, RoundResult, SvdMetrics
from fedtune.round.sampling import draw_cohort
from fedtune.round.scaffold import server_step, split
from fedtune.round.transport import Purpose, Transport
from fedtune.seeding import derive_seed


@dataclass(frozen=True, eq=False)
class EngineState:
    """What a checkpoint holds after a round: enough to continue bit-identically."""

    round_num: int
    global_flat: torch.Tensor
    optimizer_state: dict[str, torch.Tensor]
    dp_state: dict[str, Any] | None
    dpsgd_epsilon_max: float | None
    control: torch.Tensor | None = None  # SCAFFOLD's server control c (float32); None: off


class RoundEngine:
    def __init__(
        self,
        plan: RunPlan,
        transport: Transport,
        aggregator: Aggregator,
        global_flat: torch.Tensor,
        *,
        dp: ClientLevelDp | None = None,
        dp_randomness: DpRandomness | None = None,
        dpsgd_epsilon_max: float | None = None,
        control: torch.Tensor | None = None,
        notify: Callable[[str], None] = lambda _msg: None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`control`: SCAFFOLD's server control to resume from (a checkpoint's); zeros by default."""
        if (plan.secure is not None or plan.privacy is not None) and not aggregator.linear:
            raise ConfigError(
                "this aggregation rule needs every client's update, but secure aggregation reveals only "
                "their sum and client-level DP bounds one client's effect on the sum; use FedAvg's weighted "
                "mean (server.rule = 'fedavg'), or turn both off"
            )
        if (plan.privacy is None) != (dp is None):
            raise ValueError("a DP plan needs its ClientLevelDp state, and only a DP plan has one")
        if dp is not None and dp_randomness is None:
            raise ValueError("client-level DP draws its cohorts from a DpRandomness (the OS outside tests)")
        if plan.control is not None and (not aggregator.linear or plan.privacy is not None or plan.dpsgd):
            raise ConfigError(
                "server.control_variates = 'scaffold' moves the server control by the weighted mean of the "
                "clients' control deltas, outside any privacy accounting: use server.rule = 'fedavg' with "
                "privacy.mode = 'off' and dpsgd.enabled = false, or server.control_variates = 'none'"
            )
        if control is not None and (
            plan.control is None or control.shape != (plan.adapter_numel,) or control.dtype != torch.float32
        ):
            raise ValueError("a server control needs SCAFFOLD on and one float32 value per adapter value")
        self.plan = plan
        self.transport = transport
        self.aggregator = aggregator
        self.global_flat = global_flat
        self.dp = dp
        self.dp_randomness = dp_randomness
        self.dpsgd_epsilon_max = (
            dpsgd_epsilon_max if dpsgd_epsilon_max is not None else (0.0 if plan.dpsgd else None)
        )
        self.control = control
        if plan.control is not None and control is None:
            self.control = torch.zeros(plan.adapter_numel, dtype=torch.float32)
        self.notify = notify
        self.clock = clock
        self.notes: list[str] = []
        self._rank_masks: dict[int, torch.Tensor] = {}

    # ---- the run -----------------------------------------------------------------------------------

    def run(self, first_round: int = 0) -> Iterator[RoundResult]:
        """Round 0 (the evaluation before training) when `first_round` is 0, then the rounds up to the
        last, stopping before one that could exceed the privacy budget."""
        if first_round == 0:
            yield self.initial()
            first_round = 1
        if first_round > self.plan.rounds or not self._fits(first_round):
            return
        for round_num in range(first_round, self.plan.rounds + 1):
            result = self.run_round(round_num)
            yield result
            if self._last(round_num):
                return

    def state(self, round_num: int) -> EngineState:
        return EngineState(
            round_num,
            self.global_flat,
            self.aggregator.server_opt.state_dict(),
            None if self.dp is None else self.dp.state_dict(),
            self.dpsgd_epsilon_max,
            self.control,
        )

    def initial(self) -> RoundResult:
        """Round 0: the initial adapter evaluated, before any training."""
        start = self.clock()
        summary, refused = self.evaluate(0)
        return RoundResult(
            round_num=0,
            selected=0,
            clients=0,
            client_ids=None if self.dp is not None else (),
            stragglers=(),
            failures={},
            train_loss=None,
            eval=summary,
            bytes_up=0,
            bytes_down=0,
            refused_messages=refused,
            seconds=self.clock() - start,
            train_seconds=0.0,
            privacy=None if self.dp is None else self.dp.so_far(),
            dpsgd_epsilon_max=self.dpsgd_epsilon_max,
            svd=self._svd(None),
        )

    def _fits(self, next_round: int) -> bool:
        """False (with a note) when `next_round` could spend more than privacy.target_epsilon."""
        if self.dp is None:
            return True
        fewest = None
        if self.dp.plan.distributed is not None and self.plan.secure is not None:
            fewest = self.plan.secure.threshold_for(self.plan.cohort)
        if self.dp.round_fits_budget(fewest):
            return True
        note = (
            f"stopped before round {next_round}: it could spend more than privacy.target_epsilon = "
            f"{self.dp.plan.target_epsilon}"
        )
        if note not in self.notes:
            self.notes.append(note)
            self.notify(note)
        return False

    def _last(self, round_num: int) -> bool:
        return round_num >= self.plan.rounds or not self._fits(round_num + 1)

    # ---- one round ---------------------------------------------------------------------------------

    def run_round(self, round_num: int) -> RoundResult:
        start = self.clock()
        plan = self.plan
        candidates = plan.trainers
        indices = draw_cohort(
            round_num,
            len(plan.population) if candidates is None else len(candidates),
            plan.selected,
            seed=plan.seed,
            privacy=plan.privacy,
            dp_rng=None if self.dp_randomness is None else self.dp_randomness.cohort,
        )
        if candidates is not None:
            indices = [candidates[i] for i in indices]
        members = [Member(slot, index, plan.population[index]) for slot, index in enumerate(indices)]
        task = TrainTask(
            round_num,
            self.global_flat,
            clip_l2_norm=None if self.dp is None else self.dp.client_clip_l2_norm,
            shared_seed=self._shared_seed(round_num),
            control=self.control,
        )
        self.transport.open_round(round_num, Purpose.TRAIN, members)
        collected: Collected | None = None
        try:
            if plan.secure is not None:
                collected = collect_secure(self.transport, plan, task, members, dp=self.dp)
            else:
                collected = collect_plain(
                    self.transport,
                    plan,
                    task,
                    members,
                    linear=self.aggregator.linear,
                    dp=self.dp,
                    rank_masks=self._rank_masks,
                )
        finally:
            abort = None if collected is None or collected.secagg is None else collected.secagg.abort
            refused = dict(self.transport.close_round(abort))
        assert collected is not None  # an exception in the phase has left already
        failed = failure(collected, dp_on=self.dp is not None, min_clients=plan.min_clients)
        privacy, residual = None, None
        if failed is None:
            updates = collected.updates
            assert updates is not None
            if self.dp is not None:
                updates, privacy = self._privatize(updates, collected)
            if self.plan.control is not None:
                updates = self._move_control(updates)
            if self.plan.split:  # A's deltas only: B stays as it is, with the clients
                assert self.plan.layout is not None  # a split plan has its layout (update_numel)
                updates = expand(updates, self.plan.layout.a_mask)
            merged = self.aggregator.aggregate(
                self.global_flat,
                updates,
                step_scale(self.plan, collected.accepted),
                contributors(self.plan, collected.accepted, members),
            )
            self.global_flat, residual = merged.global_flat, merged.relative_residual
        elif self.dp is not None:
            privacy = self.dp.so_far()
        self._note_dpsgd(collected.reports.values())
        evaluation = None
        if round_num % plan.eval_every == 0 or self._last(round_num):
            personalize = plan.personalize and self._last(round_num)
            evaluation, refused_in_eval = self.evaluate(round_num, personalize=personalize)
            for kind, count in refused_in_eval.items():
                refused[kind] = refused.get(kind, 0) + count
        in_sum = collected.updates.count if collected.updates is not None else 0
        return RoundResult(
            round_num=round_num,
            selected=len(members),
            clients=in_sum,
            client_ids=None
            if self.dp is not None
            else tuple(r.client_id for _, r in sorted(collected.accepted.items())),
            stragglers=tuple(
                m.client_id
                for m in members
                if m.slot not in collected.accepted and m.slot not in collected.failures
            ),
            failures={cid: why for _, (cid, why) in sorted(collected.failures.items())},
            train_loss=train_loss(collected.accepted),
            eval=evaluation,
            bytes_up=collected.bytes_up,
            bytes_down=collected.bytes_down,
            refused_messages=refused,
            seconds=self.clock() - start,
            train_seconds=collected.seconds,
            failed=failed,
            secagg=collected.secagg,
            privacy=privacy,
            dpsgd_epsilon_max=self.dpsgd_epsilon_max,
            svd=self._svd(residual),
        )

    def _svd(self, residual: float | None) -> SvdMetrics | None:
        return None if self.aggregator.merge is None else SvdMetrics(residual)

    def _shared_seed(self, round_num: int) -> bytes | None:
        """The round's random-k seed, sent to every client (from the run seed, so a run repeats)."""
        if self.plan.compression.method != "randomk":
            return None
        return derive_seed(self.plan.seed, "compress-randomk", round_num).to_bytes(32, "big")

    def _move_control(self, updates: SummedUpdates | StackedUpdates) -> SummedUpdates:
        """SCAFFOLD: c <- c + (|S| / N) mean(Delta c_i) from the sum's second half; the first half is the
        round's delta sum, returned for the rule and the server optimizer."""
        spec, control = self.plan.control, self.control
        assert spec is not None and control is not None and isinstance(updates, SummedUpdates)
        deltas, controls = split(updates.total)
        if updates.denominator <= 0:
            raise ValueError("the sum's denominator must be positive")
        self.control = server_step(
            control,
            controls / updates.denominator,
            count=updates.count,
            population=len(self.plan.population),
            scale=spec.scale,
        )
        return SummedUpdates(deltas, updates.denominator, updates.count)

    def _privatize(
        self, updates: SummedUpdates | StackedUpdates, collected: Collected
    ) -> tuple[SummedUpdates, PrivacyMetrics]:
        """Central noise on the sum (a distributed sum holds its shares already), then the accountant."""
        dp = self.dp
        assert dp is not None and isinstance(updates, SummedUpdates)
        distributed = dp.plan.distributed is not None
        total = updates.total if distributed else dp.add_noise(updates.total)
        reports = collected.accepted.values()
        metrics = dp.end_round(
            unclipped=sum(r.fits_clip for r in reports),
            reported=len(collected.accepted),
            contributors=int(updates.count) if distributed else None,
        )
        return SummedUpdates(total, dp.plan.denominator, updates.count), metrics

    def _note_dpsgd(self, reports: Iterable[ClientReport]) -> None:
        if self.dpsgd_epsilon_max is None:
            return
        spent = [r.dpsgd_epsilon for r in reports if r.dpsgd_epsilon is not None]
        self.dpsgd_epsilon_max = max([self.dpsgd_epsilon_max, *spent])

    # ---- evaluation --------------------------------------------------------------------------------

    def evaluate(
        self, round_num: int, *, personalize: bool = False
    ) -> tuple[EvalSummary | None, dict[str, int]]:
        """The global adapter on the evaluation clients' held-out data (None if none answered), and the
        messages the transport refused meanwhile; with `personalize`, each client's personal adapter too."""
        start = self.clock()
        evaluated = evaluate_on(
            self.transport, self.plan, round_num, lambda _m: self.global_flat, personalize=personalize
        )
        if not evaluated.any_tokens:
            note = f"round {round_num}: no evaluation client answered; the round is not evaluated"
            self.notes.append(note)
            self.notify(note)
            return None, evaluated.refused
        result = combine(evaluated.nll)
        personal = None
        if personalize:
            own = combine(evaluated.personal_nll)
            personal = PersonalEval(own.loss, perplexity(own.loss), own.per_client_loss)
        summary = EvalSummary(
            loss=result.loss,
            perplexity=perplexity(result.loss),
            per_client_loss=result.per_client_loss,
            clients=len(result.per_client_loss),
            seconds=self.clock() - start,
            bytes_down=evaluated.bytes_down,
            personal=personal,
        )
        return summary, evaluated.refused
