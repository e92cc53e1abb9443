"""Server-side aggregation: rules (pure math), server optimizers, and the aggregator composing them."""

from fedtune.aggregate.aggregator import (
    AggregationRule,
    Aggregator,
    RunningSum,
    StackedUpdates,
    SummedUpdates,
    UpdateStack,
    make_aggregator,
)
from fedtune.aggregate.rules import coordinate_median, trimmed_mean, weighted_mean
from fedtune.aggregate.server_opt import (
    ServerAdaptive,
    ServerMomentum,
    ServerOptimizer,
    ServerSGD,
    make_server_optimizer,
)
from fedtune.aggregate.settings import ServerConfig

__all__ = [
    "AggregationRule",
    "Aggregator",
    "RunningSum",
    "ServerAdaptive",
    "ServerConfig",
    "ServerMomentum",
    "ServerOptimizer",
    "ServerSGD",
    "StackedUpdates",
    "SummedUpdates",
    "UpdateStack",
    "coordinate_median",
    "make_aggregator",
    "make_server_optimizer",
    "trimmed_mean",
    "weighted_mean",
]
