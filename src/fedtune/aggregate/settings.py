"""The `[server]` config section: the aggregation rule and the server optimizer, composed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedtune.section import Section


class ServerConfig(Section):
    """Aggregation rule and server optimizer, composed: the rule makes one delta, the optimizer applies it."""

    # fedavg: the weighted mean; the rest need every update (no secure aggregation, DP or SCAFFOLD):
    # median, trimmed_mean (coordinate-wise), norm_bound, krum, multi_krum, geometric_median, centered_clip,
    # fltrust (robust to poisoned updates; see aggregate/robust.py); balance: a decentralized topology's
    # BALANCE (decentral/balance.py)
    rule: Literal[
        "fedavg",
        "median",
        "trimmed_mean",
        "norm_bound",
        "krum",
        "multi_krum",
        "geometric_median",
        "centered_clip",
        "fltrust",
        "balance",
    ] = "fedavg"
    # separate: average LoRA's A and B factors each; ffa (FFA-LoRA, Sun et al. 2024): A stays at its shared
    # seeded init and only B trains and travels, so the mean of B_i A is exactly (mean B_i) A; svd: the
    # weighted mean of the clients' B_i A_i per module, re-factored to the rank by truncated SVD; clients of
    # different ranks ([clients] profiles' rank, at most lora.rank): flexlora (svd, then each client takes
    # its rank's truncation) or hetlora (zero-padding to lora.rank, each component averaged over the
    # clients that train it)
    lora_aggregation: Literal["separate", "ffa", "svd", "flexlora", "hetlora"] = "separate"
    # fednova (Wang et al. 2020): each client sends its delta per local step, and the round's mean is
    # scaled back by the mean number of steps, so a client that took more steps does not pull harder
    step_normalization: Literal["none", "fednova"] = "none"
    # scaffold (Karimireddy et al. 2020, option II): a server control c and one c_i per client correct
    # every local gradient by c - c_i; updates carry the control delta too (twice the adapter's values)
    control_variates: Literal["none", "scaffold"] = "none"
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5)  # per side, for trimmed_mean
    norm_bound: float | None = Field(None, gt=0.0)  # norm_bound's L2 clip; None: x the median norm
    norm_bound_median_multiple: float = Field(1.0, gt=0.0)  # norm_bound None: clip to this x the median norm
    byzantine: int = Field(1, ge=0)  # krum, multi_krum: f, the attackers assumed among a round's updates
    multi_krum_keep: int | None = Field(None, ge=1)  # updates multi_krum averages; None: updates - byzantine
    geometric_median_iterations: int = Field(8, ge=1)  # Weiszfeld steps at most, from the coordinate median
    centered_clip_tau: float | None = Field(None, gt=0.0)  # clip radius; None: median distance to the start
    centered_clip_iterations: int = Field(3, ge=1)  # clipping steps, from the coordinate median
    root_examples: int = Field(64, ge=1)  # fltrust: examples in the server's trusted root data set
    # fltrust: where the root data comes from: "sample" (simulation: drawn from clients outside the
    # population) or a path to a .jsonl, .csv or .parquet file
    root_data: str = "sample"
    optimizer: Literal["sgd", "momentum", "adam", "yogi"] = "sgd"
    lr: float = Field(1.0, gt=0.0)  # server learning rate; sgd with lr=1 is plain FedAvg
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    eps: float = Field(1e-3, gt=0.0)  # adaptivity tau of FedAdam/FedYogi (Reddi et al. 2021)
    # balance (Fang et al., CCS 2024; federation.topology = "decentralized" only): client i accepts a
    # neighbour's adapter w_j when ||w_i - w_j|| <= gamma * exp(-kappa * t / T) * ||w_i|| in round t of T,
    # then keeps alpha * w_i + (1 - alpha) * mean(accepted). gamma 1.0, not the paper's 0.3: on the default
    # job (SmolLM2-135M, r = 8) honest neighbours sit at 0.16-0.26 x ||w_i|| (`distance_ratio_median`), so
    # 0.3 * exp(-t / T) turned them all away from round 3 on; 1.0 keeps them and still turned away every
    # scale and gaussian attacker (bench/RESULTS.md)
    balance_gamma: float = Field(1.0, gt=0.0)
    balance_kappa: float = Field(1.0, ge=0.0)
    balance_alpha: float = Field(0.5, ge=0.0, le=1.0)
