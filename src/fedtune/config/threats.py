"""The rules of `[attack]` and of the robust `server.rule`s that span sections, and the modes they need.

Called from `checks.check` with the cohort it computed. Krum needs more updates per round than the
attackers it assumes; FLTrust rescales every update to its reference's norm and needs root data the
server holds; a simulated attack has no place in a deployment. (Secure aggregation, DP and SCAFFOLD
refuse any rule but fedavg, in their own checks.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fedtune.config.schema import Config
from fedtune.data.sources import FILE_SUFFIXES
from fedtune.errors import ConfigError


def check_threats(
    config: Config, mode: Literal["simulate", "deploy"] | None, cohort: int | None
) -> list[str]:
    """Refuse what the attack or the robust rule cannot run with; notes for the run's log."""
    if mode == "deploy" and config.attack.active:
        raise ConfigError(
            f"attack.kind = {config.attack.kind!r} simulates attacking clients; a deployment's clients are "
            "real: remove [attack] for fedtune server"
        )
    if config.server.rule == "fltrust":
        _check_fltrust(config, mode)
    if config.server.rule in ("krum", "multi_krum"):
        return _check_krum(config, cohort)
    return []


def _check_fltrust(config: Config, mode: Literal["simulate", "deploy"] | None) -> None:
    server = config.server
    if server.step_normalization != "none":
        raise ConfigError(
            f"server.rule = 'fltrust' rescales every update to the norm of the server's own update, so "
            f"server.step_normalization = {server.step_normalization!r} (per-step deltas, the mean scaled "
            "back by steps) would scale the result by the clients' mean steps; set it to 'none' with fltrust "
            "(the rescaling already stops a client that took more steps from pulling harder)"
        )
    if server.root_data == "sample":
        if mode == "deploy":
            raise ConfigError(
                "server.root_data = 'sample' draws FLTrust's root data from the simulated clients' data, "
                "which a deployed server does not hold: set server.root_data to a .jsonl, .csv or .parquet "
                "file of trusted examples on the server"
            )
        return
    path = Path(server.root_data)
    if path.suffix.lower() not in FILE_SUFFIXES or not path.is_file():
        raise ConfigError(
            f"server.root_data = {server.root_data!r} is not a {', '.join(FILE_SUFFIXES)} file; give the "
            "path of the server's trusted examples, or 'sample' in a simulation"
        )


def _check_krum(config: Config, cohort: int | None) -> list[str]:
    server = config.server
    if cohort is None:
        return []
    f = server.byzantine
    size = "federation.clients_per_round"
    if config.federation.fraction_per_round is not None:
        size = "federation.fraction_per_round"
    if cohort - f - 2 < 1:
        lower = f" or lower server.byzantine to {cohort - 3}" if cohort >= 3 else ""
        raise ConfigError(
            f"server.rule = {server.rule!r} scores each update by its n - f - 2 nearest others, which needs "
            f"n >= f + 3 updates a round: {size} gives n = {cohort} and server.byzantine = f = {f}; raise "
            f"federation.clients_per_round to at least {f + 3}{lower}"
        )
    keep = server.multi_krum_keep
    if server.rule == "multi_krum" and keep is not None and keep > cohort:
        raise ConfigError(
            f"server.multi_krum_keep = {keep} exceeds the {cohort} updates a round aggregates ({size}); "
            "lower it, or leave it out for n - server.byzantine"
        )
    if cohort <= 2 * f + 2:
        return [
            f"server.rule = {server.rule!r} with {cohort} updates a round and server.byzantine = {f}: Krum's "
            "guarantee needs more than 2f + 2 updates (Blanchard et al. 2017); it still runs"
        ]
    return []
