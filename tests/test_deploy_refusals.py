"""A live server refuses what a peer gets wrong, answers with the right gRPC status, and records it.

One server (real gRPC over loopback with mutual TLS, real SQLite state) serves the whole module. Its one
round stays open while the tests poke it with hand-made protobuf bytes; every site has one role, so the
tests do not disturb each other:
- site-a: the submission checks (each refused, so its task stays open);
- site-h: one correct update and its replay;
- site-b: joins twice while its first session is live;
- site-c: an update whose payload does not decode (which uses up its task);
- site-d, site-f, site-g: the fuzzing; site-e: the join that proves the server survived it.
No test depends on another's having run: when the module is done, the fixture answers every task still
out, so the round closes and the run ends, and checks the round's `refused_messages` against the events
recorded in SQLite, whichever tests ran.
TLS refusals happen in the handshake, before any handler runs: they cannot be recorded, and are checked to
reach no handler.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.deploy.server import STATE_FILE
from fedtune.pki import issue_client
from fedtune.store import REFUSED_EVENT_PREFIX, Store
from fedtune.transport import fedtune_v2_pb2 as pb
from fedtune.transport.channel import Stub, grpc_options, open_channel
from fedtune.transport.wire import PROTOCOL_VERSION, SERVICE, float32_bytes
from tests.deploy_fixtures import RunningServer, deploy_config, make_certs, running_server

SITES = ("site-a", "site-b", "site-c", "site-d", "site-e", "site-f", "site-g", "site-h")
FUZZ_SITES = ("site-d", "site-f", "site-g")  # a task each: a fuzzed update that is taken uses one up
TIMEOUT_S = 20.0
GARBAGE = b"\x0a\x7f\x00"  # field 1, length 127, one byte present: no message type parses it
Code = grpc.StatusCode


@dataclass
class Federation:
    """The module's running server, and the sites' channels and sessions (joined once each)."""

    server: RunningServer
    certs: Path
    store: Store
    channels: dict[str, grpc.Channel] = field(default_factory=dict)
    stubs: dict[str, Stub] = field(default_factory=dict)
    sessions: dict[str, bytes] = field(default_factory=dict)
    tasks: dict[str, tuple[pb.Task, bytes]] = field(default_factory=dict)

    def stub(self, site: str) -> Stub:
        if site not in self.stubs:
            self.channels[site] = open_channel(self.server.target, self.certs / "clients" / site)
            self.stubs[site] = Stub(self.channels[site])
        return self.stubs[site]

    def session(self, site: str, *, again: bool = False) -> bytes:
        if again or site not in self.sessions:
            reply = pb.JoinReply.FromString(self.stub(site).join(join_request(site), timeout=TIMEOUT_S))
            assert reply.protocol_version == PROTOCOL_VERSION and len(reply.session) == 16
            self.sessions[site] = reply.session
        return self.sessions[site]

    def task(self, site: str) -> tuple[pb.Task, bytes]:
        """The site's task in the open round and the global adapter's bytes (asked once per site)."""
        if site not in self.tasks:
            found = poll_task(self.stub(site), self.session(site))
            assert found is not None, f"{site} got no task"
            self.tasks[site] = found
        return self.tasks[site]

    def events(self) -> dict[str, int]:
        return self.store.event_counts()

    def refused(self, kind: str, code: grpc.StatusCode, call: Callable[[], object]) -> grpc.RpcError:
        """`call` fails with `code`, and exactly one event `refused_<kind>` is recorded for it."""
        before = self.events()
        with pytest.raises(grpc.RpcError) as info:
            call()
        error = info.value
        assert error.code() == code, error.details()
        assert error.details().startswith(f"{kind}: "), error.details()
        after = self.events()
        event = f"{REFUSED_EVENT_PREFIX}_{kind}"
        assert after.get(event, 0) == before.get(event, 0) + 1
        assert sum(after.values()) == sum(before.values()) + 1  # that one event, nothing else
        return error


def join_request(client_id: str, version: int = PROTOCOL_VERSION, num_examples: int = 24) -> bytes:
    return pb.JoinRequest(
        protocol_version=version, client_id=client_id, num_examples=num_examples
    ).SerializeToString()


def task_request(session: bytes) -> bytes:
    return pb.TaskRequest(session=session).SerializeToString()


def get_task(stub: Stub, session: bytes) -> list[pb.TaskReply]:
    return [pb.TaskReply.FromString(raw) for raw in stub.get_task(task_request(session), timeout=TIMEOUT_S)]


def poll_task(stub: Stub, session: bytes, within_s: float = 30.0) -> tuple[pb.Task, bytes] | None:
    """Ask until the server hands out a training task: its header and the adapter bytes from the chunks
    after it. An evaluation task (round 0's, before training) is answered with a report on the way."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        replies = get_task(stub, session)
        kind = replies[0].WhichOneof("kind")
        if kind == "task":
            task = replies[0].task
            assert all(r.WhichOneof("kind") == "adapter_chunk" for r in replies[1:])
            adapter = b"".join(r.adapter_chunk for r in replies[1:])
            assert len(adapter) == task.adapter_numel * 4
            if task.kind == pb.TASK_EVALUATE:
                header = pb.UpdateHeader(
                    session=session,
                    round=task.round,
                    nonce=task.nonce,
                    encoding=pb.ENCODING_EVALUATION,
                    eval_nll=10.0,
                    eval_tokens=5,
                )
                assert submit(stub, [pb.UpdateChunk(header=header).SerializeToString()]).accepted
                continue
            return task, adapter
        assert kind == "wait" and len(replies) == 1, replies
        time.sleep(replies[0].wait.retry_after_ms / 1000)
    return None


def header_chunk(**fields: Any) -> bytes:
    return pb.UpdateChunk(header=pb.UpdateHeader(**fields)).SerializeToString()


def data_chunk(raw: bytes) -> bytes:
    return pb.UpdateChunk(data=raw).SerializeToString()


def submit(stub: Stub, messages: list[bytes]) -> pb.SubmitReply:
    return pb.SubmitReply.FromString(stub.submit(iter(messages), timeout=TIMEOUT_S))


def update_fields(fed: Federation, site: str, **changes: Any) -> dict[str, Any]:
    """A correct float32 update header for the site's task, with `changes`."""
    task, _ = fed.task(site)
    fields = {
        "session": fed.session(site),
        "round": task.round,
        "nonce": task.nonce,
        "encoding": pb.ENCODING_FLOAT32,
        "total_bytes": task.adapter_numel * 4,
        "num_examples": 24,
        "num_steps": 2,
        "train_loss": 1.5,
    }
    return fields | changes


def zeros(fed: Federation, site: str) -> bytes:
    return float32_bytes(np.zeros(fed.task(site)[0].adapter_numel, np.float32))


def with_value(fed: Federation, site: str, index: int, value: float) -> bytes:
    values = np.zeros(fed.task(site)[0].adapter_numel, np.float32)
    values[index] = value
    return float32_bytes(values)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("refusals")
    certs = make_certs(root, (*SITES, "site-z"))  # site-z: a certificate from our CA, not on the allow-list
    config = deploy_config(
        root,
        certs,
        SITES,
        "federation.rounds=1",
        "deploy.round_timeout_s=120",
        "deploy.min_connected=1",
        "deploy.session_timeout_s=600",
        "deploy.eval_timeout_s=3",
    )
    with running_server(config) as server:
        store = Store(config.run.resolved_dir / STATE_FILE, create=False)
        fed = Federation(server, certs, store)
        try:
            # refused while the server still waits for its first client: it counts in round 1 too
            with pytest.raises(grpc.RpcError) as info:
                fed.stub("site-a").join(join_request("site-a", version=0), timeout=TIMEOUT_S)
            assert info.value.code() == Code.FAILED_PRECONDITION
            fed.task("site-a")  # the first join opens the round; every site is selected
            yield fed
            close_the_round_and_check_its_counts(fed)
        finally:
            for channel in fed.channels.values():
                channel.close()
            store.close()


# ---- TLS: refused in the handshake ---------------------------------------------------------------------


def handshake_refused(fed: Federation, credentials: grpc.ChannelCredentials) -> None:
    """A Join over `credentials` fails to connect (UNAVAILABLE), and reaches no handler: nothing recorded,
    where a handler would have answered a certificate-less call UNAUTHENTICATED and recorded it."""
    before = fed.events()
    channel = grpc.secure_channel(fed.server.target, credentials, options=grpc_options(1 << 20))
    try:
        with pytest.raises(grpc.RpcError) as info:
            Stub(channel).join(join_request("site-a"), timeout=TIMEOUT_S)
    finally:
        channel.close()
    assert info.value.code() == Code.UNAVAILABLE, info.value.details()
    assert fed.events() == before


def own_ca(fed: Federation) -> bytes:
    return (fed.certs / "ca.pem").read_bytes()


def test_no_client_certificate_is_refused_in_the_handshake(fed):
    handshake_refused(fed, grpc.ssl_channel_credentials(own_ca(fed)))


def test_a_certificate_from_another_ca_is_refused(fed, tmp_path):
    other = make_certs(tmp_path, ("site-a",)) / "clients" / "site-a"
    # the client trusts our CA, so only the server can be the one that refuses
    credentials = grpc.ssl_channel_credentials(
        own_ca(fed), (other / "key.pem").read_bytes(), (other / "cert.pem").read_bytes()
    )
    handshake_refused(fed, credentials)


def test_an_expired_certificate_from_our_ca_is_refused(fed, tmp_path):
    copy = tmp_path / "certs"
    shutil.copytree(fed.certs, copy)
    ten_days_ago = datetime.now(UTC) - timedelta(days=10)
    issue_client(copy, "site-a", now=ten_days_ago, days=1, force=True)
    site = copy / "clients" / "site-a"
    assert (site / "ca.pem").read_bytes() == own_ca(fed)
    credentials = grpc.ssl_channel_credentials(
        own_ca(fed), (site / "key.pem").read_bytes(), (site / "cert.pem").read_bytes()
    )
    handshake_refused(fed, credentials)


# ---- Join ----------------------------------------------------------------------------------------------


def test_a_join_claiming_another_identity_is_refused(fed):
    fed.refused(
        "wrong_identity",
        Code.PERMISSION_DENIED,
        lambda: fed.stub("site-a").join(join_request("site-b"), timeout=TIMEOUT_S),
    )


def test_a_certificate_of_our_ca_not_on_the_allow_list_is_refused(fed):
    error = fed.refused(
        "not_allowed",
        Code.PERMISSION_DENIED,
        lambda: fed.stub("site-z").join(join_request("site-z"), timeout=TIMEOUT_S),
    )
    assert "site-z" in error.details()


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 2**32 - 1])
def test_another_protocol_version_is_refused(fed, version):
    fed.refused(
        "wrong_version",
        Code.FAILED_PRECONDITION,
        lambda: fed.stub("site-e").join(join_request("site-e", version=version), timeout=TIMEOUT_S),
    )


