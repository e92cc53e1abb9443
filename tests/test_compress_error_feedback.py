"""Error feedback: the residual is exactly what compression dropped, and the sum sent tracks the sum given."""

import pytest
import torch

from fedtune.compress import CompressionSpec, compress, decode
from fedtune.compress.error_feedback import add_residual, next_residual
from fedtune.round.encode import encode_update

SEED = bytes(range(32))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sent(spec: CompressionSpec, delta: torch.Tensor, seed: int, residual: torch.Tensor | None = None):
    """What the server decodes of the client's encoded update, and the client's next residual."""
    out = encode_update(delta, spec, generator=gen(seed), residual=residual, shared_seed=SEED)
    return decode(out.update.payload, delta.shape[0], seed=SEED), out.residual


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
    residual = None
    for r in range(3):
        delta = torch.randn(2000, generator=gen(r)) * 1e-3
        decoded, new_residual = sent(spec, delta, 100 + r, residual)
        corrected = delta if residual is None else delta + residual
        assert new_residual is not None and torch.equal(new_residual, corrected - decoded)
        residual = new_residual


def test_pure_function_and_parts_agree():
    spec = CompressionSpec("topk", bits=32, fraction=0.1)
    delta, residual = torch.randn(300, generator=gen(1)), torch.randn(300, generator=gen(2))

    corrected = add_residual(delta, residual)
    payload = compress(corrected, spec, generator=gen(3))
    out = encode_update(delta, spec, generator=gen(3), residual=residual)
    assert torch.equal(out.residual, next_residual(corrected, payload.to_dense()))
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
    plain = CompressionSpec(**{**spec.__dict__, "error_feedback": False})
    residual = None
    total_in, total_sent, total_plain = torch.zeros(d), torch.zeros(d), torch.zeros(d)
    norms = []
    for r in range(rounds):
        delta = drift + torch.randn(d, generator=gen(r)) * 1e-3
        decoded, residual = sent(spec, delta, 10_000 + r, residual)
        total_in += delta
        total_sent += decoded
        total_plain += sent(plain, delta, 10_000 + r)[0]
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
