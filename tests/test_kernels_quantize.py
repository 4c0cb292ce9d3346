"""kv_quant: the Triton quantize + pack kernel gives the reference's codes, scales and mins bit for bit; dispatch
rule of every kernel (MMFAST_KERNEL_IMPL, GPU_VERIFIED)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit decorates: before any kernel module import

from types import SimpleNamespace

import pytest
import torch

from mmfast.kernels import GPU_VERIFIED, triton_available, use_triton
from mmfast.kernels.kv_quant import dequantize, dequantize_reference, quantize_reference, unpack
from mmfast.models.cache import MixedPrecisionKV

pytestmark = pytest.mark.usefixtures("one_thread")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA + triton")


def _same(a, b):
    assert a.codes.shape == b.codes.shape and a.scale.shape == b.scale.shape and a.scale.dtype == b.scale.dtype
    assert (a.bits, a.axis, a.dim, a.masked) == (b.bits, b.axis, b.dim, b.masked)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_quantize_is_bit_exact(bits, dtype):
    from mmfast.kernels.kv_quant.triton import quantize_triton

    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(2, 3, 37, 21, generator=g) * 3 + 1).to(dtype)  # D = 21: a padded last byte
    x[0, 1, :, 5] *= 40  # an outlier channel
    for axis in ("token", "channel"):
        _same(quantize_triton(x, bits, axis), quantize_reference(x, bits, axis))
    joined = x.transpose(1, 2).reshape(2, 1, 37, 63)  # ZipCache's one token-wise range over all heads
    _same(quantize_triton(joined, bits, "token"), quantize_reference(joined, bits, "token"))


@needs_triton
def test_triton_quantize_edge_cases():
    """Ties round half to even (as torch.round), constant rows (scale clamped to 1e-8, a float16 subnormal after
    rounding up), float32 metadata beyond float16's range or when asked for, a single row."""
    from mmfast.kernels.kv_quant.triton import quantize_triton

    ties = torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.0, 1.0, 2.0, 0.5]])  # 2 bits: scale 1, codes .5 -> even
    qt = quantize_triton(ties, 2, "token")
    _same(qt, quantize_reference(ties, 2, "token"))
    assert dequantize(qt, torch.float32).tolist() == [[0.0, 0.0, 2.0, 2.0, 3.0, 1.0, 2.0, 0.0]]
    cases = [
        (torch.full((3, 5, 8), 0.25), 4, "token", None),
        (torch.full((3, 5, 8), -7.0), 2, "channel", None),
        (torch.randn(2, 6, 16) * 1e5, 4, "channel", None),
        (torch.randn(2, 6, 16) * 1e5, 8, "token", None),
        (torch.randn(2, 6, 16), 2, "token", torch.float32),
        (torch.randn(1, 1, 9), 4, "channel", None),
    ]
    for x, bits, axis, meta in cases:
        _same(quantize_triton(x, bits, axis, meta), quantize_reference(x, bits, axis, meta=meta))


@needs_triton
def test_dispatch_and_cache_segment(monkeypatch):
    """With MMFAST_KERNEL_IMPL=triton a MixedPrecisionKV segment (dense and masked layouts: masked rows take the
    reference) stores the same bytes and reads back the same cache as with torch."""
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 30, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g)
    dense = torch.zeros(1, 2, 30, dtype=torch.bool)
    dense[..., ::3] = True
    per_head = torch.rand(1, 2, 30, generator=g) > 0.5
    import mmfast.kernels.kv_quant.triton as kernels

    calls = []
    spy = kernels.quantize_triton
    monkeypatch.setattr(kernels, "quantize_triton", lambda *a, **k: calls.append(a[2]) or spy(*a, **k))
    for high in (dense, per_head):
        monkeypatch.setenv("MMFAST_KERNEL_IMPL", "torch")
        ref = MixedPrecisionKV(keys, values, high, (4, 2))
        monkeypatch.setenv("MMFAST_KERNEL_IMPL", "triton")
        out = MixedPrecisionKV(keys, values, high, (4, 2))
        assert calls == ["channel", "token"] * 2  # two dense blocks; masked rows (per_head) take the reference
        for (_, _, k1, v1), (_, _, k2, v2) in zip(ref.parts, out.parts):
            _same(k1, k2)
            _same(v1, v2)
        for a, b in zip(ref.dequantize(torch.float32), out.dequantize(torch.float32)):
            torch.testing.assert_close(a, b)


