"""A site's TLS, explained: its certificate folder checked before it connects, and a refused handshake
told in words a site admin can act on.

gRPC reports every handshake failure the same way (`UNAVAILABLE: failed to connect to all addresses ...
Socket closed`) and retries it as an outage. So before connecting, `check_site_folder` reads the folder
(files present, key matching the certificate, dates valid, issued by the CA the folder holds); and when a
connection fails, `diagnose` repeats the handshake once with Python's `ssl` (OpenSSL), the way gRPC
makes it (TLS 1.2+, ALPN h2, the server's name checked, the site's certificate presented), and turns
OpenSSL's verdict into a `TlsProblem`: the server's certificate not trusted or not for this name, the
server refusing the site's certificate (expired, from another CA, none), or a server without TLS. A
server that is not up yet is no problem of TLS: the site keeps retrying it.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fedtune.errors import FedtuneError, PkiError
from fedtune.pki import CA_CERT_FILE, CERT_FILE, KEY_FILE, Identity, common_name, load_identity

PROBE_TIMEOUT_S = 5.0
ASK_FOR_NEW = "ask the coordinator for a new one (`fedtune certs issue {cn} --force`), copy its folder here"


@dataclass(frozen=True)
class TlsProblem:
    """A handshake failure that retrying cannot fix, in words."""

    kind: str  # server_not_trusted, name_mismatch, site_cert_refused, server_without_tls, server_requires_tls
    message: str

    def __str__(self) -> str:
        return self.message


class TlsProblemError(FedtuneError):
    """A TLS problem that retrying cannot fix, in words (`TlsProblem`)."""


def check_site_folder(folder: Path, now: datetime | None = None) -> Identity:
    """The site's identity from `folder`, checked the way the server will check it; PkiError saying
    what is wrong and what to do."""
    identity = load_identity(folder)  # files present, key matches the certificate
    now = now or datetime.now(UTC)
    cert = x509.load_pem_x509_certificate(identity.cert_pem)
    ca = x509.load_pem_x509_certificate(identity.ca_pem)
    cn = common_name(identity.cert_pem)
    for what, c in ((folder / CERT_FILE, cert), (folder / CA_CERT_FILE, ca)):
        if now > c.not_valid_after_utc:
            raise PkiError(
                f"{what} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: {ASK_FOR_NEW.format(cn=cn)}"
            )
        if now < c.not_valid_before_utc:
            raise PkiError(
                f"{what} is valid only from {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this "
                "machine's clock, or wait until then"
            )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):  # another issuer's name, key type or signature
        raise PkiError(
            f"{folder / CERT_FILE} was not issued by the CA in {folder / CA_CERT_FILE}: "
            f"copy {CA_CERT_FILE}, {CERT_FILE} and {KEY_FILE} from the same `fedtune certs issue` folder"
        ) from None
    return identity


def preflight(address: str, folder: Path | None) -> Identity | None:
    """Before a site loads anything: its folder checked, and one handshake with the server; PkiError or
    TlsProblemError saying what is wrong. A server that is not up yet passes (the site will retry it).
    A folder that fails its check still makes the handshake, so that the coordinator sees the attempt."""
    identity = None
    if folder is not None:
        try:
            identity = check_site_folder(folder)
        except PkiError:
            diagnose(address, folder)
            raise
    problem = diagnose(address, folder)
    if problem is not None:
        raise TlsProblemError(str(problem))
    return identity


def diagnose(address: str, folder: Path | None, timeout_s: float = PROBE_TIMEOUT_S) -> TlsProblem | None:
    """Why a connection to `address` (HOST:PORT) fails in TLS, or None when it does not (the server is
    not up, or the handshake succeeds). `folder`: the site's certificates; None for a plaintext client."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout_s)
    except OSError:
        return None  # not reachable (yet): an outage, which retrying can fix
    with raw:
        if folder is None:
            return _plaintext_against(raw, host, address)
        return _handshake(raw, host, address, folder)


