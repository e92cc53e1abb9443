"""The rules that span config sections, in one function that knows the mode.

`check(config, mode)` refuses (ConfigError, one line naming the fields, the values and the fix) any
combination that cannot work, and returns notes on what composes with a caveat. It runs at load with
`mode=None` (what no mode can run) and again when a run starts, with its mode and the real sizes:
`"simulate"` (`fedtune run`) with the population the data gave, `"deploy"` (`fedtune server`) with the
allow-list. A setting a mode cannot honour is refused there with the reason, never ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedtune.compress import CompressionSpec, check_composable
from fedtune.config.privacy import (
    Mode,
    check_dpsgd,
    check_privacy,
    check_secure_aggregation,
    cohort_bound,
    with_canaries,
)
from fedtune.config.schema import Config
from fedtune.config.threats import check_threats
from fedtune.config.topology import check_topology
from fedtune.config.watching import check_audit, check_tracking
from fedtune.data.settings import BUILTIN_SOURCES
from fedtune.errors import ConfigError
from fedtune.pki import CLIENT_ID_PATTERN
from fedtune.round.settings import SimulationConfig


def check(
    config: Config, mode: Mode | None = None, *, population: int | None = None, max_weight: int | None = None
) -> list[str]:
    """Refuse what cannot run (in `mode`, with `population` clients whose largest weight is `max_weight`);
    return notes for the run's log."""
    if mode == "deploy":
        population = len(config.deploy.clients)
        _check_deployment(config)
    _check_federation(config, population)
    notes = check_threats(config, mode, cohort_bound(config, population))
    _check_client_ranks(config)
    _check_data(config)
    _check_lora_aggregation(config)
    if config.dpsgd.enabled:
        check_dpsgd(config)
    if config.privacy.mode != "off":
        check_privacy(config, population)
    if config.secure_aggregation.enabled:
        check_secure_aggregation(config, mode, population, max_weight)
    if config.server.control_variates != "none":
        _check_control_variates(config)
    if config.personalize.method != "none":
        _check_personalize(config)
    _check_simulation(config, mode)
    if config.audit.enabled:
        check_audit(config, mode)
    _check_deploy_lists(config)
    if mode is not None:
        check_tracking(config)
    notes += check_topology(config, mode, population)
    return notes + check_composable(
        CompressionSpec.from_config(config.compression),
        secure_aggregation=config.secure_aggregation.enabled,
        server_rule=config.server.rule,
        privacy_mode=config.privacy.mode,
    )


def is_folder(source: str) -> bool:
    return source not in BUILTIN_SOURCES and Path(source).is_dir()


def _check_federation(config: Config, population: int | None) -> None:
    fed = config.federation
    star = fed.topology == "star"  # a decentralized federation trains every client: no cohort
    size = with_canaries(config, fed.num_clients)
    if star and isinstance(size, int) and fed.clients_per_round > size:
        canaries = f" + audit.canaries = {config.audit.canaries}" if size != fed.num_clients else ""
        raise ConfigError(
            f"federation.clients_per_round = {fed.clients_per_round} exceeds "
            f"federation.num_clients = {fed.num_clients}{canaries}; lower it or raise num_clients"
        )
    cohort = cohort_bound(config, population)
    if cohort is not None and fed.min_clients > cohort:
        raise ConfigError(
            f"federation.min_clients = {fed.min_clients} exceeds the {cohort} clients a round samples; "
            "a round never aggregates more: lower federation.min_clients"
        )
    if config.data.partition != "natural" and fed.num_clients == "all":
        raise ConfigError(
            f"data.partition = {config.data.partition!r} needs a number of clients; "
            "set federation.num_clients to an integer"
        )


def _check_lora_aggregation(config: Config) -> None:
    """Product-space aggregation (svd, flexlora) re-factors every client's own B_i A_i: it needs each
    update; hetlora's per-component denominators need each client's weight and rank, not noised counts."""
    server = config.server
    method = server.lora_aggregation
    if method == "hetlora":
        if config.privacy.mode != "off":
            raise ConfigError(
                "server.lora_aggregation = 'hetlora' divides each LoRA component by the summed weight of "
                "the clients that train it, which under client-level DP is not the public denominator the "
                "noise is calibrated to; use 'separate' or 'ffa' with privacy.mode, or privacy.mode = 'off'"
            )
        if server.rule != "fedavg":
            raise ConfigError(
                f"server.lora_aggregation = 'hetlora' is a weighted mean per LoRA component, in place of "
                f"server.rule = {server.rule!r}; set server.rule = 'fedavg'"
            )
        return
    if method not in ("svd", "flexlora"):
        return
    what = f"server.lora_aggregation = {method!r} forms the mean of every client's own product B_i A_i"
    if config.secure_aggregation.enabled:
        raise ConfigError(
            f"{what}, but secure aggregation reveals only the sum of the updates; use "
            "server.lora_aggregation = 'ffa' (exact on a sum), 'hetlora' or 'separate', or turn secure "
            "aggregation off"
        )
    if config.privacy.mode != "off":
        raise ConfigError(
            f"{what}, which is not a sum: client-level DP's noise on the sum bounds nothing here; use "
            "server.lora_aggregation = 'ffa' or 'separate' with privacy.mode, or privacy.mode = 'off'"
        )
    if server.rule != "fedavg":
        raise ConfigError(
            f"{what} in place of server.rule = {server.rule!r}; set server.rule = 'fedavg' (the weighted "
            "mean of the products)"
        )
    if server.step_normalization != "none":
        raise ConfigError(
            f"{what}, from each client's whole delta; server.step_normalization = "
            f"{server.step_normalization!r} sends deltas per local step: set it to 'none' with {method}"
        )
    if server.optimizer != "sgd":
        raise ConfigError(
            f"{what} and re-factors it, so the factors change basis every round and a server "
            f"optimizer's state (server.optimizer = {server.optimizer!r}) has no meaning across rounds; "
            "use server.optimizer = 'sgd' (server.lr steps toward the mean product)"
        )


