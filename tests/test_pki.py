"""The private CA: chains verify, contents are what gRPC needs, keys stay private, real mutual TLS works."""

from __future__ import annotations

import ipaddress
import stat
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.errors import FedtuneError, PkiError
from fedtune.pki import (
    SERVER_COMMON_NAME,
    Identity,
    check_client_id,
    common_name,
    init_ca,
    issue_client,
    issue_server,
    load_identity,
)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    certs_dir = tmp_path / "certs"
    init_ca(certs_dir)
    return certs_dir


def test_init_writes_the_layout_and_returns_the_ca_certificate(tmp_path):
    certs_dir = tmp_path / "certs"
    assert init_ca(certs_dir) == certs_dir / "ca.pem"
    for name in ("ca.pem", "ca.key", "server/ca.pem", "server/cert.pem", "server/key.pem"):
        assert (certs_dir / name).is_file(), name
    assert (certs_dir / "server/ca.pem").read_bytes() == (certs_dir / "ca.pem").read_bytes()
    assert not (certs_dir / "server/ca.key").exists()


def test_ca_certificate_is_a_self_signed_ca_that_signs_nothing_below_leaves(certs):
    ca = load_cert(certs / "ca.pem")
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_server_certificate_chains_to_the_ca_with_names_ips_and_server_auth(tmp_path):
    certs_dir = tmp_path / "certs"
    init_ca(certs_dir, server_names=["localhost", "fl.example.org"], server_ips=["127.0.0.1", "10.0.0.5"])
    ca, cert = load_cert(certs_dir / "ca.pem"), load_cert(certs_dir / "server/cert.pem")
    cert.verify_directly_issued_by(ca)
    assert common_name(cert.public_bytes(serialization.Encoding.PEM)) == SERVER_COMMON_NAME
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.5"),
    ]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_client_certificate_chains_to_the_ca_with_its_id_and_client_auth(certs):
    folder = issue_client(certs, "site-01")
    assert folder == certs / "clients" / "site-01"
    ca, cert = load_cert(certs / "ca.pem"), load_cert(folder / "cert.pem")
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-01"
    assert common_name((folder / "cert.pem").read_bytes()) == "site-01"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)


def test_key_files_are_0600_and_key_folders_0700(certs):
    folder = issue_client(certs, "site-01")
    for key in (certs / "ca.key", certs / "server/key.pem", folder / "key.pem"):
        assert mode(key) == 0o600, key
    for public in (certs / "ca.pem", folder / "ca.pem", folder / "cert.pem"):
        assert mode(public) == 0o644, public
    for directory in (certs, certs / "server", certs / "clients", folder):
        assert mode(directory) == 0o700, directory
    assert not list(certs.rglob(".*.tmp"))  # no temporary files left behind


def test_second_init_is_refused_and_changes_nothing(certs):
    before = (certs / "ca.key").read_bytes()
    with pytest.raises(PkiError, match=r"ca\.key already exists"):
        init_ca(certs)
    assert (certs / "ca.key").read_bytes() == before


@pytest.mark.parametrize("bad", ["../x", "", "a b", "a" * 65, ".hidden", "x/y", "site\n"])
def test_bad_client_ids_are_refused_naming_the_rule(certs, bad):
    with pytest.raises(PkiError, match="client_id") as info:
        issue_client(certs, bad)
    assert "letters, digits" in str(info.value)
    assert not (certs / "clients").exists() or not any((certs / "clients").iterdir())


@pytest.mark.parametrize("good", ["a", "site-01", "A.b_c-9", "a" * 64])
def test_good_client_ids_pass_unchanged(good):
    assert check_client_id(good) == good


def test_issue_before_init_names_the_command_to_run(tmp_path):
    with pytest.raises(PkiError, match="fedtune certs init"):
        issue_client(tmp_path / "certs", "site-01")
    assert isinstance(PkiError("x"), FedtuneError)


def test_existing_client_is_refused_unless_forced_and_force_gives_a_new_certificate(certs):
    folder = issue_client(certs, "site-01")
    first = load_cert(folder / "cert.pem")
    with pytest.raises(PkiError, match="already exists"):
        issue_client(certs, "site-01")
    assert load_cert(folder / "cert.pem").serial_number == first.serial_number
    issue_client(certs, "site-01", force=True)
    second = load_cert(folder / "cert.pem")
    assert second.serial_number != first.serial_number
    second.verify_directly_issued_by(load_cert(certs / "ca.pem"))
    assert mode(folder / "key.pem") == 0o600
    load_identity(folder)  # the new key matches the new certificate


def test_server_reissue_needs_force(certs):
    first = load_cert(certs / "server/cert.pem").serial_number
    with pytest.raises(PkiError, match="already exists"):
        issue_server(certs)
    issue_server(certs, server_names=["fl.example.org"], server_ips=[], force=True)
    assert load_cert(certs / "server/cert.pem").serial_number != first


def test_bad_server_names_and_ips_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(PkiError, match="server_ips"):
        init_ca(tmp_path / "a", server_ips=["not-an-ip"])
    with pytest.raises(PkiError, match="server_names"):
        init_ca(tmp_path / "b", server_names=["bad name"])
    with pytest.raises(PkiError, match="both empty"):
        init_ca(tmp_path / "c", server_names=[], server_ips=[])
    assert not any(tmp_path.iterdir())


