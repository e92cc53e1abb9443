"""Refused TLS connections, recorded by the server: read from gRPC's own log.

grpcio verifies the client's certificate inside its C core and offers Python no hook for the handshake:
a connection it refuses never reaches a handler. Rather than weaken mutual TLS (terminating TLS in Python,
or letting gRPC accept any certificate and verifying it afterwards), the server keeps gRPC's verification
as it is and reads what gRPC itself says. With `GRPC_TRACE=handshaker` (`enable_trace`, called by
`fedtune server` before gRPC loads) the core logs each failed server handshake with OpenSSL's reason and
the peer's address. `HandshakeLogTap` takes the process's stderr (file descriptor 2, where the core
writes), turns those entries into `HandshakeFailure`s for the coordinator (the state file, `fedtune
status` and the round's `refused_messages`), passes every other line through, and drops gRPC's own
chatter unless asked to show it.
What the log does not carry is the subject of a refused certificate: gRPC never parses a certificate that
failed verification, so the record holds the time, the peer address and the reason.

The entries' format is gRPC's (checked against grpcio 1.85 by the deployment tests); an entry in another
format is passed through, never mistaken for a refusal.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass

_ENTRY = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [\w./-]+:\d+\] ")
_FAILED = re.compile(r"CallNextHandshakerLocked: error=(?!OK\b)(?P<error>.*)")
_LOCAL = re.compile(r"endpoint_local_address=(?P<address>[^,}\s]+)")
_PEER = re.compile(r"endpoint_peer_address=(?P<address>[^,}\s]+)")
_CONTINUATION = ("===", "src/", " ", "\t")
_TLS = ("Ssl handshake failed", "Tls handshake failed", "SSL_ERROR")

_WORDS = (
    ("certificate has expired", "the client's certificate has expired"),
    ("certificate is not yet valid", "the client's certificate is not valid yet (check the site's clock)"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "the client presented no certificate"),
    ("WRONG_VERSION_NUMBER", "the client does not speak TLS (a plaintext client)"),
    ("HTTP_REQUEST", "the client does not speak TLS (a plaintext client)"),
    ("unable to get local issuer certificate", "the client's certificate is not from this federation's CA"),
    ("self-signed certificate", "the client's certificate is not from this federation's CA"),
    ("certificate signature failure", "the client's certificate is not from this federation's CA"),
    ("unsupported certificate purpose", "the client's certificate is not a client certificate"),
    ("BAD_PACKET_LENGTH", "the client broke off the handshake: it does not trust this server's certificate"),
    ("ALERT_UNKNOWN_CA", "the client does not trust this server's certificate (it holds another CA)"),
    ("ALERT_BAD_CERTIFICATE", "the client does not accept this server's certificate"),
    ("ALERT_CERTIFICATE_EXPIRED", "the client finds this server's certificate expired"),
)


def enable_trace(environ: MutableMapping[str, str]) -> None:
    """Have gRPC log its handshakes (read once, when gRPC loads); a user's own GRPC_TRACE is kept."""
    traces = [t for t in environ.get("GRPC_TRACE", "").split(",") if t]
    environ["GRPC_TRACE"] = ",".join([*traces, "handshaker"] if "handshaker" not in traces else traces)
    if environ.get("GRPC_VERBOSITY", "").upper() != "DEBUG":
        environ["GRPC_VERBOSITY"] = "INFO"


@dataclass(frozen=True)
class HandshakeFailure:
    peer: str  # as gRPC names it, e.g. ipv4:10.0.0.7:51234
    reason: str  # in words
    detail: str  # OpenSSL's, as gRPC logged it

    def __str__(self) -> str:
        return f"TLS handshake from {self.peer} refused: {self.reason} ({self.detail})"


def reason_in_words(error: str) -> str:
    for needle, words in _WORDS:
        if needle in error:
            return words
    return "the TLS handshake failed"


def _port(address: str) -> int | None:
    head, _, port = address.rpartition(":")
    return int(port) if head and port.isdigit() else None


def failure_of(entry: str, port: int) -> HandshakeFailure | None:
    """The refused handshake that one gRPC log entry (its lines joined) reports on `port`, or None."""
    failed = _FAILED.search(entry)
    local, peer = _LOCAL.search(entry), _PEER.search(entry)
    if failed is None or local is None or _port(local["address"]) != port:
        return None
    error = failed["error"].strip().removesuffix(": OK")
    if not any(marker in error for marker in _TLS):
        return None  # a connection closed mid-handshake, not a refusal of its certificate
    detail = error.split("OPENSSL_internal:")[-1].strip()
    return HandshakeFailure(peer["address"] if peer else "unknown", reason_in_words(error), detail)


def entries(lines: Iterable[str]) -> Iterator[tuple[bool, list[str]]]:
    """Group lines into (is a gRPC entry, its lines): a gRPC entry runs from its prefixed line through
    its continuation lines (a status's source trace, the handshake's arguments) to a blank line or the
    next prefixed line; every other line (fedtune's own log, say) stands alone."""
    current: list[str] | None = None
    for line in lines:
        if _ENTRY.match(line):
            if current is not None:
                yield True, current
            current = [line]
        elif current is not None and line.strip() and line.startswith(_CONTINUATION):
            current.append(line)
        elif current is not None and not line.strip():  # the blank line that ends an entry is the entry's
            yield True, [*current, line]
            current = None
        else:
            yield False, [line]
    if current is not None:
        yield True, current


class HandshakeLogTap:
    """Reads file descriptor 2 in a thread: gRPC's entries are dropped (but its errors) unless `verbose`,
    and once `watch`ed, refused handshakes on the server's port go to `on_failure`; everything else
    passes through. `sys.stderr` is re-opened on the terminal, so Python's own output does not depend on
    the thread. Start it before gRPC loads, so that its start-up lines are caught too."""

    def __init__(self, *, verbose: bool = False) -> None:
        self.verbose = verbose
        self._port: int | None = None
        self._on_failure: Callable[[HandshakeFailure], None] = lambda _failure: None
        self._terminal = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._saved_stderr = sys.stderr
        sys.stderr = open(os.dup(self._terminal), "w", buffering=1, closefd=True)  # noqa: SIM115
        self._reader = threading.Thread(target=self._read, args=(read_end,), daemon=True, name="grpc-log")
        self._reader.start()

    def watch(self, port: int, on_failure: Callable[[HandshakeFailure], None]) -> None:
        """From now on, report the refused handshakes of the server listening on `port`."""
        self._on_failure, self._port = on_failure, port

    def _read(self, read_end: int) -> None:
        with open(read_end, encoding="utf-8", errors="replace", newline="\n") as pipe:
            for is_grpc, lines in entries(pipe):
                try:
                    self._handle(is_grpc, lines)
                except Exception:  # never let a bad line stop the reader: gRPC would block on a full pipe
                    continue

    def _handle(self, is_grpc: bool, lines: list[str]) -> None:
        text = "".join(lines)
        if is_grpc:
            failure = failure_of(text, self._port) if self._port is not None else None
            if failure is not None:
                self._on_failure(failure)
            if not (self.verbose or text[0] in "EF"):
                return
        os.write(self._terminal, text.encode())

    def __enter__(self) -> HandshakeLogTap:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give file descriptor 2 back to the terminal; the reader ends at the pipe's end."""
        sys.stderr.flush()
        os.dup2(self._terminal, 2)
        self._reader.join(timeout=2.0)
        sys.stderr.close()
        sys.stderr = self._saved_stderr
