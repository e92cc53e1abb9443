"""The rules of what watches a run, `[audit]` and `[tracking]`: the modes and topologies an audit cannot
run in, and trackers whose packages are missing. Called from `checks.check`.
"""

from __future__ import annotations

from fedtune.config.schema import Config
from fedtune.config.topology import Mode
from fedtune.errors import ConfigError
from fedtune.tracking.settings import EXTRA, missing_packages


def check_audit(config: Config, mode: Mode | None) -> None:
    """What an audit cannot run with, with the reason (it reads only the final adapter, so secure
    aggregation, compression and robust rules are fine)."""
    audit = config.audit
    if mode == "deploy":
        raise ConfigError(
            "audit.enabled plants canary clients and canary texts in a simulated run; a deployment's "
            "clients are real and its server cannot plant any: audit a simulation of this config "
            "(fedtune audit CONFIG), and set audit.enabled = false for fedtune server"
        )
    if config.federation.topology != "star":
        raise ConfigError(
            f"audit.enabled with federation.topology = {config.federation.topology!r}: the audit scores "
            "its canaries against the global adapter, which a decentralized federation does not have; "
            "set federation.topology = 'star'"
        )
    if config.privacy.mode != "off" and audit.delta is not None:
        raise ConfigError(
            f"audit.delta = {audit.delta:g} with privacy.mode = {config.privacy.mode!r}: the bound is "
            "compared with the accountant's epsilon at the accountant's delta; remove audit.delta and "
            "set privacy.delta"
        )


def check_tracking(config: Config) -> None:
    """The trackers a run turns on must be installed where it runs (checked when the run starts, not at
    load: a deployed site validates the server's config and does not track)."""
    missing = missing_packages(config.tracking)
    if missing:
        on = [
            f"tracking.{name} = true" for name in ("tensorboard", "mlflow") if getattr(config.tracking, name)
        ]
        raise ConfigError(
            f"{' and '.join(on)} need{'s' if len(on) == 1 else ''} {', '.join(missing)}, not installed here: "
            f"{EXTRA} (or turn the tracker off)"
        )
