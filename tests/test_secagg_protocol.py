"""The SecAgg+ round end to end: the unmasked mean equals the plaintext one, whoever drops and when.

Also the refusals: below the threshold the round aborts with its reason and no peer's two kinds of share
are ever revealed; clients refuse overlapping or short survivor lists and a second unmasking request; a
tampered or replayed share, or a message from another round or a duplicate, is rejected.
"""

from dataclasses import replace

import numpy as np
import pytest

from fedtune.errors import ConfigError
from fedtune.secagg import (
    FixedPoint,
    ProtocolViolation,
    SecAggAbort,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    SecAggStages,
    Stage,
    neighbour_graph,
    run_secagg_round,
)
from fedtune.secagg.fixedpoint import decode, encode
from fedtune.secagg.messages import AdvertiseKeys, UnmaskRequest, UnmaskResponse

M = 97
CLIP = 0.1
BITS = 16
STEP = 2 * CLIP / (2**BITS - 1)
SEED = bytes(range(32))


def _inputs(n, seed=0, scale=0.03):
    rng = np.random.default_rng(seed)
    vectors = [rng.normal(0.0, scale, M).astype(np.float32) for _ in range(n)]
    weights = [int(w) for w in rng.integers(1, 60, n)]
    return vectors, weights


def _plain_mean(vectors, weights, included):
    total = sum(weights[i] * np.clip(vectors[i].astype(np.float64), -CLIP, CLIP) for i in included)
    return total / sum(weights[i] for i in included)


def _round(vectors, weights, **kwargs):
    kwargs.setdefault("graph_seed", SEED)
    return run_secagg_round(
        vectors, weights, bits=BITS, clip_range=CLIP, rounding_rng=np.random.default_rng(7), **kwargs
    )


DROPS = {3: 1, 10: 2, 50: 3}  # per stage, above the threshold of the default graph


@pytest.mark.parametrize("n", [3, 10, 50])
@pytest.mark.parametrize("stage", [None, *Stage])
def test_mean_equals_plaintext_with_dropouts_at_each_stage(n, stage):
    vectors, weights = _inputs(n, seed=n)
    dropouts = {} if stage is None else {stage: set(range(1, 1 + DROPS[n]))}
    result = _round(vectors, weights, dropouts=dropouts)
    gone = dropouts.get(stage, set()) if stage is not None and stage < Stage.UNMASK else set()
    included = [i for i in range(n) if i not in gone]
    assert list(result.included) == included
    assert result.total_weight == sum(weights[i] for i in included)
    assert np.abs(result.weighted_mean - _plain_mean(vectors, weights, included)).max() <= STEP
    expected = [n] * 4
    if stage is not None:
        for s in range(stage, 4):
            expected[s] -= DROPS[n]
    assert list(result.survivors_per_stage) == expected


@pytest.mark.parametrize("n", [10, 50])
def test_dropouts_at_every_stage_in_one_round(n):
    vectors, weights = _inputs(n, seed=1)
    dropouts = {Stage.ADVERTISE_KEYS: {0}, Stage.SHARE_KEYS: {1}, Stage.MASKED_INPUT: {2}, Stage.UNMASK: {3}}
    result = _round(vectors, weights, dropouts=dropouts)
    assert list(result.survivors_per_stage) == [n - 1, n - 2, n - 3, n - 4]
    assert list(result.included) == list(range(3, n))
    assert np.abs(result.weighted_mean - _plain_mean(vectors, weights, range(3, n))).max() <= STEP
    metrics = result.metrics()
    assert metrics["secagg_survivors"] == [n - 1, n - 2, n - 3, n - 4]
    assert metrics["secagg_bytes_up_per_client"] > 0 and metrics["secagg_server_seconds"] > 0


def test_all_pairs_is_the_original_secagg():
    vectors, weights = _inputs(10, seed=2)
    result = _round(
        vectors, weights, neighbours=9, dropouts={Stage.MASKED_INPUT: {0, 1}, Stage.UNMASK: {2, 3}}
    )
    assert result.neighbours == 9 and result.threshold == 6
    assert np.abs(result.weighted_mean - _plain_mean(vectors, weights, range(2, 10))).max() <= STEP


