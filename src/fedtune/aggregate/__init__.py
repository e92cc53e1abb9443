"""Server-side aggregation: rules (pure math; robust ones in `robust`), server optimizers, and the
aggregator composing them."""

from fedtune.aggregate.aggregator import (
    AggregationRule,
    Aggregator,
    ReferencedRule,
    RunningSum,
    StackedUpdates,
    SummedUpdates,
    UpdateStack,
    configured_rule,
    make_aggregator,
)
from fedtune.aggregate.robust import (
    centered_clip,
    fltrust,
    geometric_median,
    krum,
    krum_scores,
    multi_krum,
    norm_bound,
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
    "ReferencedRule",
    "RunningSum",
    "ServerAdaptive",
    "ServerConfig",
    "ServerMomentum",
    "ServerOptimizer",
    "ServerSGD",
    "StackedUpdates",
    "SummedUpdates",
    "UpdateStack",
    "centered_clip",
    "configured_rule",
    "coordinate_median",
    "fltrust",
    "geometric_median",
    "krum",
    "krum_scores",
    "make_aggregator",
    "make_server_optimizer",
    "multi_krum",
    "norm_bound",
    "trimmed_mean",
    "weighted_mean",
]