def test_days_and_now_make_an_already_expired_certificate(certs):
    now = datetime.now(UTC)
    folder = issue_client(certs, "late", now=now - timedelta(days=10), days=1)
    cert = load_cert(folder / "cert.pem")
    assert cert.not_valid_after_utc < now
    assert cert.not_valid_before_utc == (now - timedelta(days=10, minutes=5)).replace(microsecond=0)


def test_load_identity_round_trip(certs):
    folder = issue_client(certs, "site-01")
    identity = load_identity(folder)
    assert identity == Identity(
        ca_pem=(certs / "ca.pem").read_bytes(),
        cert_pem=(folder / "cert.pem").read_bytes(),
        key_pem=(folder / "key.pem").read_bytes(),
    )
    assert common_name(load_identity(certs / "server").cert_pem) == SERVER_COMMON_NAME


def test_load_identity_names_the_missing_file_and_the_command(certs):
    folder = issue_client(certs, "site-01")
    (folder / "key.pem").unlink()
    with pytest.raises(PkiError, match=r"key\.pem is missing.*fedtune certs issue site-01"):
        load_identity(folder)
    (certs / "server/cert.pem").unlink()
    with pytest.raises(PkiError, match=r"cert\.pem is missing.*fedtune certs init"):
        load_identity(certs / "server")


def test_load_identity_refuses_a_key_from_another_folder(certs):
    one, two = issue_client(certs, "one"), issue_client(certs, "two")
    (one / "key.pem").write_bytes((two / "key.pem").read_bytes())
    with pytest.raises(PkiError, match="does not belong"):
        load_identity(one)


def test_cli_init_then_issue(tmp_path):
    runner = CliRunner()
    certs_dir = tmp_path / "certs"
    result = runner.invoke(app, ["certs", "init", "--dir", str(certs_dir), "--server-name", "fl.example.org"])
    assert result.exit_code == 0, result.output
    assert "server" in result.output and "ca.key" in result.output
    san = load_cert(certs_dir / "server/cert.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]

    result = runner.invoke(app, ["certs", "issue", "site-01", "--dir", str(certs_dir), "--days", "30"])
    assert result.exit_code == 0, result.output
    assert "site-01" in result.output
    assert common_name(load_identity(certs_dir / "clients/site-01").cert_pem) == "site-01"

    again = runner.invoke(app, ["certs", "init", "--dir", str(certs_dir)])
    assert again.exit_code != 0
    assert isinstance(again.exception, PkiError)


# ---------------------------------------------------------------------------------------------------------
# real mutual TLS through gRPC


def _serve(server_identity: Identity) -> tuple[grpc.Server, int]:
    def echo_peer_cn(request: bytes, context: grpc.ServicerContext) -> bytes:
        return context.auth_context()["x509_common_name"][0]

    handler = grpc.method_handlers_generic_handler(
        "t.T", {"Echo": grpc.unary_unary_rpc_method_handler(echo_peer_cn)}
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[handler])
    credentials = grpc.ssl_server_credentials(
        [(server_identity.key_pem, server_identity.cert_pem)],
        root_certificates=server_identity.ca_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def _call(port: int, client: Identity) -> bytes:
    credentials = grpc.ssl_channel_credentials(client.ca_pem, client.key_pem, client.cert_pem)
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        return channel.unary_unary("/t.T/Echo")(b"", timeout=10)


@pytest.fixture
def two_cas(tmp_path: Path) -> tuple[Path, Path]:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    init_ca(ours)
    init_ca(theirs)
    return ours, theirs


def _served_call(certs_dir: Path, client: Identity) -> bytes:
    server, port = _serve(load_identity(certs_dir / "server"))
    try:
        return _call(port, client)
    finally:
        server.stop(grace=None)


def test_mutual_tls_admits_a_client_of_our_ca_and_sees_its_id(two_cas):
    ours, _ = two_cas
    assert _served_call(ours, load_identity(issue_client(ours, "site-01"))) == b"site-01"


@pytest.mark.parametrize("case", ["client_from_another_ca", "expired_client", "server_from_another_ca"])
def test_mutual_tls_rejects(two_cas, case):
    ours, theirs = two_cas
    good = load_identity(issue_client(ours, "site-01"))
    other = load_identity(issue_client(theirs, "site-02"))
    if case == "client_from_another_ca":  # trusts our server, but our server does not trust it
        client = Identity(ca_pem=good.ca_pem, cert_pem=other.cert_pem, key_pem=other.key_pem)
    elif case == "expired_client":
        expired_at = datetime.now(UTC) - timedelta(days=10)
        client = load_identity(issue_client(ours, "late", now=expired_at, days=1))
    else:  # a valid client that trusts another CA, so our server's certificate fails its check
        client = Identity(ca_pem=other.ca_pem, cert_pem=good.cert_pem, key_pem=good.key_pem)
    with pytest.raises(grpc.RpcError) as info:
        _served_call(ours, client)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
