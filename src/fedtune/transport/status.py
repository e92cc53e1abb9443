"""Which gRPC status answers which refusal: the one table that ties `Refusal.kind` to the wire.

Everything below the gRPC edge refuses with a plain `fedtune.errors.Refusal(kind, detail)`; the service
answers it with `code_of(kind)` and the details `"{kind}: {detail}"`, so a client (and a test) can tell
every refusal apart by its status and its first word.
"""

from __future__ import annotations

import grpc

Code = grpc.StatusCode

STATUS: dict[str, grpc.StatusCode] = {
    "not_allowed": Code.PERMISSION_DENIED,  # not on the allow-list
    "wrong_identity": Code.PERMISSION_DENIED,  # a message claiming another client's id
    "unauthenticated": Code.UNAUTHENTICATED,  # no client certificate
    "unknown_session": Code.UNAUTHENTICATED,  # join again (the server may have restarted)
    "duplicate_client": Code.ALREADY_EXISTS,  # a second live process with one id
    "wrong_version": Code.FAILED_PRECONDITION,
    "stale": Code.FAILED_PRECONDITION,  # another round than the open one
    "not_selected": Code.FAILED_PRECONDITION,
    "replayed": Code.FAILED_PRECONDITION,  # a used or wrong nonce
    "protocol": Code.FAILED_PRECONDITION,  # a SecAgg+ message the protocol refuses
    "oversize": Code.RESOURCE_EXHAUSTED,  # more bytes than the round allows
    # malformed, wrong_shape, wrong_encoding, non_finite, truncated, invalid_update: INVALID_ARGUMENT
}


def code_of(kind: str) -> grpc.StatusCode:
    return STATUS.get(kind, Code.INVALID_ARGUMENT)
