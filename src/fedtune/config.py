"""Typed run configuration: TOML plus `--set key=value` overrides, validated once at load.

Code never reads settings by string key: it receives these pydantic models. Every error names the field,
the value given and what is allowed, in one line per problem.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedtune.errors import ConfigError
from fedtune.privacy.settings import DpSgdConfig, PrivacyConfig

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Section):
    """Where results go and how the run is seeded."""

    name: str = Field("default", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    dir: Path | None = None  # defaults to runs/<name>
    seed: int = Field(0, ge=0)
    threads: PositiveInt | None = None  # torch intra-op threads; default: torch's choice

    @property
    def resolved_dir(self) -> Path:
        return self.dir if self.dir is not None else Path("runs") / self.name


class ModelConfig(_Section):
    """The base model: a built-in name (`smollm2-135m`, `tiny`) or a local Hugging Face directory."""

    name: str = Field("smollm2-135m", min_length=1)


class LoraSettings(_Section):
    """LoRA adapter shape, passed to `peft.LoraConfig`."""

    rank: PositiveInt = 8
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )


class DataConfig(_Section):
    """Where client data comes from and how it is split into clients and tokenized."""

    source: str = Field("shakespeare", min_length=1)  # shakespeare | chat | path to .jsonl/.csv/.parquet
    text_field: str = "text"
    client_field: str | None = None  # natural split for files; without it, `partition` is used
    partition: Literal["natural", "iid", "dirichlet"] = "natural"
    dirichlet_alpha: float = Field(0.5, gt=0.0)
    label_field: str | None = None  # dirichlet over this label; without it, over quantity
    min_examples: int = Field(8, ge=2)  # clients with fewer examples are left out
    max_examples_per_client: PositiveInt | Literal["all"] = 256
    eval_fraction: Fraction = 0.2
    max_seq_len: int = Field(64, ge=8)  # tokens per example; longer text is truncated


class FederationConfig(_Section):
    """The rounds: how many, which clients, how much local work."""

    rounds: PositiveInt = 6
    num_clients: PositiveInt | Literal["all"] = 16  # population size, sampled from the eligible clients
    clients_per_round: PositiveInt = 4
    fraction_per_round: float | None = Field(None, gt=0.0, le=1.0)  # overrides clients_per_round
    local_steps: PositiveInt = 8
    local_epochs: PositiveInt | None = None  # when set, train whole epochs instead of local_steps


class TrainConfig(_Section):
    """Each client's local optimizer (AdamW)."""

    lr: float = Field(2e-3, gt=0.0)
    batch_size: PositiveInt = 4
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)  # 0 disables gradient clipping


class ServerConfig(_Section):
    """Aggregation rule and server optimizer, composed: the rule makes one delta, the optimizer applies it."""

    rule: Literal["fedavg", "median", "trimmed_mean"] = "fedavg"
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5)  # per side, for trimmed_mean
    optimizer: Literal["sgd", "momentum", "adam", "yogi"] = "sgd"
    lr: float = Field(1.0, gt=0.0)  # server learning rate; sgd with lr=1 is plain FedAvg
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    eps: float = Field(1e-3, gt=0.0)  # adaptivity tau of FedAdam/FedYogi (Reddi et al. 2021)


class SecureAggregationConfig(_Section):
    """SecAgg+ (Bell et al. 2020): the server learns only the sum of the round's masked updates."""

    enabled: bool = False
    neighbours: PositiveInt | Literal["auto", "all"] = "auto"  # auto: 2*ceil(log2 n); all: SecAgg
    threshold: PositiveInt | Literal["auto"] = "auto"  # auto: a strict majority of each k + 1 holders
    bits: int = Field(16, ge=1, le=31)  # fixed-point bits per value, before weighting
    clip_range: float = Field(0.1, gt=0.0)  # each delta coordinate is clipped to [-c, c]
    dropout_rate: float = Field(0.0, ge=0.0, lt=1.0)  # simulation: chance a client drops at each stage


class CompressionConfig(_Section):
    """How clients compress their updates (fedtune.compress): sparsify, quantize, entropy-code."""

    method: Literal["none", "quantize", "topk", "randomk"] = "none"
    bits: int = Field(8, ge=1, le=32)  # quantize: 1-8; topk/randomk values: 32, 16 or 1-8
    block_size: PositiveInt | Literal["tensor"] = 256  # values per quantization scale
    fraction: float = Field(0.01, gt=0.0, le=1.0)  # topk/randomk: share of coordinates kept
    error_feedback: bool = True  # each client keeps what compression dropped and adds it next time
    entropy_coding: bool = True  # zstd per payload section, only where it is smaller
    rescale: bool = False  # randomk: the server scales by d/k (unbiased); not with error_feedback


class EvalConfig(_Section):
    """Evaluation of the global adapter on the clients' held-out data."""

    every: PositiveInt = 2  # rounds; the first and last rounds are always evaluated
    max_clients: PositiveInt | Literal["all"] = "all"  # a fixed, seeded subset of the population
    max_examples_per_client: PositiveInt = 8
    batch_size: PositiveInt = 8