def test_a_second_join_while_the_first_session_is_live_is_refused(fed):
    first = fed.session("site-b")
    for claimed in ("site-b", ""):  # an empty client_id means the certificate's: still site-b
        fed.refused(
            "duplicate_client",
            Code.ALREADY_EXISTS,
            lambda claimed=claimed: fed.stub("site-b").join(join_request(claimed), timeout=TIMEOUT_S),
        )
    assert get_task(fed.stub("site-b"), first)[0].WhichOneof("kind") == "task"  # the first session works


# ---- sessions ------------------------------------------------------------------------------------------


def test_an_unknown_session_is_refused(fed):
    stranger = secrets.token_bytes(16)
    fed.refused(
        "unknown_session",
        Code.UNAUTHENTICATED,
        lambda: get_task(fed.stub("site-a"), stranger),
    )
    fed.refused(
        "unknown_session",
        Code.UNAUTHENTICATED,
        lambda: submit(fed.stub("site-a"), [header_chunk(**update_fields(fed, "site-a", session=stranger))]),
    )


def test_another_clients_session_is_refused(fed):
    session_of_a = fed.session("site-a")
    error = fed.refused(
        "wrong_identity", Code.PERMISSION_DENIED, lambda: get_task(fed.stub("site-b"), session_of_a)
    )
    assert "site-a" in error.details() and "site-b" in error.details()


