"""A site's TLS explained: its folder checked before connecting, and a refused handshake diagnosed against
a real gRPC server with mutual TLS on loopback (port 0)."""

from __future__ import annotations

import shutil
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from fedtune.errors import ConfigError, PkiError
from fedtune.pki import init_ca, issue_client
from fedtune.transport.channel import server_address
from fedtune.transport.site_tls import check_site_folder, diagnose
from fedtune.transport.tls import server_credentials


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "ours")
    issue_client(root / "ours", "site-a")
    init_ca(root / "other")
    issue_client(root / "other", "site-b")
    return root


@pytest.fixture(scope="module")
def tls_server(pki):
    server = grpc.server(futures.ThreadPoolExecutor(2))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(pki / "ours" / "server"))
    server.start()
    yield f"localhost:{port}"
    server.stop(0)


def test_a_good_folder_passes_and_connects(pki, tls_server):
    site = pki / "ours" / "clients" / "site-a"
    assert check_site_folder(site).cert_pem == (site / "cert.pem").read_bytes()
    assert diagnose(tls_server, site) is None


def test_an_expired_or_not_yet_valid_certificate_is_named_with_its_date(pki, tmp_path):
    copy = tmp_path / "ours"
    shutil.copytree(pki / "ours", copy)
    issue_client(copy, "site-a", now=datetime.now(UTC) - timedelta(days=10), days=1, force=True)
    with pytest.raises(PkiError, match=r"cert\.pem expired on .*`fedtune certs issue site-a --force`"):
        check_site_folder(copy / "clients" / "site-a")
    issue_client(copy, "site-a", now=datetime.now(UTC) + timedelta(days=3), days=10, force=True)
    with pytest.raises(PkiError, match=r"valid only from .* clock"):
        check_site_folder(copy / "clients" / "site-a")


def test_a_certificate_not_issued_by_the_folders_ca_is_named(pki, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(pki / "other" / "clients" / "site-b", mixed)
    shutil.copy(pki / "ours" / "ca.pem", mixed / "ca.pem")
    with pytest.raises(PkiError, match="was not issued by the CA in"):
        check_site_folder(mixed)


def test_a_refused_handshake_is_diagnosed_in_words(pki, tls_server, tmp_path):
    other_site = pki / "other" / "clients" / "site-b"
    problem = diagnose(tls_server, other_site)  # the site holds another CA: it cannot trust the server
    assert problem is not None and problem.kind == "server_not_trusted", problem
    expired = tmp_path / "ours"
    shutil.copytree(pki / "ours", expired)
    issue_client(expired, "site-a", now=datetime.now(UTC) - timedelta(days=10), days=1, force=True)
    problem = diagnose(tls_server, expired / "clients" / "site-a")  # the server refuses the site
    assert problem is not None and problem.kind == "site_cert_refused", problem
    problem = diagnose(tls_server, None)  # a plaintext site against a TLS server
    assert problem is not None and problem.kind == "server_requires_tls", problem


def test_a_server_without_tls_and_a_server_not_up(pki):
    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        problem = diagnose(f"localhost:{port}", pki / "ours" / "clients" / "site-a")
        assert problem is not None and problem.kind == "server_without_tls", problem
        assert diagnose(f"localhost:{port}", None) is None  # plaintext to plaintext: no TLS problem
    finally:
        server.stop(0)
    assert diagnose(f"127.0.0.1:{port}", pki / "ours" / "clients" / "site-a") is None  # down: retry it


@pytest.mark.parametrize("bad", ["localhost", "localhost:", "::1", "[::1]", "host:0", "host:70000"])
def test_a_server_address_without_a_port_is_refused_with_the_fix(bad):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        server_address(bad)


def test_server_addresses_with_ports_pass():
    assert server_address("fl.example.org:50051") == "fl.example.org:50051"
    assert server_address("[::1]:443") == "[::1]:443"


def test_a_server_certificate_for_another_name_is_a_name_mismatch(tmp_path):
    init_ca(tmp_path / "named", server_names=["fl.example.org"], server_ips=[])
    issue_client(tmp_path / "named", "site-a")
    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tmp_path / "named" / "server"))
    server.start()
    try:
        problem = diagnose(f"localhost:{port}", tmp_path / "named" / "clients" / "site-a")
    finally:
        server.stop(0)
    assert problem is not None and problem.kind == "name_mismatch", problem
    assert "'localhost'" in problem.message and "--server-name" in problem.message