class DeployConfig(_Section):
    """The gRPC deployment (`fedtune server`): where it listens, who may join, round timing and limits."""

    address: str = Field("127.0.0.1:50051", min_length=3)  # host:port the server listens on
    certs: Path = Path("certs/server")  # ca.pem, cert.pem, key.pem from `fedtune certs init`
    clients: list[str] = Field(default_factory=list)  # the allow-list: client ids (certificate subjects)
    min_clients: PositiveInt | None = None  # fewest updates a round aggregates; default clients_per_round
    min_connected: PositiveInt | Literal["all"] = "all"  # clients connected before a round starts
    over_selection: float = Field(0.0, ge=0.0, le=1.0)  # select this much more than clients_per_round
    round_timeout_s: float = Field(600.0, gt=0.0)  # a round closes then with what has arrived
    stage_timeout_s: float = Field(60.0, gt=0.0)  # secure aggregation: each key or unmasking stage
    wait_for_clients_s: float = Field(3600.0, gt=0.0)  # how long a round waits for min_connected
    session_timeout_s: float = Field(60.0, gt=0.0)  # a client not heard from this long is away
    poll_interval_s: float = Field(1.0, gt=0.0)  # how often an idle client asks for work
    max_update_mib: float = Field(256.0, gt=0.0)  # refused before allocation when larger
    max_concurrent_uploads: PositiveInt = 4  # update buffers held at once; the rest wait their turn
    chunk_kib: int = Field(1024, ge=1, le=3072)  # streamed message size