# ---- malformed protobuf --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_channel(fed: Federation) -> Iterator[grpc.Channel]:
    channel = open_channel(fed.server.target, fed.certs / "clients" / "site-a")
    yield channel
    channel.close()


MALFORMED_CALLS: dict[str, Callable[[grpc.Channel, bytes], object]] = {
    "Join": lambda ch, raw: ch.unary_unary(f"/{SERVICE}/Join")(raw, timeout=TIMEOUT_S),
    "GetTask": lambda ch, raw: list(ch.unary_stream(f"/{SERVICE}/GetTask")(raw, timeout=TIMEOUT_S)),
    "SubmitUpdate": lambda ch, raw: ch.stream_unary(f"/{SERVICE}/SubmitUpdate")(
        iter([raw]), timeout=TIMEOUT_S
    ),
}


@pytest.mark.parametrize("method", list(MALFORMED_CALLS))
@pytest.mark.parametrize("raw", [GARBAGE, b"\xff", b"\x08"], ids=["short", "varint", "no-value"])
def test_malformed_protobuf_is_refused_by_every_method(fed, raw_channel, method, raw):
    fed.refused("malformed", Code.INVALID_ARGUMENT, lambda: MALFORMED_CALLS[method](raw_channel, raw))


@pytest.mark.parametrize(
    ("method", "raw"),
    [("Join", b"\x12\x02\xff\xfe"), ("SubmitUpdate", b"\x0a\x04\x4a\x02\xff\xfe")],
    ids=["client_id", "header.error"],
)
def test_a_string_that_is_not_utf8_is_refused(fed, raw_channel, method, raw):
    fed.refused("malformed", Code.INVALID_ARGUMENT, lambda: MALFORMED_CALLS[method](raw_channel, raw))


