"""A private CA and per-party certificates for gRPC with mutual TLS, built with `cryptography` only.

Notable:
- One folder per party, ready to hand out as it is: `server/` and `clients/<client_id>/` each hold
  `ca.pem` (the CA to trust), `cert.pem` and `key.pem`. The CA key `ca.key` stays in `certs_dir` with the
  coordinator and is never part of a handed-out folder.
- Keys are ECDSA P-256 in unencrypted PKCS8 PEM, signatures SHA-256. A key file never exists with looser
  permissions than 0600, even briefly: it is created with mode 0600 (O_CREAT|O_EXCL), written, then moved
  into place. Folders that hold keys are created 0700.
- Nothing is overwritten silently: a second `init_ca` on the same folder, or issuing to an existing client
  or server folder without `force=True`, raises `PkiError`.
- A client's identity is its certificate's subject common name, so client ids are restricted to
  `CLIENT_ID_PATTERN`: safe as a folder name and unambiguous in a CN.
- Certificates start 5 minutes before `now` to tolerate clock skew between hosts; `now` and `days` are
  arguments so tests can make certificates that have already expired.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.errors import PkiError

CLIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # one rule for ids in configs and certificates
SERVER_COMMON_NAME = "fedtune-server"
CA_COMMON_NAME = "fedtune CA"
CLOCK_SKEW = timedelta(minutes=5)
DEFAULT_SERVER_NAMES = ("localhost",)
DEFAULT_SERVER_IPS = ("127.0.0.1", "::1")
DEFAULT_DAYS = 825

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
SERVER_DIR = "server"
CLIENTS_DIR = "clients"

_PUBLIC_MODE = 0o644
_SECRET_MODE = 0o600
_SECRET_DIR_MODE = 0o700
_INIT_COMMAND = "fedtune certs init"


@dataclass(frozen=True)
class Identity:
    """PEM bytes one party needs for mutual TLS."""

    ca_pem: bytes  # the CA certificate to trust
    cert_pem: bytes  # this party's certificate
    key_pem: bytes  # this party's private key (PKCS8, unencrypted)


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


# ---------------------------------------------------------------------------------------------------------
# public API


def check_client_id(client_id: str) -> str:
    """Return `client_id` unchanged if it can name a certificate and a folder; raise PkiError otherwise."""
    if not isinstance(client_id, str) or re.fullmatch(CLIENT_ID_PATTERN, client_id) is None:
        raise PkiError(
            f"client_id = {client_id!r} is not allowed: use 1 to 64 characters from letters, digits, "
            "'.', '_' and '-', starting with a letter or digit (e.g. 'site-01')"
        )
    return client_id


def init_ca(
    certs_dir: Path,
    *,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    server_ips: Sequence[str] = DEFAULT_SERVER_IPS,
    days: int = DEFAULT_DAYS,
    now: datetime | None = None,
) -> Path:
    """Make a new CA in `certs_dir` and the server's folder; return the path of the CA certificate.

    Refuses a folder that already holds a CA or a server folder, so an existing CA is never replaced.
    """
    certs_dir = Path(certs_dir)
    now = _resolve_now(now)
    _check_days(days)
    _san_entries(server_names, server_ips)  # refuse bad names before anything is written
    for existing in (certs_dir / CA_KEY_FILE, certs_dir / CA_CERT_FILE, certs_dir / SERVER_DIR):
        if existing.exists():
            raise PkiError(
                f"{existing} already exists: `{_INIT_COMMAND}` will not replace an existing CA; "
                "use another --dir, or delete the old CA on purpose first"
            )
    key = _new_key()
    cert = _build_ca_cert(key, now=now, days=days)
    _make_private_dir(certs_dir)
    _write_file(certs_dir / CA_KEY_FILE, _key_pem(key), _SECRET_MODE, exclusive=True)
    _write_file(certs_dir / CA_CERT_FILE, _cert_pem(cert), _PUBLIC_MODE, exclusive=True)
    issue_server(certs_dir, server_names=server_names, server_ips=server_ips, days=days, now=now)
    return certs_dir / CA_CERT_FILE


def issue_server(
    certs_dir: Path,
    *,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    server_ips: Sequence[str] = DEFAULT_SERVER_IPS,
    days: int = DEFAULT_DAYS,
    now: datetime | None = None,
    force: bool = False,
) -> Path:
    """Issue the server certificate (CN `fedtune-server`, SAN names and IPs) into `certs_dir/server/`."""
    certs_dir = Path(certs_dir)
    now = _resolve_now(now)
    _check_days(days)
    san = _san_entries(server_names, server_ips)
    issuer = _load_issuer(certs_dir, now)
    key = _new_key()
    builder = _leaf_builder(issuer, key, SERVER_COMMON_NAME, ExtendedKeyUsageOID.SERVER_AUTH, now, days)
    cert = builder.add_extension(x509.SubjectAlternativeName(san), critical=False).sign(
        issuer.key, hashes.SHA256()
    )
    return _write_party(certs_dir / SERVER_DIR, issuer.cert, cert, key, force=force, what="server")


def issue_client(
    certs_dir: Path,
    client_id: str,
    *,
    days: int = DEFAULT_DAYS,
    now: datetime | None = None,
    force: bool = False,
) -> Path:
    """Issue a client certificate with subject CN `client_id` into `certs_dir/clients/<client_id>/`."""
    certs_dir = Path(certs_dir)
    check_client_id(client_id)
    now = _resolve_now(now)
    _check_days(days)
    issuer = _load_issuer(certs_dir, now)
    key = _new_key()
    builder = _leaf_builder(issuer, key, client_id, ExtendedKeyUsageOID.CLIENT_AUTH, now, days)
    cert = builder.sign(issuer.key, hashes.SHA256())
    folder = certs_dir / CLIENTS_DIR / client_id
    return _write_party(folder, issuer.cert, cert, key, force=force, what=f"client {client_id!r}")


def load_identity(directory: Path) -> Identity:
    """Read `ca.pem`, `cert.pem` and `key.pem` of one party's folder and check that key and cert match."""
    directory = Path(directory)
    ca_pem, cert_pem, key_pem = (_read_part(directory, name) for name in (CA_CERT_FILE, CERT_FILE, KEY_FILE))
    _parse_cert(ca_pem, directory / CA_CERT_FILE)
    cert = _parse_cert(cert_pem, directory / CERT_FILE)
    key = _parse_key(key_pem, directory / KEY_FILE)
    if not _same_public_key(cert, key):
        raise PkiError(
            f"{directory / KEY_FILE} does not belong to {directory / CERT_FILE}: "
            f"copy both from the same folder, or re-issue with {_make_hint(directory)}"
        )
    return Identity(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem)


