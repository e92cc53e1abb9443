"""The run's configuration: `schema` (every section, assembled), `load` (TOML and overrides, validated
once), `checks` (the rules across sections, by mode) and `plan` (what a run resolves from it).

Code below this package never reads the whole `Config`: each part takes its own section or plain values.
"""

from fedtune.aggregate.settings import ServerConfig
from fedtune.compress.settings import CompressionConfig
from fedtune.config.checks import Mode, check
from fedtune.config.load import apply_overrides, load_config, load_config_text, to_toml, validate
from fedtune.config.schema import Config, RunConfig
from fedtune.data.settings import BUILTIN_SOURCES, DataConfig
from fedtune.model.settings import LoraSettings, ModelConfig
from fedtune.privacy.settings import DpSgdConfig, PrivacyConfig
from fedtune.round.settings import EvalConfig, FederationConfig, SimulationConfig
from fedtune.secagg.settings import SecureAggregationConfig
from fedtune.train.settings import TrainConfig
from fedtune.transport.settings import DeployConfig

__all__ = [
    "BUILTIN_SOURCES",
    "CompressionConfig",
    "Config",
    "DataConfig",
    "DeployConfig",
    "DpSgdConfig",
    "EvalConfig",
    "FederationConfig",
    "LoraSettings",
    "Mode",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "SecureAggregationConfig",
    "ServerConfig",
    "SimulationConfig",
    "TrainConfig",
    "apply_overrides",
    "check",
    "load_config",
    "load_config_text",
    "to_toml",
    "validate",
]
