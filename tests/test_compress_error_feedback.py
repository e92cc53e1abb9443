"""Error feedback: the residual is exactly what compression dropped, and the sum sent tracks the sum given."""

import pytest
import torch

from fedtune.compress import CompressionSpec, ResidualStore, UpdateEncoder, compress, with_error_feedback
from fedtune.compress.error_feedback import add_residual, next_residual

SEED = bytes(range(32))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "spec",
    [
        CompressionSpec("topk", bits=32, fraction=0.05),
        CompressionSpec("topk", bits=8, fraction=0.05, block_size=16),
        CompressionSpec("randomk", bits=16, fraction=0.05),
        CompressionSpec("quantize", bits=4, block_size=64),
    ],
    ids=["topk-f32", "topk-8bit", "randomk-f16", "quantize-4bit"],
)
def test_residual_is_exactly_what_compression_dropped(spec):
    encoder = UpdateEncoder(spec)
    residual = None
    for r in range(3):
        delta = torch.randn(2000, generator=gen(r)) * 1e-3
        out = encoder.encode(delta, generator=gen(100 + r), residual=residual, shared_seed=SEED)
        corrected = delta if residual is None else delta + residual
        assert out.residual is not None and torch.equal(out.residual, corrected - out.decoded)
        residual = out.residual


def test_pure_function_and_parts_agree():
    spec = CompressionSpec("topk", bits=32, fraction=0.1)
    delta, residual = torch.randn(300, generator=gen(1)), torch.randn(300, generator=gen(2))

    def codec(v: torch.Tensor) -> tuple[object, torch.Tensor]:
        payload = compress(v, spec, generator=gen(3))
        return payload, payload.to_dense()

    payload, new_residual = with_error_feedback(delta, residual, codec)
    corrected = add_residual(delta, residual)
    assert torch.equal(new_residual, next_residual(corrected, payload.to_dense()))
    assert torch.equal(add_residual(delta, None), delta)
    with pytest.raises(ValueError, match="shape"):
        add_residual(delta, torch.zeros(3))


@pytest.mark.parametrize(
    "spec",
    [CompressionSpec("topk", bits=32, fraction=0.02), CompressionSpec("quantize", bits=2, block_size=100)],
    ids=["topk-2%", "quantize-2bit"],
)
def test_sum_of_decoded_updates_tracks_the_sum_of_inputs(spec):
    """With a drift shared by all rounds, error feedback sends it; top-k without it drops a share forever."""
    d, rounds = 2000, 200
    drift = torch.randn(d, generator=gen(7)) * 1e-4
    encoder = UpdateEncoder(spec)
    plain = UpdateEncoder(CompressionSpec(**{**spec.__dict__, "error_feedback": False}))
    residual = None
    total_in, total_sent, total_plain = torch.zeros(d), torch.zeros(d), torch.zeros(d)
    norms = []
    for r in range(rounds):
        delta = drift + torch.randn(d, generator=gen(r)) * 1e-3
        out = encoder.encode(delta, generator=gen(10_000 + r), residual=residual)
        residual = out.residual
        total_in += delta
        total_sent += out.decoded
        total_plain += plain.encode(delta, generator=gen(10_000 + r)).decoded
        norms.append(float(residual.norm()))
        # the tracking identity: what has not been sent yet is exactly the residual
        torch.testing.assert_close(total_in - total_sent, residual, rtol=0, atol=1e-5)
    one_delta = float((drift + torch.randn(d, generator=gen(0)) * 1e-3).norm())
    assert max(norms) < 10 * one_delta  # bounded
    assert max(norms[rounds // 2 :]) < 1.5 * max(norms[: rounds // 2])  # not growing
    error_ef = float((total_in - total_sent).norm() / total_in.norm())
    error_plain = float((total_in - total_plain).norm() / total_in.norm())
    assert error_ef < 0.2
    if spec.method == "topk":
        assert error_plain > 0.6 and error_ef < error_plain / 4


def test_residual_store_keeps_float32_exactly_per_client():
    store = ResidualStore()
    assert store.get("a") is None and len(store) == 0
    r = torch.randn(1000, generator=gen(3))
    store.put("a", r)
    r += 1  # the store keeps its own copy
    got = store.get("a")
    assert got is not None and torch.equal(got + 1, r)
    assert store.nbytes == 4000 and len(store) == 1
    store.discard("a")
    store.discard("never-seen")
    assert store.get("a") is None and store.nbytes == 0


def test_residual_store_in_float16_halves_the_memory():
    store = ResidualStore(torch.float16)
    r = torch.randn(1000, generator=gen(4))
    store.put("a", r)
    got = store.get("a")
    assert got is not None and got.dtype == torch.float32 and store.nbytes == 2000
    torch.testing.assert_close(got, r, rtol=1e-3, atol=1e-7)
    with pytest.raises(ValueError, match="float32 or float16"):
        ResidualStore(torch.int8)