def common_name(cert_pem: bytes) -> str:
    """The subject common name of a PEM certificate (a client's id, or `fedtune-server`)."""
    cert = _parse_cert(cert_pem, "cert_pem")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise PkiError("cert_pem has no subject common name: issue it with `fedtune certs issue CLIENT_ID`")
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


# ---------------------------------------------------------------------------------------------------------
# certificate building


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _build_ca_cert(key: ec.EllipticCurvePrivateKey, *, now: datetime, days: int) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"),
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
        ]
    )
    usage = _key_usage(key_cert_sign=True, crl_sign=True, digital_signature=False)
    return (
        _validity(x509.CertificateBuilder(), now, days)
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_builder(
    issuer: _Issuer,
    key: ec.EllipticCurvePrivateKey,
    cn: str,
    purpose: x509.ObjectIdentifier,
    now: datetime,
    days: int,
) -> x509.CertificateBuilder:
    ca_ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    usage = _key_usage(key_cert_sign=False, crl_sign=False, digital_signature=True)
    return (
        _validity(x509.CertificateBuilder(), now, days)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )


def _validity(builder: x509.CertificateBuilder, now: datetime, days: int) -> x509.CertificateBuilder:
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(now + timedelta(days=days))


def _key_usage(*, key_cert_sign: bool, crl_sign: bool, digital_signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san_entries(server_names: Sequence[str], server_ips: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(server_names, str) or isinstance(server_ips, str):
        raise PkiError("server_names and server_ips must be lists of strings, not one string")
    if not server_names and not server_ips:
        raise PkiError(
            "server_names and server_ips are both empty: give at least one --server-name or --server-ip "
            "that clients will use to reach the server"
        )
    entries: list[x509.GeneralName] = []
    for name in server_names:
        if not name or not name.isascii() or any(ch.isspace() for ch in name):
            raise PkiError(
                f"server_names contains {name!r}: use an ASCII host name such as 'localhost' or "
                "'fl.example.org' (IDN names in their xn-- form)"
            )
        entries.append(x509.DNSName(name))
    for ip in server_ips:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise PkiError(
                f"server_ips contains {ip!r}: use an IPv4 or IPv6 address such as '10.0.0.5' or '::1'"
            ) from None
    return entries


def _resolve_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise PkiError("now is a naive datetime: pass a timezone-aware one, e.g. datetime.now(UTC)")
    return now


def _check_days(days: int) -> None:
    if days < 1:
        raise PkiError(f"days = {days}: a certificate must be valid for at least 1 day")


# ---------------------------------------------------------------------------------------------------------
# loading and parsing


def _load_issuer(certs_dir: Path, now: datetime) -> _Issuer:
    cert_path, key_path = certs_dir / CA_CERT_FILE, certs_dir / CA_KEY_FILE
    for path in (cert_path, key_path):
        if not path.is_file():
            raise PkiError(f"{path} is missing: run `{_INIT_COMMAND} --dir {certs_dir}` first")
    cert = _parse_cert(cert_path.read_bytes(), cert_path)
    key = _parse_key(key_path.read_bytes(), key_path)
    if not _same_public_key(cert, key):
        raise PkiError(f"{key_path} does not belong to {cert_path}: restore the pair made together")
    if now > cert.not_valid_after_utc:
        raise PkiError(
            f"the CA in {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}: "
            f"make a new one with `{_INIT_COMMAND} --dir NEW_DIR` and re-issue every client"
        )
    return _Issuer(cert=cert, key=key)


def _parse_cert(pem: bytes, source: Path | str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise PkiError(f"{source} is not a PEM certificate: re-issue it with `fedtune certs`") from None


def _parse_key(pem: bytes, source: Path | str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise PkiError(
            f"{source} is not an unencrypted PEM private key: re-issue it with `fedtune certs`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{source} is not an ECDSA key: re-issue it with `fedtune certs`")
    return key


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return cert.public_key() == key.public_key()


def _read_part(directory: Path, name: str) -> bytes:
    path = directory / name
    if not path.is_file():
        raise PkiError(f"{path} is missing: make it with {_make_hint(directory)}")
    return path.read_bytes()


def _make_hint(directory: Path) -> str:
    """The command that makes a party's folder, in backticks, guessed from where the folder sits."""
    if directory.name == SERVER_DIR:
        return f"`{_INIT_COMMAND}`"
    if directory.parent.name == CLIENTS_DIR:
        return f"`fedtune certs issue {directory.name} --force`"
    return f"`{_INIT_COMMAND}` (the server) or `fedtune certs issue CLIENT_ID` (a client)"


# ---------------------------------------------------------------------------------------------------------
# writing


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_party(
    folder: Path,
    ca_cert: x509.Certificate,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    force: bool,
    what: str,
) -> Path:
    if folder.exists() and not force:
        raise PkiError(
            f"{folder} already exists: the {what} already has a certificate; "
            "pass force=True (`--force` on the command line) to replace it"
        )
    _make_private_dir(folder)
    _write_file(folder / CA_CERT_FILE, _cert_pem(ca_cert), _PUBLIC_MODE)
    _write_file(folder / KEY_FILE, _key_pem(key), _SECRET_MODE)
    _write_file(folder / CERT_FILE, _cert_pem(cert), _PUBLIC_MODE)
    return folder


def _make_private_dir(folder: Path) -> None:
    """Create `folder` and any missing parents with mode 0700; existing folders are left as they are."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        try:
            path.mkdir(mode=_SECRET_DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else; leave its mode alone
        os.chmod(path, _SECRET_DIR_MODE)  # mkdir's mode is masked by the umask; make it exact


def _write_file(path: Path, data: bytes, mode: int, *, exclusive: bool = False) -> None:
    """Write `data` to `path` with `mode` from the first byte: created with that mode, never widened.

    With `exclusive`, `path` itself is created with O_EXCL (an existing file is an error); otherwise a
    temporary file in the same folder is written and then renamed over `path`.
    """
    target = path if exclusive else path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    except FileExistsError:
        raise PkiError(f"{path} already exists: refusing to overwrite it") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # os.open's mode is masked by the umask; make it exact
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not exclusive:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
