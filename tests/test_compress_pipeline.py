"""The encoding pipeline: stage order, decode error within what each method states, and config refusals."""

import numpy as np
import pytest
import torch

from fedtune.compress import (
    CompressionSpec,
    UpdateEncoder,
    check_composable,
    compress,
    decode,
    parse,
    randomk_indices,
    scatter_shared,
)
from fedtune.compress.quantize import Quantized
from fedtune.errors import ConfigError

SEED = bytes(range(32))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lora_like(d: int, seed: int = 0) -> torch.Tensor:
    """N(0, 1e-3) with 5% of the values from a Student t with 2 degrees of freedom (heavy tails)."""
    g = gen(seed)
    normal = torch.randn(d, generator=g)
    chi2 = (torch.randn(d, generator=g) ** 2 + torch.randn(d, generator=g) ** 2) / 2
    heavy = torch.randn(d, generator=g) / chi2.sqrt()
    return torch.where(torch.rand(d, generator=g) < 0.05, heavy, normal) * 1e-3


def test_stages_run_in_order_clip_noise_compress_quantize_mask():
    seen: list[tuple[str, torch.Tensor]] = []

    def clip(v: torch.Tensor) -> torch.Tensor:
        seen.append(("clip", v.clone()))
        return v * 0.5

    def noise(v: torch.Tensor) -> torch.Tensor:
        seen.append(("noise", v.clone()))
        return v + 1.0

    def mask(values: torch.Tensor) -> None:
        seen.append(("mask", values.clone()))

    spec = CompressionSpec("randomk", bits=32, fraction=0.25)
    delta, residual = torch.arange(8.0), torch.full((8,), 2.0)
    out = UpdateEncoder(spec, clip=clip, noise=noise).encode(
        delta, generator=gen(), residual=residual, shared_seed=SEED, mask=mask
    )
    assert [name for name, _ in seen] == ["clip", "noise", "mask"]
    assert torch.equal(seen[0][1], delta + residual)  # the residual is added before the clip
    assert torch.equal(seen[1][1], (delta + residual) * 0.5)
    kept = randomk_indices(SEED, 8, 2)
    sent = (delta + residual) * 0.5 + 1.0
    assert torch.equal(seen[2][1], sent[kept])  # the mask gets only the k values, on shared coordinates
    assert out.payload is None and out.nbytes == 0
    assert out.residual is not None and torch.equal(out.residual, sent - out.decoded)
    assert torch.equal(scatter_shared(seen[2][1], 8, spec, SEED), out.decoded)


def test_stages_left_out_are_skipped_and_the_payload_is_what_the_server_decodes():
    spec = CompressionSpec("topk", bits=8, fraction=0.1, block_size=32)
    delta = lora_like(5000)
    out = UpdateEncoder(spec).encode(delta, generator=gen())
    assert out.payload is not None and out.nbytes == len(out.payload)
    assert torch.equal(decode(out.payload, 5000), out.decoded)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("block_size", [256, None])
def test_quantized_updates_decode_within_one_step(bits, block_size):
    x = lora_like(10_000)
    data = UpdateEncoder(CompressionSpec("quantize", bits=bits, block_size=block_size)).encode(
        x, generator=gen()
    )
    assert data.payload is not None
    q = parse(data.payload, 10_000).values
    assert isinstance(q, Quantized)
    size = 10_000 if block_size is None else block_size
    step = torch.from_numpy(q.step).repeat_interleave(size)[:10_000]
    assert ((decode(data.payload, 10_000) - x).abs() <= step * (1 + 1e-5)).all()


def test_sparse_updates_decode_within_their_stated_error():
    x = lora_like(10_000)
    k = 100
    for bits, tolerance in ((32, 0.0), (16, 2**-11)):
        spec = CompressionSpec("topk", bits=bits, fraction=k / 10_000)
        out = UpdateEncoder(spec).encode(x, generator=gen())
        decoded = decode(out.payload, 10_000)
        kept = decoded != 0
        assert int(kept.sum()) == k
        assert ((decoded[kept] - x[kept]).abs() <= tolerance * x[kept].abs()).all()  # float16: half an ulp
        assert (x[~kept].abs() <= x[kept].abs().min()).all()  # what was dropped is smaller than what was kept
        assert torch.equal(decoded[~kept], torch.zeros(10_000 - k))


def test_randomk_rescales_on_decode_and_needs_the_shared_seed():
    x = lora_like(1000)
    spec = CompressionSpec("randomk", bits=32, fraction=0.1, rescale=True, error_feedback=False)
    out = UpdateEncoder(spec).encode(x, generator=gen(), shared_seed=SEED)
    idx = randomk_indices(SEED, 1000, 100)
    assert torch.equal(out.decoded[idx], x[idx] * 10.0)
    assert out.residual is None
    with pytest.raises(ValueError, match="shared seed"):
        compress(x, spec, generator=gen())


