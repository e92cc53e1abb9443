"""The whole run's configuration: every section, each owned by the package that reads it.

`[run]` is the run's own (where results go, the seed, threads); the others come from their packages:
`[model]` `[lora]` (model.settings), `[data]` (data.settings), `[federation]` `[eval]` `[personalize]`
`[simulation]` (round.settings), `[clients]` (round.profiles), `[train]` (train.settings), `[server]`
(aggregate.settings), `[secure_aggregation]` (secagg.settings), `[compression]` (compress.settings),
`[privacy]` `[dpsgd]` (privacy.settings), `[attack]` (attack.settings), `[audit]` (audit.settings), `[deploy]`
(transport.settings), `[tracking]` (tracking.settings).
The rules that span sections are in `checks`; loading and overrides in `load`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from fedtune.aggregate.settings import ServerConfig
from fedtune.attack.settings import AttackConfig
from fedtune.audit.settings import AuditConfig
from fedtune.compress.settings import CompressionConfig
from fedtune.data.settings import DataConfig
from fedtune.model.settings import LoraSettings, ModelConfig
from fedtune.privacy.settings import DpSgdConfig, PrivacyConfig
from fedtune.round.profiles import ClientsConfig
from fedtune.round.settings import EvalConfig, FederationConfig, PersonalizeConfig, SimulationConfig
from fedtune.secagg.settings import SecureAggregationConfig
from fedtune.section import PositiveInt, Section
from fedtune.tracking.settings import TrackingConfig
from fedtune.train.settings import TrainConfig
from fedtune.transport.settings import DeployConfig


class RunConfig(Section):
    """Where results go and how the run is seeded."""

    name: str = Field("default", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    dir: Path | None = None  # defaults to runs/<name>
    seed: int = Field(0, ge=0)
    threads: PositiveInt | None = None  # torch intra-op threads; default: torch's choice

    @property
    def resolved_dir(self) -> Path:
        return self.dir if self.dir is not None else Path("runs") / self.name


class Config(Section):
    """A whole run. Sections mirror the TOML file."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    clients: ClientsConfig = ClientsConfig()
    train: TrainConfig = TrainConfig()
    server: ServerConfig = ServerConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    compression: CompressionConfig = CompressionConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    dpsgd: DpSgdConfig = DpSgdConfig()
    eval: EvalConfig = EvalConfig()
    personalize: PersonalizeConfig = PersonalizeConfig()
    simulation: SimulationConfig = SimulationConfig()
    attack: AttackConfig = AttackConfig()
    audit: AuditConfig = AuditConfig()
    deploy: DeployConfig = DeployConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def data_seed(self) -> int:
        """What seeds the data: which clients, their caps and held-out splits, who evaluates
        (`data.seed`, by default `run.seed`; `fedtune compare` holds it fixed while run.seed varies)."""
        return self.run.seed if self.data.seed is None else self.data.seed