class Config(_Section):
    """A whole run. Sections mirror the TOML file."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    server: ServerConfig = ServerConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    compression: CompressionConfig = CompressionConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    dpsgd: DpSgdConfig = DpSgdConfig()
    eval: EvalConfig = EvalConfig()
    deploy: DeployConfig = DeployConfig()

    @model_validator(mode="after")
    def _combinations(self) -> Config:
        fed, data = self.federation, self.data
        if isinstance(fed.num_clients, int) and fed.clients_per_round > fed.num_clients:
            raise ValueError(
                f"federation.clients_per_round = {fed.clients_per_round} exceeds "
                f"federation.num_clients = {fed.num_clients}; lower it or raise num_clients"
            )
        is_file = data.source not in BUILTIN_SOURCES
        for key in ("client_field", "label_field"):
            if not is_file and getattr(data, key) is not None:
                raise ValueError(
                    f"data.{key} = {getattr(data, key)!r} applies to files only; the built-in "
                    f"source {data.source!r} has its own clients (dirichlet over it skews quantity)"
                )
        if data.partition == "natural" and is_file and data.client_field is None:
            raise ValueError(
                f"data.partition = 'natural' needs data.client_field for file {data.source!r}; "
                "name the client column or use partition = 'iid' or 'dirichlet'"
            )
        try:
            if self.privacy.mode != "off" or self.dpsgd.enabled:
                check_privacy(self)
            if self.secure_aggregation.enabled:
                check_secure_aggregation(self)
            check_compression(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        check_deploy_lists(self)
        if data.partition != "natural" and fed.num_clients == "all":
            raise ValueError(
                f"data.partition = {data.partition!r} needs a number of clients; "
                "set federation.num_clients to an integer"
            )
        return self


BUILTIN_SOURCES = ("shakespeare", "chat")


def secagg_cohort_bound(config: Config, population: int | None = None) -> int | None:
    """The largest number of clients in a secure round, when it is known (or `population` is given)."""
    fed = config.federation
    size = population if population is not None else fed.num_clients
    if fed.fraction_per_round is not None:
        return None if size == "all" else max(1, round(fed.fraction_per_round * size))
    return fed.clients_per_round if size == "all" else min(fed.clients_per_round, size)


def check_privacy(config: Config, population: int | None = None) -> None:
    """Refuse privacy settings that cannot be run or accounted, with the reason."""
    from fedtune.privacy.settings import check_privacy as check

    check(config, population)


CLIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def check_deploy_lists(config: Config) -> None:
    """Refuse a malformed allow-list or limits that contradict the federation settings (at load)."""
    dep, fed = config.deploy, config.federation
    bad = [c for c in dep.clients if not re.fullmatch(CLIENT_ID_PATTERN, c)]
    if bad:
        raise ValueError(
            f"deploy.clients: {bad[0]!r} is not a client id; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (the certificate subject from `fedtune certs issue`)"
        )
    seen = {c for c in dep.clients if dep.clients.count(c) > 1}
    if seen:
        raise ValueError(f"deploy.clients lists {sorted(seen)[0]!r} twice; list each client once")
    if dep.min_clients is not None and dep.min_clients > fed.clients_per_round:
        raise ValueError(
            f"deploy.min_clients = {dep.min_clients} exceeds federation.clients_per_round = "
            f"{fed.clients_per_round}; a round never aggregates more than clients_per_round updates"
        )


def check_deployment(config: Config) -> None:
    """Refuse what `fedtune server` cannot run, with the reason (at server start)."""
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
    if config.privacy.mode == "distributed":
        raise ConfigError(
            "privacy.mode = 'distributed' is not yet carried over the network (it runs in simulation: "
            "fedtune run); use privacy.mode = 'central' for fedtune server"
        )
    if config.secure_aggregation.enabled and dep.over_selection > 0:
        raise ConfigError(
            f"deploy.over_selection = {dep.over_selection} with secure aggregation: extra clients would "
            "share keys and then be dropped; SecAgg+ survives dropouts by itself: set it to 0"
        )
    if config.secure_aggregation.enabled:
        cap = config.data.max_examples_per_client
        if config.privacy.mode == "off" and cap == "all":
            raise ConfigError(
                "secure aggregation needs a public bound on each client's weight to size its encoding; set "
                "data.max_examples_per_client to a number (each client's weight is capped at it)"
            )
        check_secure_aggregation(config, len(dep.clients), cap if isinstance(cap, int) else None)
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


def check_compression(config: Config) -> list[str]:
    """Refuse compression settings that are invalid or do not compose; return notes for the log."""
    from fedtune.compress import CompressionSpec, check_composable

    return check_composable(
        CompressionSpec.from_config(config.compression),
        secure_aggregation=config.secure_aggregation.enabled,
        server_rule=config.server.rule,
        privacy_mode=config.privacy.mode,
    )


def check_secure_aggregation(
    config: Config, population: int | None = None, max_weight: int | None = None
) -> None:
    """Refuse what secure aggregation cannot do, with the reason (at load, and again with real sizes)."""
    from fedtune.secagg.encoding import check_overflow
    from fedtune.secagg.graph import resolve_neighbours

    sa, rule = config.secure_aggregation, config.server.rule
    if rule != "fedavg":
        raise ConfigError(
            f"server.rule = {rule!r} needs every client's update, but secure aggregation reveals only "
            "their sum; use server.rule = 'fedavg' or set secure_aggregation.enabled = false"
        )
    if config.privacy.mode != "off" and config.privacy.sampling == "poisson":
        raise ConfigError(
            "privacy.sampling = 'poisson' draws a cohort of random size, which can fall below "
            "secure_aggregation.threshold and abort the round; use privacy.sampling = 'fixed' with "
            "secure aggregation"
        )
    cohort = secagg_cohort_bound(config, population)
    if cohort is None:
        return
    if cohort < 2:
        raise ConfigError(
            f"secure aggregation needs at least 2 clients per round, and this config has {cohort}; "
            "raise federation.clients_per_round"
        )
    k = resolve_neighbours(sa.neighbours, cohort)
    if sa.threshold != "auto" and not 2 <= sa.threshold <= k + 1:
        raise ConfigError(
            f"secure_aggregation.threshold = {sa.threshold}: allowed 2 to {k + 1} "
            f"(each client's secret has k + 1 = {k + 1} holders with {cohort} clients per round)"
        )
    weight = 1 if config.privacy.mode != "off" else max_weight  # DP updates all weigh 1
    if weight is None and config.data.max_examples_per_client != "all":
        weight = config.data.max_examples_per_client
    if weight is not None:
        check_overflow(cohort, weight, sa.bits, sa.clip_range)


def _parse_value(text: str) -> Any:
    """A `--set` value is read as a TOML value (3, 0.5, true, [\"a\"]); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a nested dict, returning a new dict."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, for example federation.rounds=3")
        section, field = parts
        target = out.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item!r}: {section!r} is not a section")
        target[field] = _parse_value(value.strip())
    return out


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "config"
    kind = error["type"]
    if kind == "extra_forbidden":
        model: type[BaseModel] = Config
        for part in error["loc"][:-1]:
            field = model.model_fields.get(str(part))
            if field is None or not isinstance(field.annotation, type):
                break
            model = field.annotation
        allowed = ", ".join(model.model_fields)
        return f"{where}: unknown key; allowed here: {allowed}"
    if kind == "value_error":
        return str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
    given = error.get("input")
    return f"{where} = {given!r}: {error['msg'][0].lower()}{error['msg'][1:]}"


def validate(raw: dict[str, Any]) -> Config:
    """Build a Config from a nested dict, turning pydantic errors into one ConfigError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        raise ConfigError("invalid config: " + "; ".join(lines)) from None


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or start from defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass an existing TOML file")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    return validate(apply_overrides(raw, overrides or []))


def load_config_text(text: str, origin: str = "the run's config") -> Config:
    """A Config from TOML text (a stored or received config), validated like a file."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin} is not valid TOML: {exc}") from None
    return validate(raw)


def to_toml(config: Config) -> str:
    """The resolved config as TOML; `load_config` of it gives back an equal Config."""
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))