def test_default_size_update_meets_the_byte_targets():
    """The default task's update size: 4-bit per block beats 8x with zstd; top-k 1% far more."""
    d = 921_600
    x = lora_like(d, seed=1)
    raw = 4 * d
    four = UpdateEncoder(CompressionSpec("quantize", bits=4, block_size=1024)).encode(x, generator=gen())
    topk = UpdateEncoder(CompressionSpec("topk", bits=16, fraction=0.01)).encode(x, generator=gen())
    assert raw / four.nbytes > 8.0
    assert raw / topk.nbytes > 100.0
    q = parse(four.payload, d).values
    assert isinstance(q, Quantized) and four.residual is not None
    step = torch.from_numpy(q.step).repeat_interleave(1024)[:d]
    assert (four.residual.abs() <= step * (1 + 1e-5)).all()  # error feedback keeps less than one step


def test_spec_from_the_config_section():
    class Section:  # the fields the lead's pydantic `[compression]` section will have
        method, bits, block_size, fraction = "quantize", 4, "tensor", 0.01
        error_feedback, entropy_coding, rescale = True, False, False

    spec = CompressionSpec.from_config(Section())
    assert spec == CompressionSpec("quantize", bits=4, block_size=None, entropy_coding=False)
    Section.block_size = 1024
    assert CompressionSpec.from_config(Section()).block_size == 1024


def test_spec_refuses_fields_that_cannot_work_naming_them():
    cases = [
        (dict(method="gzip"), "compression.method = 'gzip'"),
        (dict(method="quantize", bits=16), "compression.bits = 16 with method 'quantize'"),
        (dict(method="topk", bits=12), "compression.bits = 12 with method 'topk'"),
        (dict(method="quantize", block_size=0), "compression.block_size = 0"),
        (dict(method="topk", fraction=0.0), "compression.fraction = 0.0"),
        (dict(method="topk", fraction=float("nan")), "compression.fraction = nan"),
        (dict(method="topk", rescale=True, error_feedback=False), "applies to method 'randomk' only"),
        (dict(method="randomk", rescale=True), "compression.error_feedback = true"),
    ]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            CompressionSpec(**fields)


def test_check_composable_refuses_with_the_reason_and_the_fix():
    refusals = [
        (
            CompressionSpec("topk", bits=32),
            dict(secure_aggregation=True),
            ["compression.method = 'topk'", "secure_aggregation.enabled = true", "'randomk'"],
        ),
        (
            CompressionSpec("quantize", bits=8),
            dict(secure_aggregation=True),
            ["compression.bits = 8", "secure_aggregation.bits", "cannot be summed under masks"],
        ),
        (
            CompressionSpec("randomk", bits=16),
            dict(secure_aggregation=True),
            ["compression.bits = 16", "set compression.bits = 32"],
        ),
        (
            CompressionSpec("topk", bits=32),
            dict(server_rule="median"),
            ["server.rule = 'median'", "never sent", "'randomk'"],
        ),
        (
            CompressionSpec("topk", bits=32),
            dict(server_rule="trimmed_mean"),
            ["server.rule = 'trimmed_mean'"],
        ),
        (
            CompressionSpec("randomk", bits=32, rescale=True, error_feedback=False),
            dict(privacy_mode="central"),
            ["compression.rescale = true", "privacy.mode = 'central'", "privacy.clip_l2_norm"],
        ),
    ]
    for spec, context, fragments in refusals:
        with pytest.raises(ConfigError) as info:
            check_composable(spec, **context)
        for fragment in fragments:
            assert fragment in str(info.value)


def test_check_composable_accepts_what_composes_with_notes():
    assert check_composable(CompressionSpec()) == []
    assert check_composable(CompressionSpec("quantize", bits=4), server_rule="median") == []
    assert check_composable(CompressionSpec("randomk", bits=8), server_rule="median") == []
    notes = check_composable(CompressionSpec("randomk", bits=32), secure_aggregation=True)
    assert any("only compression.method = 'randomk' cuts" in n for n in notes)
    assert any("drops after that" in n for n in notes)
    notes = check_composable(CompressionSpec("quantize", bits=8), privacy_mode="central")
    assert len(notes) == 1 and "added before the clip" in notes[0] and "step * sqrt" in notes[0]
    rescaled = CompressionSpec("randomk", bits=32, rescale=True, error_feedback=False)
    # distributed noise is in the secure sum of the k values: the d/k rescale after it is post-processing
    assert len(check_composable(rescaled, secure_aggregation=True, privacy_mode="distributed")) == 1


def test_mask_stage_refuses_what_check_composable_refuses():
    with pytest.raises(ValueError, match="check_composable"):
        UpdateEncoder(CompressionSpec("topk", bits=32)).encode(
            torch.ones(10), generator=gen(), mask=lambda values: None
        )


def test_no_compression_sends_the_delta_exactly():
    x = lora_like(1000)
    out = UpdateEncoder(CompressionSpec("none")).encode(x, generator=gen(), residual=torch.ones(1000))
    assert out.residual is None  # nothing is lost, so no residual is kept (or added)
    assert torch.equal(decode(out.payload, 1000), x)
    assert np.isclose(len(out.payload), 4000, rtol=0.1)