def test_dispatch_rule(monkeypatch):
    """Triton on CUDA only for ops verified on a GPU (none yet), or when forced; torch when forced or on CPU."""
    cuda = SimpleNamespace(is_cuda=True)  # stands for a CUDA tensor (the rule only reads .is_cuda)
    cpu = torch.zeros(1)
    assert set(GPU_VERIFIED) == {"probe_attention", "kv_quant", "packed_attention", "token_merge", "spec_verify"}
    assert not any(GPU_VERIFIED.values())  # docs/kernels.md: "not yet run on a GPU"
    monkeypatch.delenv("MMFAST_KERNEL_IMPL", raising=False)
    assert not use_triton(cuda) and not use_triton(cuda, verified=False) and not use_triton(cpu, verified=True)
    assert use_triton(cuda, verified=True) == triton_available()
    assert not use_triton(cuda, cpu, verified=True) and not use_triton(verified=True)
    monkeypatch.setenv("MMFAST_KERNEL_IMPL", "triton")
    assert use_triton(cpu) == triton_available()
    monkeypatch.setenv("MMFAST_KERNEL_IMPL", "torch")
    assert not use_triton(cuda, verified=True)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_quantize_matches_reference(bits, dtype):
    """Real sizes on the GPU: identical metadata; codes identical except, at most, values whose scaled offset lies
    within float32 rounding of a .5 boundary (documented ties, off by one); dequantize kernel vs reference."""
    from mmfast.kernels.kv_quant.triton import dequantize_triton, quantize_triton

    x = torch.randn(1, 8, 4096, 128, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
    x[..., 7] *= 20
    for axis in ("token", "channel"):
        a, b = quantize_triton(x, bits, axis), quantize_reference(x, bits, axis)
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
        diff = unpack(a.codes, bits, 128).int() - unpack(b.codes, bits, 128).int()
        y = (x.float() - b.zero.float()) / b.scale.float()
        tie = ((y - y.floor()) - 0.5).abs() < 1e-4
        assert diff.abs().max() <= 1 and bool(tie[diff != 0].all())
        # code * scale + min may contract to one FMA in the kernel (torch rounds the product first)
        got, want = dequantize_triton(b, torch.float32), dequantize_reference(b, torch.float32)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def _tensors(out):
    """The tensors of an op's result: a tensor, a NamedTuple or a dataclass (QTensor, Merged)."""
    if torch.is_tensor(out):
        return [out]
    values = out if isinstance(out, tuple) else vars(out).values()
    return [t for t in values if torch.is_tensor(t)]


@needs_triton
@pytest.mark.parametrize(
    ("op", "shape"),
    [
        ("probe_attention", dict(heads=2, kv_heads=1, probes=4, length=24, dim=16)),
        ("kv_quant", dict(heads=1, length=8, dim=16)),
        ("kv_quant", dict(heads=1, length=8, dim=16, op="dequantize", axis="token")),
        ("packed_attention", dict(heads=2, kv_heads=1, length=24, dim=16, tail=2)),
        ("token_merge", dict(tokens=12, dim=16, r=4)),
        ("spec_verify", dict(batch=2, window=3, vocab=40)),
    ],
)
def test_benchmark_entry_points(op, shape):
    """Every op's ``benchmark(impl, device=, dtype=, **shape)`` closure runs both implementations (tiny here)."""
    import importlib

    mod = importlib.import_module(f"mmfast.kernels.{op}")
    outs = [mod.benchmark(impl, device="cpu", dtype=torch.float32, **shape)() for impl in ("torch", "triton")]
    flat = [_tensors(o) for o in outs]
    assert len(flat[0]) == len(flat[1]) > 0
    for a, b in zip(*flat):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-5)
