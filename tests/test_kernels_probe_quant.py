"""Kernels: probe attention (reference vs naive softmax, Triton interpreter vs reference) and KV quantization."""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit decorates: before any kernel module import

import pytest
import torch
import torch.nn.functional as F

from mmfast.kernels import triton_available
from mmfast.kernels.kv_quant import dequantize, pack, quantize, unpack
from mmfast.kernels.probe_attention import probe_attention, probe_attention_reference, visible_counts
from mmfast.models.cache import CompressedLayer, MixedPrecisionKV
from mmfast.types import KVContext

pytestmark = pytest.mark.usefixtures("one_thread")


def naive(q, k, q_pos, k_pos, per_head=False, normalize=False):
    """Full softmax(QK^T/sqrt(d) + causal mask), summed down the columns."""
    g = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(g, dim=1)
    logits = q.float() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    hidden = k_pos[None, :] > q_pos[:, None]
    probs = logits.masked_fill(hidden, float("-inf")).softmax(-1).nan_to_num(0.0)
    out = probs.sum(2)
    if not per_head:
        out = out.reshape(q.shape[0], k.shape[1], g, -1).sum(2)
    if normalize:
        out = out / (~hidden).sum(0).clamp_min(1)
    return out


def _case(seed=0, b=2, h=4, hkv=2, p=11, s=53, d=24, gaps=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, p, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    k_pos = torch.sort(torch.randperm(3 * s, generator=g)[:s]).values if gaps else torch.arange(s)
    q_pos = torch.sort(torch.randperm(int(k_pos.max()) + 1, generator=g)[:p]).values
    return q, k, q_pos, k_pos


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gaps", [False, True])
def test_reference_matches_naive_softmax(per_head, normalize, gaps):
    q, k, q_pos, k_pos = _case(gaps=gaps)
    ref = probe_attention_reference(q, k, q_pos, k_pos, per_head=per_head, normalize=normalize, block=4)
    torch.testing.assert_close(ref, naive(q, k, q_pos, k_pos, per_head, normalize), atol=1e-5, rtol=1e-5)
    if not normalize:  # every probe row that sees a key sums to 1 per head
        rows_seeing = (k_pos[None, :] <= q_pos[:, None]).any(1).sum()
        total = torch.full((q.shape[0],), float(rows_seeing * q.shape[1]))
        assert torch.allclose(ref.sum((1, 2)), total, atol=1e-3)


def test_visible_counts():
    assert visible_counts(torch.tensor([2, 5, 9]), torch.arange(11)).tolist() == [3, 3, 3, 2, 2, 2, 1, 1, 1, 1, 0]


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("per_head", [False, True])
def test_triton_interpreter_matches_reference(monkeypatch, per_head):
    from mmfast.kernels.probe_attention.triton import probe_attention_triton

    q, k, q_pos, k_pos = _case(seed=1, b=1, p=20, s=40, d=20, gaps=True)
    ref = probe_attention_reference(q, k, q_pos, k_pos, per_head=per_head)
    out = probe_attention_triton(q, k, q_pos, k_pos, per_head=per_head, block_p=16, block_s=32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # bf16 inputs (read as fp32 in the kernel) and the dispatcher with MMFAST_KERNEL_IMPL=triton + normalize
    monkeypatch.setenv("MMFAST_KERNEL_IMPL", "triton")
    got = probe_attention(q.bfloat16(), k.bfloat16(), q_pos, k_pos, normalize=True)
    want = probe_attention_reference(q.bfloat16(), k.bfloat16(), q_pos, k_pos, normalize=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# KV quantization
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 13), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == math.ceil(13 * bits / 8)
    assert torch.equal(unpack(packed, bits, 13), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_error_within_half_step(bits, axis, dtype):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(2, 3, 29, 16, generator=g) * 4 + 2).to(dtype)
    x[0, 0, :, 3] *= 30  # an outlier channel
    for mask in (None, torch.rand(2, 3, 29, generator=g) > 0.3):
        qt = quantize(x, bits, axis, mask)
        y = dequantize(qt, torch.float32, mask)
        ref = x.float() if mask is None else x.float()[mask]
        scale = qt.scale.float()
        if axis == "channel" and mask is not None:
            scale = scale.expand(*x.shape)[mask]
        step = scale.expand_as(ref)
        assert ((y - ref).abs() <= step * 0.5 * (1 + 1e-5) + 1e-6).all()
        # the step itself is the range over 2^bits - 1 levels (so the bound is the bit width's)
        rng = (ref.amax(-1, keepdim=True) - ref.amin(-1, keepdim=True)) if axis == "token" else None
        if rng is not None:
            assert torch.allclose(step[..., :1], (rng / ((1 << bits) - 1)).clamp_min(1e-8), rtol=2e-3, atol=1e-6)
        rows = ref.shape[0] if mask is not None else x[..., 0].numel()
        assert qt.codes.numel() == rows * math.ceil(16 * bits / 8)


def test_metadata_is_float16_unless_out_of_range():
    x = torch.randn(2, 8, 16)
    assert quantize(x, 2, "token").scale.dtype == torch.float16
    big = quantize(x * 1e5, 4, "channel")
    assert big.scale.dtype == torch.float32
    assert (dequantize(big, torch.float32) - x * 1e5).abs().max() <= big.scale.float().max() / 2 * 1.001


def test_mixed_precision_segment():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 30, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g)
    high = torch.rand(1, 2, 30, generator=g) > 0.5  # differs per head
    seg = MixedPrecisionKV(keys, values, high, (16, 2))
    k, v = seg.dequantize(torch.float32)
    assert torch.equal(k[high], keys[high]) and torch.equal(v[high], values[high])  # 16 bits: as stored
    assert (k[~high] - keys[~high]).abs().max() < 3 and seg.length == 30
    full = MixedPrecisionKV(keys, values, torch.ones(1, 2, 30, dtype=torch.bool), (16, 2))
    assert torch.equal(full.dequantize(torch.float32)[0], keys) and full.nbytes() == 2 * keys.numel() * 4
    seg42 = MixedPrecisionKV(keys, values, high, (4, 2))
    k4, v4 = seg42.dequantize(torch.float32)
    err_hi, err_lo = (k4 - keys).abs()[high].mean(), (k4 - keys).abs()[~high].mean()
    assert err_hi < err_lo < 1.0
    # bytes: packed codes + float16 scales / mins (keys: per channel of each block; values: per row) + the value
    # channel scales + the per-entry mask
    n_hi, n_lo = int(high.sum()), int((~high).sum())
    codes = (n_hi * 8 + n_lo * 4) * 2
    meta = 2 * (2 * 2 * 16 * 2) + 2 * (n_hi + n_lo) * 2 + 2 * 16 * 2 + high.numel()
    assert seg42.nbytes() == codes + meta < keys.numel() * 8 / 4


class _QuantAll:
    role = "quantize"

    def wants_update(self, ctx: KVContext) -> bool:
        return ctx.phase == "prefill" or ctx.seen % 3 == 0

    def quantize(self, keys, values, ctx):
        seg = MixedPrecisionKV(keys, values, torch.ones(keys.shape[:3], dtype=torch.bool), (8, 8))
        return [seg], keys[:, :, :0], values[:, :, :0]


def test_compressed_layer_reads_quantized_segments():
    layer = CompressedLayer(0, [_QuantAll()], {})
    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(1, 2, 7, 16, generator=g), torch.randn(1, 2, 7, 16, generator=g)
    out_k, _ = layer.update(k0, v0)
    assert torch.equal(out_k, k0)  # the prefill step attends over what it was given
    assert layer.stored_length() == 7 and layer.keys.shape[-2] == 0 and len(layer.segments) == 1
    assert layer.get_mask_sizes(1) == (8, 0)
    k1, v1 = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
    out_k, out_v = layer.update(k1, v1)  # seen = 8: dequantized segment + the new token
    assert out_k.shape[-2] == 8 and torch.equal(out_k[:, :, -1:], k1)
    assert (out_k[:, :, :7] - k0).abs().max() < 0.05
    layer.update(k1, v1)  # seen = 9: re-quantized
    assert len(layer.segments) == 2 and layer.stored_length() == 9
    assert layer.nbytes() == sum(s.nbytes() for s in layer.segments) < 9 * 2 * 2 * 16 * 4


def test_mixed_precision_dense_layout_when_counts_match():
    """One token set for all heads (ZipVL): high / low entries regrouped into dense blocks, no mask stored."""
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 2, 20, 16, generator=g), torch.randn(1, 2, 20, 16, generator=g)
    high = torch.zeros(1, 2, 20, dtype=torch.bool)
    high[..., [1, 4, 9, 13, 19]] = True
    seg = MixedPrecisionKV(keys, values, high, (16, 4))
    k, v = seg.dequantize(torch.float32)
    assert seg.high is None and [p[1] for p in seg.parts] == [None, None]
    assert torch.equal(k[:, :, :5], keys[:, :, [1, 4, 9, 13, 19]])  # high block first, in order, exact
    assert (k[:, :, 5:] - keys[~high].view(1, 2, 15, 16)).abs().max() < 0.5
    # attention over the regrouped entries equals attention over the originals (order does not matter)
    q = torch.randn(1, 2, 1, 16, generator=g)
    ref = F.scaled_dot_product_attention(q, keys, values)
    exact = MixedPrecisionKV(keys, values, high, (16, 16)).dequantize(torch.float32)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, *exact), ref)


