"""Secure aggregation errors: one root type, `SecAggError`, under `fedtune.errors.FedtuneError`.

Two kinds, because a caller handles them differently: `ProtocolViolation` is a message that breaks the
protocol (wrong round, peer or stage, a duplicate, a share that fails authentication, an unmasking request
a client must refuse); `SecAggAbort` is a round that cannot finish because too few clients survived a
stage. Checks raise these, never `assert`, which `python -O` removes. Configuration that cannot work
(e.g. a modulus that could overflow) raises `fedtune.errors.ConfigError`, naming the field.
"""

from __future__ import annotations

from fedtune.errors import FedtuneError


class SecAggError(FedtuneError):
    """Root of every error the secure aggregation protocol raises on purpose."""


class ProtocolViolation(SecAggError):
    """A message breaks the protocol; the party that raised it refuses to go on with the round."""


class SecAggAbort(SecAggError):
    """The round cannot finish: too few clients survived a stage. Nothing about any input is revealed."""

    def __init__(self, stage: str, reason: str, survivors_per_stage: tuple[int, ...]) -> None:
        super().__init__(f"secure aggregation aborted at stage {stage}: {reason}")
        self.stage = stage
        self.reason = reason
        self.survivors_per_stage = survivors_per_stage