def test_the_stage_driver_takes_masked_inputs_as_clients_finish_training():
    """The one driver both transports use: clients that drop before sharing keys are never asked for an
    input, one that declines (its training failed) or never sends is a stage-2 dropout, and the sum is
    of the inputs that arrived."""
    vectors, weights = _inputs(8, seed=4)
    spec = FixedPoint(BITS, CLIP, max(weights), 8)
    params = SecAggParams(0, M, 5, 7, spec)
    clients = [SecAggClient(params, i) for i in range(8)]
    stages = SecAggStages(params, range(8), graph_seed=SEED)
    for i in range(8):
        stages.receive(i, clients[i].advertise_keys())
    stages.close_stage()
    for i, msg in stages.outbox.items():
        if i != 0:  # client 0 drops before sharing its keys
            stages.delivered(i)
            stages.receive(i, clients[i].share_keys(msg))
    assert not stages.complete()  # client 0 is still expected
    stages.close_stage()
    assert sorted(stages.outbox) == [1, 2, 3, 4, 5, 6, 7]
    submitted = [2, 3, 4, 6, 7]  # 1 never sends; 5 declines
    for i in submitted:
        payload = encode(vectors[i], weights[i], spec, np.random.default_rng(i))
        stages.receive(i, clients[i].masked_input(stages.outbox[i], payload))
    stages.declined(5)
    with pytest.raises(ProtocolViolation, match="no masked_input message"):
        stages.receive(
            5,
            clients[5].masked_input(stages.outbox[5], encode(vectors[5], 1, spec, np.random.default_rng(0))),
        )
    stages.close_stage()
    assert stages.abort is None and sorted(stages.outbox) == submitted
    for i, msg in stages.outbox.items():
        stages.receive(i, clients[i].unmask(msg))
    stages.close_stage()
    result = stages.result
    assert result is not None and list(result.survivors) == submitted
    mean = decode(result.words, spec).mean
    assert np.abs(mean - _plain_mean(vectors, weights, submitted)).max() <= STEP
    ledger = stages.ledger()
    assert ledger.bytes_up[0] > 0 and ledger.bytes_up[2] - ledger.bytes_up[5] > 4 * (M + 2)
    assert ledger.bytes_down[2] > 0 and ledger.server_seconds > 0


def test_the_stage_driver_aborts_below_the_threshold_with_the_reason():
    _, weights = _inputs(4, seed=5)
    params = SecAggParams(0, M, 3, 3, FixedPoint(BITS, CLIP, max(weights), 4))
    stages = SecAggStages(params, range(4))
    for i in range(2):
        stages.receive(i, SecAggClient(params, i).advertise_keys())
    stages.close_stage()
    assert stages.abort is not None and "threshold is 3" in stages.abort
    assert stages.complete() and stages.outbox == {} and stages.survivors_per_stage == (2,)


def test_out_of_range_values_are_clipped_and_counted():
    vectors, weights = _inputs(10, seed=3, scale=0.1)  # about a third of the values are beyond 0.1
    result = _round(vectors, weights)
    outside = sum(int(np.count_nonzero(np.abs(v) > CLIP)) for v in vectors)
    assert outside > 0 and result.clipped_values == outside
    assert np.abs(result.weighted_mean - _plain_mean(vectors, weights, range(10))).max() <= STEP


def test_overflowing_config_is_refused_before_the_round():
    vectors, _ = _inputs(50)
    with pytest.raises(ConfigError, match=r"secure_aggregation\.bits = 24"):
        run_secagg_round(vectors, [256] * 50, bits=24, clip_range=CLIP, rounding_rng=np.random.default_rng(0))


# -- hand-driven rounds -----------------------------------------------------------------------------


class _Round:
    """A server and its clients, driven by hand so a test can stop, tamper, replay, or inspect clients."""

    def __init__(self, n, *, threshold, neighbours=None, round_id=5):
        self.vectors, self.weights = _inputs(n)
        self.spec = FixedPoint(BITS, CLIP, max(self.weights), n)
        k = n - 1 if neighbours is None else neighbours
        params = SecAggParams(
            round_id=round_id, vector_size=M, threshold=threshold, neighbours=k, encoding=self.spec
        )
        self.server = SecAggServer(params, range(n), graph_seed=SEED)
        self.clients = [SecAggClient(params, i) for i in range(n)]
        self.rng = np.random.default_rng(0)

    def payload(self, i):
        return encode(self.vectors[i], self.weights[i], self.spec, self.rng)

    def stages(self):
        server = self.server
        return [
            (lambda c, _m: c.advertise_keys(), server.receive_keys, server.close_advertise),
            (lambda c, m: c.share_keys(m), server.receive_shares, server.close_share_keys),
            (
                lambda c, m: c.masked_input(m, self.payload(c.client_id)),
                server.receive_masked_input,
                server.close_masked_input,
            ),
            (lambda c, m: c.unmask(m), server.receive_unmask, server.finish),
        ]

    def run(self, dropouts=None, until=Stage.UNMASK):
        """Stages up to `until` included: what the last close returned, or the SecAggAbort."""
        inbox, dropped = dict.fromkeys(range(len(self.clients))), set()
        try:
            for stage, (step, receive, close) in zip(Stage, self.stages(), strict=True):
                dropped |= set((dropouts or {}).get(stage, ()))
                for i, msg in inbox.items():
                    if i not in dropped:
                        receive(step(self.clients[i], msg))
                inbox = close()
                if stage == until:
                    break
        except SecAggAbort as abort:
            return abort
        return inbox