def test_an_empty_update_stream_is_refused(fed, raw_channel):
    call = raw_channel.stream_unary(f"/{SERVICE}/SubmitUpdate")
    fed.refused("malformed", Code.INVALID_ARGUMENT, lambda: call(iter([]), timeout=TIMEOUT_S))


# ---- submissions: site-a holds a task and gets every check wrong once ----------------------------------

A, H = "site-a", "site-h"
Case = Callable[[Federation], list[bytes]]
SUBMISSION_CASES: dict[str, tuple[str, grpc.StatusCode, Case]] = {
    "past-round": (
        "stale",
        Code.FAILED_PRECONDITION,
        lambda f: [
            header_chunk(**update_fields(f, A, round=f.task(A)[0].round - 1)),
            data_chunk(zeros(f, A)),
        ],
    ),
    "future-round": (
        "stale",
        Code.FAILED_PRECONDITION,
        lambda f: [
            header_chunk(**update_fields(f, A, round=f.task(A)[0].round + 1)),
            data_chunk(zeros(f, A)),
        ],
    ),
    "wrong-nonce": (
        "replayed",
        Code.FAILED_PRECONDITION,
        lambda f: [
            header_chunk(**update_fields(f, A, nonce=secrets.token_bytes(16))),
            data_chunk(zeros(f, A)),
        ],
    ),
    "no-nonce": (
        "replayed",
        Code.FAILED_PRECONDITION,
        lambda f: [header_chunk(**update_fields(f, A, nonce=b"")), data_chunk(zeros(f, A))],
    ),
    "float32-of-wrong-size": (
        "wrong_shape",
        Code.INVALID_ARGUMENT,
        lambda f: [
            header_chunk(**update_fields(f, A, total_bytes=len(zeros(f, A)) - 4)),
            data_chunk(zeros(f, A)[:-4]),
        ],
    ),
    "nan": (
        "non_finite",
        Code.INVALID_ARGUMENT,
        lambda f: [header_chunk(**update_fields(f, A)), data_chunk(with_value(f, A, 5, np.nan))],
    ),
    "inf": (
        "non_finite",
        Code.INVALID_ARGUMENT,
        lambda f: [header_chunk(**update_fields(f, A)), data_chunk(with_value(f, A, 0, -np.inf))],
    ),
    "declared-over-the-limit": (
        "oversize",
        Code.RESOURCE_EXHAUSTED,
        lambda f: [header_chunk(**update_fields(f, A, encoding=pb.ENCODING_PAYLOAD, total_bytes=1 << 40))],
    ),
    "more-data-than-declared": (
        "oversize",
        Code.RESOURCE_EXHAUSTED,
        lambda f: [header_chunk(**update_fields(f, A)), data_chunk(zeros(f, A)), data_chunk(b"\x00" * 4)],
    ),
    "more-payload-than-declared": (
        "oversize",
        Code.RESOURCE_EXHAUSTED,
        lambda f: [
            header_chunk(**update_fields(f, A, encoding=pb.ENCODING_PAYLOAD, total_bytes=64)),
            data_chunk(bytes(40)),
            data_chunk(bytes(40)),
        ],
    ),
    "truncated": (
        "truncated",
        Code.INVALID_ARGUMENT,
        lambda f: [header_chunk(**update_fields(f, A)), data_chunk(zeros(f, A)[: len(zeros(f, A)) // 2])],
    ),
    "header-only": (
        "truncated",
        Code.INVALID_ARGUMENT,
        lambda f: [header_chunk(**update_fields(f, A))],
    ),
    "data-before-header": (
        "malformed",
        Code.INVALID_ARGUMENT,
        lambda f: [data_chunk(zeros(f, A)), header_chunk(**update_fields(f, A))],
    ),
    "second-header": (
        "malformed",
        Code.INVALID_ARGUMENT,
        lambda f: [header_chunk(**update_fields(f, A)), header_chunk(**update_fields(f, A))],
    ),
    "unspecified-encoding": (
        "malformed",
        Code.INVALID_ARGUMENT,
        lambda f: [
            header_chunk(**update_fields(f, A, encoding=pb.ENCODING_UNSPECIFIED)),
            data_chunk(zeros(f, A)),
        ],
    ),
    "empty-payload": (
        "malformed",
        Code.INVALID_ARGUMENT,
        lambda f: [header_chunk(**update_fields(f, A, encoding=pb.ENCODING_PAYLOAD, total_bytes=0))],
    ),
    "no-training-examples": (
        "malformed",
        Code.INVALID_ARGUMENT,
        lambda f: [header_chunk(**update_fields(f, A, num_examples=0)), data_chunk(zeros(f, A))],
    ),
    "refused-update-with-data": (
        "oversize",
        Code.RESOURCE_EXHAUSTED,
        lambda f: [header_chunk(**update_fields(f, A, encoding=pb.ENCODING_REFUSED, total_bytes=4))],
    ),
}


@pytest.mark.parametrize("case", list(SUBMISSION_CASES))
def test_a_bad_submission_is_refused_and_leaves_the_task_open(fed, case):
    kind, code, messages = SUBMISSION_CASES[case]
    sent = messages(fed)
    fed.refused(kind, code, lambda: submit(fed.stub(A), sent))
    assert participant_status(fed, A) == "sent"  # the task's nonce is not used up


def test_another_clients_submission_is_refused(fed):
    sent = [header_chunk(**update_fields(fed, A)), data_chunk(zeros(fed, A))]
    fed.refused("wrong_identity", Code.PERMISSION_DENIED, lambda: submit(fed.stub("site-b"), sent))


def test_a_payload_that_does_not_decode_is_refused_and_uses_up_the_task(fed):
    rng = np.random.default_rng(7)
    junk = rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
    sent = [
        header_chunk(**update_fields(fed, "site-c", encoding=pb.ENCODING_PAYLOAD, total_bytes=len(junk))),
        data_chunk(junk),
    ]
    fed.refused("invalid_update", Code.INVALID_ARGUMENT, lambda: submit(fed.stub("site-c"), sent))
    assert participant_status(fed, "site-c") == "refused"
    fed.refused("replayed", Code.FAILED_PRECONDITION, lambda: submit(fed.stub("site-c"), sent))


def test_a_correct_update_is_accepted_once_and_its_replay_refused(fed):
    sent = [header_chunk(**update_fields(fed, H)), data_chunk(zeros(fed, H))]
    before = fed.events()
    reply = submit(fed.stub(H), sent)
    assert reply.accepted and reply.detail == "accepted"
    assert fed.events() == before
    assert participant_status(fed, H) == "submitted"
    fed.refused("replayed", Code.FAILED_PRECONDITION, lambda: submit(fed.stub(H), sent))


def participant_status(fed: Federation, site: str) -> str:
    (round_1,) = [r for r in fed.store.rounds() if r.round_num == 1]
    return {p.client_id: p.status for p in round_1.participants}[site]


# ---- fuzzing -------------------------------------------------------------------------------------------

REFUSAL_CODES = {
    Code.INVALID_ARGUMENT,
    Code.FAILED_PRECONDITION,
    Code.PERMISSION_DENIED,
    Code.ALREADY_EXISTS,
    Code.UNAUTHENTICATED,
    Code.RESOURCE_EXHAUSTED,
}


Build = Callable[["FuzzTarget"], bytes]  # a fuzzed message, made when it is sent


@dataclass
class FuzzTarget:
    """The fuzzing site of the moment. A fuzzed update that is taken (or refused after decoding) uses up
    that site's task; the next site's then keeps the fuzzing past the nonce check."""

    fed: Federation
    sites: list[str]

    @property
    def site(self) -> str:
        return self.sites[0]

    def fields(self) -> dict[str, Any]:
        return update_fields(self.fed, self.site)

    def template(self, method: str) -> bytes:
        if method == "Join":
            return join_request(self.site)
        if method == "GetTask":
            return task_request(self.fed.session(self.site))
        return header_chunk(**self.fields())

    def used_up(self) -> None:
        if len(self.sites) > 1:
            self.sites.pop(0)


@st.composite
def byte_mutation(draw: st.DrawFn, method: str) -> Build:
    """The method's valid message with one to three bytes flipped, inserted or deleted."""
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["flip", "insert", "delete"]),
                st.integers(0, 2**16),
                st.integers(0, 7),
                st.binary(min_size=1, max_size=4),
            ),
            min_size=1,
            max_size=3,
        )
    )

    def build(target: FuzzTarget) -> bytes:
        data = bytearray(target.template(method))
        for op, at, bit, extra in ops:
            if op == "insert":
                at %= len(data) + 1
                data[at:at] = extra
            elif data:
                at %= len(data)
                if op == "flip":
                    data[at] ^= 1 << bit
                else:
                    del data[at]
        return bytes(data)

    return build