def _check_personalize(config: Config) -> None:
    """Personal adapters train with plain AdamW next to the run's trainer; split shares A only, so the
    update is A's delta and B is never aggregated."""
    method = config.personalize.method
    if config.dpsgd.enabled:
        raise ConfigError(
            f"personalize.method = {method!r} trains personal adapters with plain AdamW: a personal "
            "adapter would carry no per-record guarantee, and a published one (a run's personal/ folder) "
            "would undo dpsgd.enabled = true; set personalize.method = 'none' with DP-SGD, or "
            "dpsgd.enabled = false"
        )
    if method != "split":
        return
    server = config.server
    if server.lora_aggregation != "separate":
        raise ConfigError(
            f"personalize.method = 'split' aggregates LoRA's A and keeps each client's B, which "
            f"server.lora_aggregation = {server.lora_aggregation!r} does not do; set it to 'separate'"
        )
    if server.control_variates != "none":
        raise ConfigError(
            "personalize.method = 'split' sends A's delta only, and server.control_variates = 'scaffold' "
            "corrects the whole adapter; set one of them to 'none'"
        )


def _check_client_ranks(config: Config) -> None:
    """A profile's LoRA rank: at most lora.rank (the global adapter's), and below it only where the
    aggregation can merge different ranks."""
    method = config.server.lora_aggregation
    for i, profile in enumerate(config.clients.profiles):
        if profile.rank is None or profile.rank == config.lora.rank:
            continue
        if profile.rank > config.lora.rank:
            raise ConfigError(
                f"clients.profiles[{i}].rank = {profile.rank} exceeds lora.rank = {config.lora.rank}: the "
                "global adapter is at lora.rank and each client trains its first components; raise "
                "lora.rank to the largest client rank"
            )
        if method not in ("flexlora", "hetlora"):
            raise ConfigError(
                f"clients.profiles[{i}].rank = {profile.rank} differs from lora.rank = {config.lora.rank}: "
                f"server.lora_aggregation = {method!r} cannot merge different ranks; set it to 'flexlora' "
                "or 'hetlora', or leave the profile's rank out"
            )


def _check_data(config: Config) -> None:
    data = config.data
    builtin = data.source in BUILTIN_SOURCES
    for key in ("client_field", "label_field"):
        if builtin and getattr(data, key) is not None:
            raise ConfigError(
                f"data.{key} = {getattr(data, key)!r} applies to files only; the built-in "
                f"source {data.source!r} has its own clients (dirichlet over it skews by them)"
            )
    if (
        data.partition == "natural"
        and not builtin
        and not is_folder(data.source)
        and data.client_field is None
    ):
        raise ConfigError(
            f"data.partition = 'natural' needs data.client_field for file {data.source!r}; "
            "name the client column, use partition = 'iid' or 'dirichlet', or give a folder with one "
            "file per client"
        )


def _check_control_variates(config: Config) -> None:
    """SCAFFOLD moves the server control by a weighted mean of the clients' control deltas."""
    cv, rule = config.server.control_variates, config.server.rule
    if rule != "fedavg":
        raise ConfigError(
            f"server.control_variates = {cv!r} with server.rule = {rule!r}: the server control moves by the "
            "weighted mean of all the clients' control deltas, and a robust rule does not move the adapter "
            "by that mean of their deltas; use server.rule = 'fedavg' or server.control_variates = 'none'"
        )
    if config.privacy.mode != "off":
        raise ConfigError(
            f"server.control_variates = {cv!r} with privacy.mode = {config.privacy.mode!r}: the control "
            "deltas are a second release of each client's data that the DP accountant does not cover; set "
            "privacy.mode = 'off' or server.control_variates = 'none'"
        )
    if config.dpsgd.enabled:
        raise ConfigError(
            f"server.control_variates = {cv!r} with dpsgd.enabled: DP-SGD's accountant does not cover the "
            "control variates (and its trainer does not add their correction); set dpsgd.enabled = false "
            "or server.control_variates = 'none'"
        )
    method = config.server.lora_aggregation
    if method in ("svd", "flexlora", "hetlora"):
        raise ConfigError(
            f"server.control_variates = {cv!r} with server.lora_aggregation = {method!r}: the controls are "
            "averaged in the adapter's coordinates, which this aggregation re-factors or re-weights by "
            "rank; use server.lora_aggregation = 'separate' or 'ffa' with SCAFFOLD"
        )
    if config.server.step_normalization != "none":
        raise ConfigError(
            f"server.control_variates = {cv!r} with server.step_normalization = "
            f"{config.server.step_normalization!r}: both correct for unequal local work, in ways not "
            "designed to compose; choose one"
        )