def _no_peer_revealed_twice(clients):
    kinds = {}
    for c in clients:
        for owner, kind in c.revealed.items():
            kinds.setdefault(owner, set()).add(kind)
    return all(len(k) == 1 for k in kinds.values())


# -- below the threshold ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", list(Stage))
def test_below_threshold_aborts_with_reason_and_no_double_reveal(stage):
    round_ = _Round(10, threshold=6)  # all pairs, 5 survive
    outcome = round_.run({stage: {0, 1, 2, 3, 4}})
    assert isinstance(outcome, SecAggAbort)
    assert outcome.stage == stage.label
    assert "only 5 clients" in outcome.reason and "threshold is 6" in outcome.reason
    assert _no_peer_revealed_twice(round_.clients)
    if stage < Stage.UNMASK:
        assert all(not c.revealed for c in round_.clients)


def test_abort_names_the_client_whose_neighbours_dropped():
    graph = neighbour_graph(range(10), 4, SEED)
    round_ = _Round(10, threshold=3, neighbours=4)
    outcome = round_.run({Stage.UNMASK: graph[0]})
    assert isinstance(outcome, SecAggAbort)
    assert "client 0's self-mask seed has 1 shares" in outcome.reason
    assert _no_peer_revealed_twice(round_.clients)


def test_client_with_too_few_surviving_neighbours_is_left_out_not_the_round():
    graph = neighbour_graph(range(10), 4, SEED)
    lost = set(sorted(graph[0])[:3])  # client 0 keeps one neighbour: it cannot reach t = 3 holders
    outcome = _Round(10, threshold=3, neighbours=4).run({Stage.SHARE_KEYS: lost})
    assert not isinstance(outcome, SecAggAbort)
    assert 0 in outcome.excluded and 0 not in outcome.survivors
    assert set(outcome.survivors) == set(range(10)) - lost - set(outcome.excluded)


# -- refusals by clients ---------------------------------------------------------------------------


def test_client_refuses_overlapping_short_or_foreign_lists():
    round_ = _Round(5, threshold=3)
    requests = round_.run(until=Stage.MASKED_INPUT)
    bad = [
        (replace(requests[0], dropped=(1,)), "both as survivors and as dropped"),
        (replace(requests[1], survivors=(0, 1)), "below the threshold"),
        (replace(requests[2], survivors=(0, 1, 3, 4)), "without itself"),
        (replace(requests[3], round_id=6), "round 6"),
        (replace(requests[4], recipient=0), "addressed to client 0"),
    ]
    for client, (request, why) in zip(round_.clients, bad, strict=True):
        with pytest.raises(ProtocolViolation, match=why):
            client.unmask(request)
        with pytest.raises(ProtocolViolation):  # a refusal ends the client's round
            client.unmask(requests[client.client_id])
        assert not client.revealed


def test_client_refuses_a_second_unmask_request():
    round_ = _Round(5, threshold=3)
    requests = round_.run(until=Stage.MASKED_INPUT)
    first = round_.clients[0].unmask(requests[0])
    assert {o for o, _ in first.seed_shares} == {0, 1, 2, 3, 4} and not first.key_shares
    with pytest.raises(ProtocolViolation, match="second unmasking request"):
        round_.clients[0].unmask(UnmaskRequest(5, 0, survivors=(0, 1, 2), dropped=(3, 4)))
    assert set(round_.clients[0].revealed.values()) == {"seed"}


