"""Both ends' gRPC plumbing: message size limits, a client's channel and its four calls as raw bytes."""

from __future__ import annotations

from pathlib import Path

import grpc

from fedtune.errors import ConfigError
from fedtune.transport.tls import channel_credentials, warn_insecure
from fedtune.transport.wire import SERVICE

MESSAGE_OVERHEAD_BYTES = 1 << 16
MAX_CHUNK_BYTES = 3072 * 1024  # the largest deploy.chunk_kib a server may use


def grpc_options(chunk_bytes: int) -> list[tuple[str, int]]:
    """No single message larger than one chunk and its header: bigger ones are refused by gRPC itself."""
    limit = chunk_bytes + MESSAGE_OVERHEAD_BYTES
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


class Stub:
    """The four calls over a channel, as raw bytes in and out (the schema is `fedtune_v2_pb2`)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.join = channel.unary_unary(f"/{SERVICE}/Join")
        self.get_task = channel.unary_stream(f"/{SERVICE}/GetTask")
        self.submit = channel.stream_unary(f"/{SERVICE}/SubmitUpdate")
        self.secagg = channel.unary_unary(f"/{SERVICE}/SecAgg")


def server_address(text: str) -> str:
    """`HOST:PORT` as a site passes it (`[v6]:PORT` for an IPv6 literal); ConfigError naming the fix.
    gRPC itself would take a bare host and quietly use port 443."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        sep = ""  # an IPv6 literal without brackets: the last colon is not a port separator
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--server {text!r} needs a port: pass HOST:PORT, e.g. localhost:50051 (the port of the server's "
            "deploy.address; an IPv6 address as [::1]:50051)"
        )
    return f"{host}:{int(port)}"


def open_channel(server: str, certs: Path | None, chunk_bytes: int = MAX_CHUNK_BYTES) -> grpc.Channel:
    """A channel to `server` (host:port): mutual TLS with the site's certificate folder, or plaintext."""
    options = grpc_options(chunk_bytes)
    if certs is None:
        warn_insecure()
        return grpc.insecure_channel(server, options=options)
    return grpc.secure_channel(server, channel_credentials(certs), options=options)