def header_change(numel: int) -> st.SearchStrategy[Build]:
    """A correct update header with one to three fields replaced, by edge values or random ones."""
    values: dict[str, st.SearchStrategy[Any]] = {
        "session": st.one_of(st.just(b""), st.binary(min_size=16, max_size=16), st.binary(max_size=40)),
        "round": st.one_of(st.sampled_from([0, 2, 2**64 - 1]), st.integers(0, 2**64 - 1)),
        "nonce": st.one_of(st.just(b""), st.binary(min_size=16, max_size=16), st.binary(max_size=40)),
        "encoding": st.integers(0, 8),
        "total_bytes": st.one_of(
            st.sampled_from([0, 1, 4 * numel - 4, 4 * numel + 4, 8 * numel + (1 << 16), 1 << 40]),
            st.integers(0, 2**64 - 1),
        ),
        "num_examples": st.one_of(st.sampled_from([0, 1, 2**64 - 1]), st.integers(0, 2**64 - 1)),
        "num_steps": st.integers(0, 2**32 - 1),
        "train_loss": st.floats(),
        "eval_nll": st.floats(),
        "eval_tokens": st.integers(0, 2**64 - 1),
        "dpsgd_epsilon": st.floats(),
        "error": st.text(max_size=8),
        "fits_clip": st.booleans(),
    }
    names = st.lists(st.sampled_from(sorted(values)), min_size=1, max_size=3, unique=True)
    changes = names.flatmap(lambda chosen: st.fixed_dictionaries({name: values[name] for name in chosen}))
    return changes.map(lambda changed: lambda target: header_chunk(**(target.fields() | changed)))