def _check_deployment(config: Config) -> None:
    """What `fedtune server` cannot run, with the reason."""
    dep, fed = config.deploy, config.federation
    if not dep.clients:
        raise ConfigError(
            "deploy.clients is empty: list the client ids allowed to join, e.g. "
            "deploy.clients = ['hospital-a', 'hospital-b'] (one certificate each: fedtune certs issue ID)"
        )
    if fed.fraction_per_round is not None:
        raise ConfigError(
            "federation.fraction_per_round is for simulation; a deployment samples "
            "federation.clients_per_round clients from deploy.clients: set that instead"
        )
    if fed.clients_per_round > len(dep.clients):
        raise ConfigError(
            f"federation.clients_per_round = {fed.clients_per_round} exceeds the {len(dep.clients)} "
            "clients in deploy.clients; lower it or allow more clients"
        )
    if isinstance(dep.min_connected, int) and dep.min_connected > len(dep.clients):
        raise ConfigError(
            f"deploy.min_connected = {dep.min_connected} exceeds the {len(dep.clients)} clients in "
            "deploy.clients; lower it or use 'all'"
        )
    if fed.round_deadline_s is not None:
        raise ConfigError(
            f"federation.round_deadline_s = {fed.round_deadline_s:g} cuts stragglers on the simulated "
            "clock; a deployment runs on the real one: remove it and set deploy.round_timeout_s"
        )
    if config.clients.profiles:
        raise ConfigError(
            f"clients.profiles ({len(config.clients.profiles)} given) simulate heterogeneous clients; in a "
            "deployment each site's own hardware, links and hours are its profile: remove "
            "[[clients.profiles]]"
        )
    if config.secure_aggregation.dropout_rate > 0:
        raise ConfigError(
            f"secure_aggregation.dropout_rate = {config.secure_aggregation.dropout_rate} simulates "
            "dropouts; in a deployment clients drop by themselves: set it to 0 for fedtune server"
        )
    if config.secure_aggregation.enabled and dep.over_selection > 0:
        raise ConfigError(
            f"deploy.over_selection = {dep.over_selection} with secure aggregation: extra clients would "
            "share keys and then be dropped; SecAgg+ survives dropouts by itself: set it to 0"
        )
    if config.privacy.mode != "off" and dep.over_selection > 0:
        raise ConfigError(
            f"deploy.over_selection = {dep.over_selection} keeps the fastest clients, which is not the "
            "uniform sample the privacy accountant assumes; set deploy.over_selection = 0 under privacy"
        )
    if config.privacy.mode != "off" and config.privacy.sampling == "poisson":
        raise ConfigError(
            "privacy.sampling = 'poisson' is simulated only; "
            "use privacy.sampling = 'fixed' for fedtune server"
        )


def _check_simulation(config: Config, mode: Mode | None) -> None:
    """`[simulation]` settings that its backend, or the mode, cannot honour."""
    sim = config.simulation
    if mode == "deploy" and sim != SimulationConfig():
        raise ConfigError(
            f"[simulation] (backend = {sim.backend!r}, workers = {sim.workers!r}) is how a simulation trains "
            "its clients; in a deployment each site trains its own: remove [simulation] for fedtune server"
        )
    if sim.backend == "serial":
        for field in ("workers", "threads_per_worker"):
            if getattr(sim, field) != "auto":
                raise ConfigError(
                    f"simulation.{field} = {getattr(sim, field)} with simulation.backend = 'serial', which "
                    "trains one client at a time with run.threads threads: set simulation.backend = "
                    "'processes' or 'ray', or remove it"
                )
    if sim.ray_address is not None and sim.backend != "ray":
        raise ConfigError(
            f"simulation.ray_address = {sim.ray_address!r} with simulation.backend = {sim.backend!r}: set "
            "simulation.backend = 'ray', or remove the address"
        )


def _check_deploy_lists(config: Config) -> None:
    """A malformed allow-list is refused at load, whatever the mode."""
    dep = config.deploy
    bad = [c for c in dep.clients if not re.fullmatch(CLIENT_ID_PATTERN, c)]
    if bad:
        raise ConfigError(
            f"deploy.clients: {bad[0]!r} is not a client id; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (the certificate subject from `fedtune certs issue`)"
        )
    seen = {c for c in dep.clients if dep.clients.count(c) > 1}
    if seen:
        raise ConfigError(f"deploy.clients lists {sorted(seen)[0]!r} twice; list each client once")
