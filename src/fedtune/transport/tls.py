"""Mutual TLS for the gRPC server and clients, from the folders `fedtune certs` writes.

The server requires a client certificate signed by its CA (gRPC refuses another CA's, or an expired one,
in the handshake); a client's identity is its certificate's subject common name, read from the
connection, never from a message. Plaintext exists only behind `unsafe_insecure`, which warns every time.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import grpc

from fedtune.pki import load_identity

INSECURE_WARNING = (
    "--unsafe-insecure: no TLS; anyone on the network can read updates and claim any client id. "
    "Use it only on a machine you control, for tests."
)


def warn_insecure() -> None:
    warnings.warn(INSECURE_WARNING, UserWarning, stacklevel=3)


def server_credentials(certs: Path) -> grpc.ServerCredentials:
    """Server TLS that requires and verifies a client certificate from the same CA."""
    identity = load_identity(certs)
    return grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)],
        root_certificates=identity.ca_pem,
        require_client_auth=True,
    )


def channel_credentials(certs: Path) -> grpc.ChannelCredentials:
    """Client TLS: trust only the federation's CA, present this site's certificate."""
    identity = load_identity(certs)
    return grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem)


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The verified subject common name of the calling client, or None on an unauthenticated channel."""
    names = context.auth_context().get("x509_common_name") or []
    if not names:
        return None
    return names[0].decode("utf-8", errors="replace")