def join_change() -> st.SearchStrategy[Build]:
    """A Join with a fuzzed version, claimed identity (the site's, none, another's, any) and size."""
    ids = st.one_of(st.sampled_from(["", "site-b", "site-z", "SITE-D"]), st.none(), st.text(max_size=70))
    versions = st.one_of(st.just(PROTOCOL_VERSION), st.integers(0, 2**32 - 1))
    sizes = st.one_of(st.sampled_from([0, 2**64 - 1]), st.integers(0, 2**64 - 1))

    def build(version: int, claimed: str | None, size: int) -> Build:
        return lambda target: join_request(target.site if claimed is None else claimed, version, size)

    return st.builds(build, versions, ids, sizes)


def task_change() -> st.SearchStrategy[Build]:
    """A TaskRequest with the site's session, none, or other bytes."""
    other = st.one_of(st.just(b""), st.binary(min_size=16, max_size=16), st.binary(max_size=40))
    return st.one_of(
        st.just(lambda target: task_request(target.fed.session(target.site))),
        other.map(lambda session: lambda _target: task_request(session)),
    )


def fixed(raw: bytes) -> Build:
    return lambda _target: raw


def test_fuzzed_messages_are_answered_or_refused_and_the_server_stays_up(fed):
    """Random bytes, byte-mutated messages and field-mutated update headers to every method: each call is
    answered or refused with a status a peer's mistake deserves (never INTERNAL or UNKNOWN), each refusal
    is recorded once, and the server keeps serving."""
    target = FuzzTarget(fed, list(FUZZ_SITES))
    numel = fed.task(target.site)[0].adapter_numel
    for site in FUZZ_SITES:
        fed.task(site)  # every fuzzing site holds its task
    good = zeros(fed, target.site)
    fields = {"Join": join_change(), "GetTask": task_change(), "SubmitUpdate": header_change(numel)}
    firsts = {
        method: st.one_of(st.binary(max_size=48).map(fixed), byte_mutation(method), changed, changed)
        for method, changed in fields.items()
    }
    data_chunks = st.one_of(
        st.just(data_chunk(good)),
        st.just(data_chunk(with_value(fed, target.site, 3, np.nan))),
        st.integers(0, len(good)).map(lambda cut: data_chunk(good[:cut])),
        st.binary(max_size=24),
        st.binary(max_size=8).map(data_chunk),
    )
    refusals: dict[str, int] = {}
    before = fed.events()

    def call(method: str, messages: list[bytes]) -> None:
        stub = fed.stub(target.site)
        try:
            if method == "Join":
                reply = pb.JoinReply.FromString(stub.join(messages[0], timeout=TIMEOUT_S))
                fed.sessions[target.site] = reply.session  # a restarted client's join takes over the task
            elif method == "GetTask":
                list(stub.get_task(messages[0], timeout=TIMEOUT_S))
            else:
                stub.submit(iter(messages), timeout=TIMEOUT_S)
                target.used_up()
        except grpc.RpcError as error:
            assert error.code() in REFUSAL_CODES, (method, messages, error.code(), error.details())
            kind = error.details().split(":", 1)[0]
            refusals[kind] = refusals.get(kind, 0) + 1
            if kind == "invalid_update":
                target.used_up()

    @settings(
        max_examples=200,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(sorted(firsts)))
        messages = [data.draw(firsts[method])(target)]
        if method == "SubmitUpdate":
            messages += data.draw(st.lists(data_chunks, max_size=2))
        call(method, messages)

    fuzz()
    after = fed.events()
    recorded = {
        k.removeprefix(f"{REFUSED_EVENT_PREFIX}_"): after[k] - before.get(k, 0)
        for k in after
        if after[k] > before.get(k, 0)
    }
    assert recorded == refusals  # every refusal recorded once, under the kind the peer was told
    assert "internal" not in after
    assert sum(refusals.values()) > 100  # the fuzzing reached the checks, not only the happy path
    assert fed.server.thread.is_alive()
    fed.session("site-e")  # a well-formed join still succeeds