def _context(folder: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=str(folder / CA_CERT_FILE))
    context.load_cert_chain(str(folder / CERT_FILE), str(folder / KEY_FILE))
    context.set_alpn_protocols(["h2"])
    return context


def _handshake(raw: socket.socket, host: str, address: str, folder: Path) -> TlsProblem | None:
    try:
        with _context(folder).wrap_socket(raw, server_hostname=host) as tls:
            # TLS 1.3: the server judges our certificate after its own Finished; gRPC then closes the
            # connection without an alert, where an accepting server sends its HTTP/2 settings
            first = tls.recv(1)
    except ssl.SSLCertVerificationError as exc:
        return _server_not_trusted(exc, host, address, folder)
    except ssl.SSLError as exc:
        return _refused(exc, address, folder)
    except OSError:
        return None
    if first:
        return None
    return TlsProblem(
        "site_cert_refused",
        f"the server at {address} closed the connection right after the TLS handshake: it does not accept "
        f"this site's certificate ({folder / CERT_FILE}: expired, revoked, or not from the server's CA); "
        "ask the coordinator for a new folder (`fedtune certs issue`)",
    )


def _server_not_trusted(
    exc: ssl.SSLCertVerificationError, host: str, address: str, folder: Path
) -> TlsProblem:
    message = exc.verify_message or str(exc)
    if exc.verify_code == 62 or "hostname" in message.lower() or "ip address mismatch" in message.lower():
        return TlsProblem(
            "name_mismatch",
            f"the server's certificate is not for {host!r} ({message}): connect with a name or address it "
            "was issued for (`fedtune certs init --server-name/--server-ip` on the coordinator)",
        )
    if exc.verify_code == 10 or "expired" in message:
        return TlsProblem(
            "server_not_trusted",
            f"the server's certificate at {address} has expired: the coordinator must renew it",
        )
    return TlsProblem(
        "server_not_trusted",
        f"the server at {address} is not trusted by this site ({message}): its certificate is not from the "
        f"CA in {folder / CA_CERT_FILE}; check the address, or get this federation's folder",
    )


_REFUSAL_WORDS = {
    "CERTIFICATE_EXPIRED": "this site's certificate has expired",
    "UNKNOWN_CA": "this site's certificate is not from the server's CA",
    "CERTIFICATE_REQUIRED": "this site presented no certificate",
    "BAD_CERTIFICATE": "the server does not accept this site's certificate",
    "UNSUPPORTED_CERTIFICATE": "the server does not accept this site's certificate",
    "CERTIFICATE_REVOKED": "this site's certificate was revoked",
}
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_EOF")


def _refused(exc: ssl.SSLError, address: str, folder: Path) -> TlsProblem | None:
    reason = (exc.reason or str(exc)).upper()
    for key, words in _REFUSAL_WORDS.items():
        if key in reason:
            return TlsProblem(
                "site_cert_refused",
                f"the server at {address} refused this site's certificate: {words} "
                f"({folder / CERT_FILE}); ask the coordinator for a new folder (`fedtune certs issue`)",
            )
    if any(key in reason for key in _NOT_TLS):
        return TlsProblem(
            "server_without_tls",
            f"the server at {address} does not speak TLS (is it running with --unsafe-insecure?): "
            "check the address and port",
        )
    return None


def _plaintext_against(raw: socket.socket, host: str, address: str) -> TlsProblem | None:
    """A plaintext client failed: is the server one that requires TLS?"""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only asking whether it speaks TLS at all; nothing is sent
    context.set_alpn_protocols(["h2"])
    try:
        with context.wrap_socket(raw, server_hostname=host):
            pass
    except (ssl.SSLError, OSError):
        return None
    return TlsProblem(
        "server_requires_tls",
        f"the server at {address} requires mutual TLS: pass --certs with this site's folder from "
        "`fedtune certs issue` instead of --unsafe-insecure",
    )
