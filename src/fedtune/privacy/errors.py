"""Errors of the privacy package, under fedtune's one root error type.

`NonFiniteUpdate` is raised by clipping for a delta with NaN or Inf values: the caller turns it into a
refused update (and, in a DP round, a zero contribution, so that whether a client was refused never changes
how many clients the aggregate counts). `PrivacyBudgetExhausted` names the round that would exceed the
budget, so a run can stop before it, never after.
"""

from __future__ import annotations

from fedtune.errors import FedtuneError


class PrivacyError(FedtuneError):
    """Root of the privacy package's errors."""


class NonFiniteUpdate(PrivacyError):
    """A delta holds NaN or Inf values: it cannot be clipped, so it must be refused."""


class PrivacyBudgetExhausted(PrivacyError):
    """One more round would spend more than the configured (epsilon, delta) budget."""