def test_tampered_share_fails_authentication():
    round_ = _Round(4, threshold=3)
    forwarded = round_.run(until=Stage.SHARE_KEYS)
    share = forwarded[0].shares[0]
    flipped = bytearray(share.sealed)
    flipped[-1] ^= 0x80
    tampered = replace(forwarded[0], shares=(replace(share, sealed=bytes(flipped)), *forwarded[0].shares[1:]))
    with pytest.raises(ProtocolViolation, match="fails authentication"):
        round_.clients[0].masked_input(tampered, round_.payload(0))


def test_share_relabelled_with_another_sender_is_rejected():
    round_ = _Round(4, threshold=3)
    forwarded = round_.run(until=Stage.SHARE_KEYS)
    relabel = {0: 2, 2: 0, 3: 3}  # client 1's shares from 0 and 2 swap senders
    swapped = replace(
        forwarded[1], shares=tuple(replace(s, sender=relabel[s.sender]) for s in forwarded[1].shares)
    )
    with pytest.raises(ProtocolViolation, match="fails authentication"):
        round_.clients[1].masked_input(swapped, round_.payload(1))


def test_share_replayed_from_another_round_is_rejected():
    old = _Round(3, threshold=2, round_id=1).run(until=Stage.SHARE_KEYS)
    round_ = _Round(3, threshold=2, round_id=2)
    new = round_.run(until=Stage.SHARE_KEYS)
    replayed = replace(new[0], shares=old[0].shares)  # same sender and receiver ids, round 1's ciphertexts
    with pytest.raises(ProtocolViolation, match="fails authentication"):
        round_.clients[0].masked_input(replayed, round_.payload(0))


def test_client_refuses_a_message_for_another_round():
    round_ = _Round(3, threshold=2, round_id=3)
    keys = round_.run(until=Stage.ADVERTISE_KEYS)
    with pytest.raises(ProtocolViolation, match="round 4"):
        round_.clients[1].share_keys(replace(keys[1], round_id=4))


# -- refusals by the server ------------------------------------------------------------------------


def test_server_rejects_other_round_duplicates_and_strangers():
    round_ = _Round(3, threshold=2, round_id=3)
    server = round_.server
    keys = round_.clients[0].advertise_keys()
    with pytest.raises(ProtocolViolation, match="for round 2, this is round 3"):
        server.receive_keys(replace(keys, round_id=2))
    server.receive_keys(keys)
    with pytest.raises(ProtocolViolation, match="second advertise_keys"):
        server.receive_keys(keys)
    with pytest.raises(ProtocolViolation, match="client 7"):
        server.receive_keys(AdvertiseKeys(3, 7, keys.enc_key, keys.mask_key))
    with pytest.raises(ProtocolViolation, match="outside the unmask stage"):
        server.receive_unmask(UnmaskResponse(3, 0, (), ()))


def test_server_refuses_to_close_a_stage_twice_or_finish_early():
    round_ = _Round(3, threshold=2)
    round_.run(until=Stage.ADVERTISE_KEYS)
    with pytest.raises(ProtocolViolation, match="closing advertise_keys outside"):
        round_.server.close_advertise()
    with pytest.raises(ProtocolViolation, match="finishing outside the unmask stage"):
        round_.server.finish()


def test_server_rejects_revealing_both_shares_and_a_second_response():
    round_ = _Round(5, threshold=3)
    requests = round_.run(until=Stage.MASKED_INPUT)
    response = round_.clients[0].unmask(requests[0])
    with pytest.raises(ProtocolViolation, match="two shares for the same client"):
        round_.server.receive_unmask(replace(response, key_shares=response.seed_shares[:1]))
    round_.server.receive_unmask(response)
    with pytest.raises(ProtocolViolation, match="second unmask message"):
        round_.server.receive_unmask(response)


def test_server_refuses_a_second_or_malformed_masked_input_and_keeps_its_sum():
    round_ = _Round(3, threshold=2)
    server, clients = round_.server, round_.clients
    forwarded = round_.run(until=Stage.SHARE_KEYS)
    masked = [clients[i].masked_input(forwarded[i], round_.payload(i)) for i in range(3)]
    server.receive_masked_input(masked[0])
    with pytest.raises(ProtocolViolation, match="second masked_input"):
        server.receive_masked_input(masked[0])
    with pytest.raises(ProtocolViolation, match="not 99 uint32 words"):
        server.receive_masked_input(replace(masked[1], words=masked[1].words[:-1]))
    for msg in masked[1:]:
        server.receive_masked_input(msg)
    for i, request in server.close_masked_input().items():
        server.receive_unmask(clients[i].unmask(request))
    assert server.finish().words[-2] == sum(round_.weights)