def test_dense_values_share_one_range_per_token_across_heads():
    """ZipCache's token-wise value quantization: one (scale, min) per token over all kv heads x D channels."""
    g = torch.Generator().manual_seed(2)
    h, s, d = 3, 20, 16
    keys, values = torch.randn(1, h, s, d, generator=g), torch.randn(1, h, s, d, generator=g)
    values[:, 1] *= 4  # a louder head: its channels are flattened by the per-channel scale before the shared range
    high = torch.zeros(1, h, s, dtype=torch.bool)
    high[..., :5] = True
    seg = MixedPrecisionKV(keys, values, high, (4, 2))
    n_hi, n_lo = 5, s - 5
    codes = 2 * (n_hi * h * d * 4 + n_lo * h * d * 2) // 8
    meta = 2 * (h * d * 2 * 2) + s * 2 * 2 + h * d * 2  # key ranges per channel and block, value ranges per token, c
    assert seg.nbytes() == codes + meta
    _, v = seg.dequantize(torch.float32)
    c = values.abs().amax(dim=-2, keepdim=True).sqrt()
    for bits, lo, hi in ((4, 0, n_hi), (2, n_hi, s)):
        rows = (values / c)[:, :, lo:hi].transpose(1, 2).reshape(hi - lo, h * d)  # one row per token
        step = (rows.amax(-1) - rows.amin(-1)) / (2**bits - 1)  # the shared range's step
        err = ((v[:, :, lo:hi] - values[:, :, lo:hi]) / c).abs().transpose(1, 2).reshape(hi - lo, h * d)
        assert (err <= step[:, None] / 2 * 1.01 + 1e-6).all()


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_dequantize_matches_reference(monkeypatch, bits):
    from mmfast.kernels.kv_quant import dequantize_reference

    x = torch.randn(1, 2, 9, 20, generator=torch.Generator().manual_seed(bits))
    monkeypatch.setenv("MMFAST_KERNEL_IMPL", "triton")
    for axis in ("token", "channel"):
        qt = quantize(x, bits, axis)
        torch.testing.assert_close(dequantize(qt, torch.float32), dequantize_reference(qt, torch.float32))
