"""Decentralized federations: no server; every client keeps its own adapter and mixes it with its
neighbours' after each round of local training.

Files follow a run. `graph` (who talks to whom: ring, random k-regular, Erdos-Renyi, always connected) ->
`mixing` (the `NeighbourRule` a client applies to its own and its neighbours' adapters; gossip averaging)
and `balance` (BALANCE, Fang et al. CCS 2024: neighbours farther than a decaying bound are turned away) ->
`engine` (the rounds over the simulation's transport: train every client from its own adapter, mix,
evaluate each client's own adapter) -> `results` (typed rounds; rows at the edge) -> `run` (`fedtune run`
with `federation.topology = "decentralized"`: setup, loop, save). `graph`, `mixing` and `balance` are pure.
"""

from fedtune.decentral.balance import Balance, balance, balance_bound
from fedtune.decentral.graph import Graph, communication_graph, erdos_renyi, random_regular, ring
from fedtune.decentral.mixing import Mixed, NeighbourRule, gossip_average
from fedtune.decentral.results import DecentralResult, DecentralRound, PeerEval
from fedtune.decentral.run import run_decentralized

__all__ = [
    "Balance",
    "DecentralResult",
    "DecentralRound",
    "Graph",
    "Mixed",
    "NeighbourRule",
    "PeerEval",
    "balance",
    "balance_bound",
    "communication_graph",
    "erdos_renyi",
    "gossip_average",
    "random_regular",
    "ring",
    "run_decentralized",
]
