"""The rules of `federation.topology = "decentralized"` (`fedtune.decentral`): what a federation without a
server cannot run, and the communication graphs that can exist on its clients. Called from `checks.check`.
"""

from __future__ import annotations

from typing import Literal

from fedtune.config.schema import Config
from fedtune.errors import ConfigError
from fedtune.round.settings import FederationConfig

Mode = Literal["simulate", "deploy"]


def check_topology(config: Config, mode: Mode | None, population: int | None) -> list[str]:
    """A decentralized federation (`fedtune.decentral`) has no server: no secure sum, no central noise, no
    server optimizer or control, each client mixing whole adapters with its neighbours'. What needs a
    server, or an update pipeline it does not run, is refused; so is BALANCE with a server."""
    fed, server = config.federation, config.server
    if fed.topology == "star":
        if server.rule == "balance":
            raise ConfigError(
                "server.rule = 'balance' is BALANCE's neighbour filter, run by each client of a "
                "decentralized federation against its own adapter; set federation.topology = "
                "'decentralized', or use a server rule (e.g. 'fedavg', 'multi_krum', 'fltrust')"
            )
        graph = (fed.graph, fed.graph_degree, fed.graph_edge_probability)
        defaults = FederationConfig()
        if graph != (defaults.graph, defaults.graph_degree, defaults.graph_edge_probability):
            raise ConfigError(
                f"federation.graph = {fed.graph!r} (graph_degree {fed.graph_degree}, graph_edge_probability "
                f"{fed.graph_edge_probability:g}) shapes a decentralized federation, and "
                "federation.topology = 'star' has none: set federation.topology = 'decentralized', or "
                "remove the graph settings"
            )
        return []
    what = "federation.topology = 'decentralized'"
    if mode == "deploy":
        raise ConfigError(
            f"{what} is simulated only: fedtune server coordinates a star; use fedtune run, or "
            "federation.topology = 'star'"
        )
    if server.rule not in ("fedavg", "balance"):
        raise ConfigError(
            f"{what} mixes each client's adapter with its neighbours' by server.rule = 'fedavg' (gossip "
            f"averaging) or 'balance' (BALANCE); server.rule = {server.rule!r} is a server's rule: use one "
            "of those"
        )
    needs_server = {
        "secure_aggregation.enabled = true": config.secure_aggregation.enabled,
        f"privacy.mode = {config.privacy.mode!r}": config.privacy.mode != "off",
        f"server.control_variates = {server.control_variates!r}": server.control_variates != "none",
        f"server.step_normalization = {server.step_normalization!r}": server.step_normalization != "none",
        f"server.optimizer = {server.optimizer!r}": server.optimizer != "sgd",
        f"server.lr = {server.lr:g}": server.lr != 1.0,
    }
    for setting, given in needs_server.items():
        if given:
            raise ConfigError(
                f"{setting} with {what}: it acts on a server's sum or global step, and no server "
                "aggregates here (each client mixes whole adapters with its neighbours'); remove it, or "
                "set federation.topology = 'star'"
            )
    no_clock = "the decentralized run has no simulated clock: every client trains its local work every round"
    not_run = {
        "dpsgd.enabled = true": (
            config.dpsgd.enabled,
            "the decentralized run does not account DP-SGD's per-record epsilon, so its guarantee would go "
            "unreported",
        ),
        f"compression.method = {config.compression.method!r}": (
            config.compression.method != "none",
            "each client sends its whole adapter to its neighbours in float32; compression (and its error "
            "feedback) encodes a star's deltas",
        ),
        f"personalize.method = {config.personalize.method!r}": (
            config.personalize.method != "none",
            "every client's adapter is its own already; personal adapters sit next to a star's global one",
        ),
        f"server.lora_aggregation = {server.lora_aggregation!r}": (
            server.lora_aggregation != "separate",
            "clients mix LoRA's A and B values as they are (what 'separate' does); the other methods are "
            "a server's merges",
        ),
        f"clients.profiles ({len(config.clients.profiles)} given)": (config.clients.active, no_clock),
        f"federation.round_deadline_s = {fed.round_deadline_s}": (fed.round_deadline_s is not None, no_clock),
        f"federation.fraction_per_round = {fed.fraction_per_round}": (
            fed.fraction_per_round is not None,
            "every client trains every round: there is no cohort to size",
        ),
        f"federation.min_clients = {fed.min_clients}": (
            fed.min_clients > 1,
            "no server counts the updates, and a client none of whose neighbours trained keeps its adapter",
        ),
    }
    for setting, (given, reason) in not_run.items():
        if given:
            raise ConfigError(
                f"{setting} with {what}: {reason}; remove it, or set federation.topology = 'star'"
            )
    size = population if population is not None else fed.num_clients
    if isinstance(size, int):
        _check_graph(config, size)
    return [
        f"{what}: every client trains every round and mixes with its neighbours by server.rule = "
        f"{server.rule!r} (federation.clients_per_round = {fed.clients_per_round} is not used)"
    ]


def _check_graph(config: Config, clients: int) -> None:
    """A connected graph of this kind must exist on `clients` clients."""
    fed = config.federation
    if clients < 2:
        raise ConfigError(
            f"{clients} client in a decentralized federation has no neighbour to mix with; raise "
            "federation.num_clients"
        )
    if fed.graph != "k_regular":
        return
    k = fed.graph_degree
    if k >= clients:
        raise ConfigError(
            f"federation.graph_degree = {k} with {clients} clients: a client has at most {clients - 1} "
            f"neighbours; lower federation.graph_degree below {clients}"
        )
    if (k * clients) % 2:
        raise ConfigError(
            f"federation.graph_degree = {k} with {clients} clients: a k-regular graph has k * n / 2 "
            f"edges, so k * n must be even; use an even degree ({k + 1}{f' or {k - 1}' if k > 2 else ''}) "
            "or an even number of clients"
        )
    if k == 1 and clients > 2:
        raise ConfigError(
            f"federation.graph_degree = 1 with {clients} clients pairs them off into separate federations; "
            "use 2 or more (or federation.graph = 'ring')"
        )
