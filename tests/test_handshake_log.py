"""Refused handshakes read from gRPC's log: entries as grpcio 1.85 writes them (taken from a real server
with `GRPC_TRACE=handshaker`), grouped, parsed, and told apart from everything else on stderr."""

from __future__ import annotations

from fedtune.transport.handshake_log import enable_trace, entries, failure_of

PORT = 33609
EXPIRED = [
    "I1201 14:26:31.581367    2346 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: Ssl handshake "
    "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
    "CERTIFICATE_VERIFY_FAILED: certificate has expired: OK\n",
    "=== Source Location Trace: === \n",
    "src/core/util/status_helper.cc:68\n",
    " shutdown=false index=2, args={endpoint=0x7f05fc00d460, args={grpc.experimental.event_engine=0x5572d3f"
    "479e0, grpc.internal.endpoint_local_address=ipv4:127.0.0.1:33609, grpc.internal.endpoint_peer_address="
    "ipv4:127.0.0.1:47164, grpc.internal.security_connector=0x5572d3f46d80}}\n",
]
FAILED_WITH = [
    "I1201 14:26:31.581382    2346 channel_trace.h:396] handshake manager 0x7f05fc019e30: Failed with error: "
    "UNKNOWN: Ssl handshake failed (TSI_PROTOCOL_FAILURE): certificate has expired: OK\n",
    "=== Source Location Trace: === \n",
    "src/core/util/status_helper.cc:68\n",
    "\n",
]
OWN = "2026-12-01 14:32:08,711 fedtune.server WARNING something of fedtune's\n"


def test_an_expired_client_certificate_is_one_refusal_with_the_peer_and_reason():
    grouped = list(entries([*EXPIRED, OWN, *FAILED_WITH, "plain line\n"]))
    # fedtune's own line passes at once, even while gRPC's entry is still open (it ends at the next one)
    assert [is_grpc for is_grpc, _ in grouped] == [False, True, True, False]
    assert grouped[0][1] == [OWN] and grouped[1][1] == EXPIRED
    failures = [failure_of("".join(lines), PORT) for is_grpc, lines in grouped if is_grpc]
    assert failures[1] is None  # the manager's summary of the same failure is not counted again
    failure = failures[0]
    assert failure is not None
    assert failure.peer == "ipv4:127.0.0.1:47164"
    assert failure.reason == "the client's certificate has expired"
    assert "CERTIFICATE_VERIFY_FAILED" in failure.detail and not failure.detail.endswith("OK")


def test_other_ports_successes_and_closed_connections_are_not_refusals():
    entry = "".join(EXPIRED)
    assert failure_of(entry, PORT + 1) is None  # a handshake on another port (a client in this process)
    assert failure_of(entry.replace("error=UNKNOWN: Ssl handshake failed", "error=OK"), PORT) is None
    closed = entry.replace(
        "Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
        "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired",
        "Socket closed",
    )
    assert failure_of(closed, PORT) is None


def test_reasons_in_words():
    def reason(openssl: str) -> str:
        entry = "".join(EXPIRED).replace("CERTIFICATE_VERIFY_FAILED: certificate has expired", openssl)
        failure = failure_of(entry, PORT)
        assert failure is not None
        return failure.reason

    assert reason("WRONG_VERSION_NUMBER: x") == "the client does not speak TLS (a plaintext client)"
    assert reason("PEER_DID_NOT_RETURN_A_CERTIFICATE: x") == "the client presented no certificate"
    assert "not from this federation's CA" in reason(
        "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"
    )
    assert reason("SOMETHING_NEW: x") == "the TLS handshake failed"


def test_enable_trace_keeps_a_users_own_trace():
    environ = {"GRPC_TRACE": "http"}
    enable_trace(environ)
    assert environ == {"GRPC_TRACE": "http,handshaker", "GRPC_VERBOSITY": "INFO"}
    enable_trace(environ)
    assert environ["GRPC_TRACE"] == "http,handshaker"
    debug = {"GRPC_TRACE": "handshakers", "GRPC_VERBOSITY": "DEBUG"}
    enable_trace(debug)  # a similar name is not the tracer; a user's DEBUG verbosity stays
    assert debug == {"GRPC_TRACE": "handshakers,handshaker", "GRPC_VERBOSITY": "DEBUG"}
