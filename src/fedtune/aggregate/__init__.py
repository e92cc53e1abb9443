"""Server-side aggregation: rules (pure math), server optimizers, and the aggregator composing them."""

from fedtune.aggregate.aggregator import Aggregator, make_aggregator
from fedtune.aggregate.rules import coordinate_median, trimmed_mean, weighted_mean
from fedtune.aggregate.server_opt import ServerAdaptive, ServerMomentum, ServerSGD

__all__ = [
    "Aggregator",
    "ServerAdaptive",
    "ServerMomentum",
    "ServerSGD",
    "coordinate_median",
    "make_aggregator",
    "trimmed_mean",
    "weighted_mean",
]