# ---- the round's metrics (the fixture's teardown: it closes the round, which ends the run) --------------


def close_the_round_and_check_its_counts(fed: Federation) -> None:
    """Answer every task still out (site-a's with an update, the others' refused by the client), so the
    round closes and the run ends; its metrics rows count exactly the refusals recorded in SQLite, the one
    made before the round opened included."""
    (round_1,) = [r for r in fed.store.rounds() if r.round_num == 1]
    waiting = [p.client_id for p in round_1.participants if p.status in ("selected", "sent")]
    for site in waiting:
        try:
            get_task(fed.stub(site), fed.session(site))
        except grpc.RpcError as error:  # the fuzzing may have replaced the session by a join of its own
            assert error.code() == Code.UNAUTHENTICATED
            fed.session(site, again=True)
        fed.tasks.pop(site, None)
        if site == A:
            sent = [header_chunk(**update_fields(fed, A)), data_chunk(zeros(fed, A))]
        else:
            refusal = {
                "encoding": pb.ENCODING_REFUSED,
                "total_bytes": 0,
                "num_examples": 0,
                "error": "closing",
            }
            sent = [header_chunk(**update_fields(fed, site, **refusal))]
        assert submit(fed.stub(site), sent).accepted
    fed.server.thread.join(timeout=60)
    assert not fed.server.thread.is_alive()
    assert "error" not in fed.server.result, fed.server.result.get("error")
    before, row = fed.server.rows  # round 0 (site-a evaluated the initial adapter) and round 1
    assert before["round"] == 0 and before["eval_clients"] == 1
    assert row["round"] == 1 and row["round_failed"] is None
    assert A in row["client_ids"]
    assert {c for c in waiting if c != A} <= set(row["failed_clients"])
    if "site-c" not in waiting:  # its payload was refused for not decoding: the reason is kept
        assert row["failures"]["site-c"].startswith("not a version-1 fedtune update payload")
    events = fed.events()
    assert all(kind.startswith(f"{REFUSED_EVENT_PREFIX}_") for kind in events)
    recorded = {kind.removeprefix(f"{REFUSED_EVENT_PREFIX}_"): n for kind, n in events.items()}
    counted = dict(row["refused_messages"])
    for kind, n in before["refused_messages"].items():
        counted[kind] = counted.get(kind, 0) + n
    assert counted == recorded
    assert before["refused_messages"]["wrong_version"] >= 1  # the fixture's, sent before round 0 opened
    statuses = {p.client_id: p.status for p in fed.store.rounds()[-1].participants}
    assert statuses[A] == "submitted" and statuses["site-c"] == "refused"
    assert not {"selected", "sent"} & set(statuses.values())
