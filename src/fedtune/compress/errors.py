"""The one error type of update compression: a payload that cannot be decoded (`PayloadError`).

A payload arrives from a client over the network, so anything in it may be wrong: decoding checks every
field and length against what the header and the expected update size allow, and raises `PayloadError`
(a `fedtune.errors.FedtuneError`) for anything else, never an `IndexError`, a `MemoryError` or an `assert`.
"""

from __future__ import annotations

from fedtune.errors import FedtuneError


class PayloadError(FedtuneError):
    """A compressed update is malformed, truncated, or claims more than the expected update holds."""
