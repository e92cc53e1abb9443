"""What `fedtune server --resume` may change in a stored run, and the refusal that names what it may not.

A resumed run continues the stored one: the rounds already committed, the server optimizer's state, the
DP accountant and the sampling streams all assume the stored config. Some keys change only where and how
the coordinator runs, or how long the run goes on, and are safe to change on resume:

- where it listens and as whom: `deploy.address`, `deploy.certs`;
- its timing: `deploy.*_timeout_s`, `deploy.wait_for_clients_s`, `deploy.poll_interval_s`, `run.threads`;
- how long the run goes on: `federation.rounds` (more rounds extend it; the rounds already done stay),
  and the allow-list `deploy.clients` may grow.

Under DP neither the rounds nor the population may change: the noise was calibrated, and the accountant
tracks the sampling rate, for the stored number of rounds and clients. Every other key is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtune.config import Config
from fedtune.errors import StateError

SAFE_KEYS = frozenset(
    {
        "deploy.address",
        "deploy.certs",
        "deploy.round_timeout_s",
        "deploy.stage_timeout_s",
        "deploy.eval_timeout_s",
        "deploy.wait_for_clients_s",
        "deploy.session_timeout_s",
        "deploy.poll_interval_s",
        "run.threads",
    }
)


RESOLVED_PRIVACY_KEYS = frozenset({"noise_multiplier", "delta"})


@dataclass(frozen=True)
class Change:
    key: str  # section.key
    stored: Any
    given: Any

    def __str__(self) -> str:
        return f"{self.key} ({self.stored!r} stored, {self.given!r} given)"


def changes(stored: Config, given: Config) -> list[Change]:
    """Every `section.key` whose value differs, in section order. The stored [privacy] section also
    records the noise multiplier and delta the run resolved: those differ only where the given config
    sets them."""
    left, right = stored.model_dump(mode="json"), given.model_dump(mode="json")
    found = []
    for section in left:
        for key in sorted(set(left[section]) | set(right[section])):
            was, now = left[section].get(key), right[section].get(key)
            if section == "privacy" and key in RESOLVED_PRIVACY_KEYS and now is None:
                continue
            if was != now:
                found.append(Change(f"{section}.{key}", was, now))
    return found


def _refusal(change: Change, stored: Config, rounds_done: int) -> str | None:
    """Why `change` cannot be made to a resumed run, or None when it can."""
    dp = stored.privacy.mode != "off"
    if change.key in SAFE_KEYS:
        return None
    if change.key == "federation.rounds":
        if dp:
            return "the DP noise was calibrated for the stored number of rounds"
        if change.given < rounds_done:
            return f"{rounds_done} rounds are already done"
        return None
    if change.key == "deploy.clients":
        if dp:
            return "the DP accountant assumes the stored population"
        dropped = sorted(set(change.stored) - set(change.given))
        return f"the allow-list may only grow ({', '.join(dropped)} would leave)" if dropped else None
    return "it changes what the stored rounds computed"


def resumed_config(stored: Config, given: Config, rounds_done: int) -> Config:
    """The config a resumed run continues with: the stored one with the given config's safe changes.
    StateError naming every key that differs and may not change, and why."""
    found = changes(stored, given)
    refused = [(c, why) for c in found if (why := _refusal(c, stored, rounds_done)) is not None]
    if refused:
        lines = "; ".join(f"{c}: {why}" for c, why in refused)
        raise StateError(
            f"--resume cannot change {', '.join(c.key for c, _ in refused)}: {lines}. Resume with the stored "
            f"values (the stored config is {stored.run.resolved_dir / 'config.toml'}), or start a new run in "
            "another run.dir"
        )
    update: dict[str, dict[str, Any]] = {}
    for change in found:
        section, key = change.key.split(".", 1)
        update.setdefault(section, {})[key] = getattr(getattr(given, section), key)
    sections = {name: getattr(stored, name).model_copy(update=keys) for name, keys in update.items()}
    return stored.model_copy(update=sections)
