"""fedtune: federated LoRA fine-tuning of language models.

The package follows the data flow of one round:
config -> data partition -> client local training -> update encoding -> transport -> server aggregation
-> global adapter -> evaluation and report. One round engine (`fedtune.round`) runs it, in simulation
(`simulate`) and in a deployment (`serve`); only the transport differs.

The public API, imported lazily so `import fedtune` stays light:

    import fedtune
    config = fedtune.load_config(None, ["model.name=tiny", "federation.rounds=3"])
    result = fedtune.simulate(config)

`fedtune.compare.runner.compare(config, seeds=3)` runs it against local-only and centralized training.

Extension points, as Protocols: `AggregationRule` (pass `rule=` to `simulate` or `serve`),
`ServerOptimizer` (`server_opt=`), `Trainer` (a client's local training) and `Transport` (how the
engine's messages reach participants).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "Config": "fedtune.config",
    "load_config": "fedtune.config",
    "simulate": "fedtune.simulation",
    "serve": "fedtune.deploy.server",
    "run_client": "fedtune.deploy.site",
    "AggregationRule": "fedtune.aggregate",
    "Aggregator": "fedtune.aggregate",
    "ServerOptimizer": "fedtune.aggregate",
    "Trainer": "fedtune.train.local",
    "Transport": "fedtune.round.transport",
    "RoundResult": "fedtune.round.results",
}

__all__ = [
    "AggregationRule",
    "Aggregator",
    "Config",
    "RoundResult",
    "ServerOptimizer",
    "Trainer",
    "Transport",
    "load_config",
    "run_client",
    "serve",
    "simulate",
]

if TYPE_CHECKING:
    from fedtune.aggregate import AggregationRule, Aggregator, ServerOptimizer
    from fedtune.config import Config, load_config
    from fedtune.deploy.server import serve
    from fedtune.deploy.site import run_client
    from fedtune.round.results import RoundResult
    from fedtune.round.transport import Transport
    from fedtune.simulation import simulate
    from fedtune.train.local import Trainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedtune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
