"""packed_attention: decode attention over ZipVL's mixed-precision packed KV and plain compacted caches.

Interpreter (TRITON_INTERPRET=1, fp32 unless noted): the kernel equals the reference (dequantize + sdpa) tightly
and the reference stays within the quantization error of attention over the unquantized cache. CUDA (skipped
without a GPU): kernel vs reference at real sizes in fp16 / bf16.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit decorates: before any kernel module import

import pytest
import torch
import torch.nn.functional as F

from mmfast.kernels import triton_available
from mmfast.kernels.kv_quant import quantize
from mmfast.kernels.packed_attention import (
    KVPart,
    make_case,
    packed_attention,
    packed_attention_reference,
    segment_parts,
)
from mmfast.models.cache import MixedPrecisionKV

pytestmark = pytest.mark.usefixtures("one_thread")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA + triton")


def _kernel(q, parts, **kw):
    from mmfast.kernels.packed_attention.triton import packed_attention_triton

    return packed_attention_triton(q, parts, block_n=16, **kw)


def _sdpa(q, keys, values):
    """Attention over original (B, Hkv, S, D) keys / values, GQA by repetition; the tail is causal."""
    g = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    nq, s = q.shape[2], keys.shape[2]
    vis = torch.arange(s)[None, :] <= s - nq + torch.arange(nq)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=vis)


def _error_bound(q, keys, values, dk, dv):
    """Per query row, the attention error that quantizing keys / values to (dk, dv) can cause: logits move by at
    most delta = scale * max_j |q . (k_j - k'_j)|, so ||p - p'||_1 <= exp(2 delta) - 1, and
    |o - o'| <= ||p - p'||_1 max|v| + max_j |v_j - v'_j|."""
    g = q.shape[1] // keys.shape[1]
    dkr = (dk - keys).repeat_interleave(g, 1)
    delta = (q @ dkr.transpose(-1, -2)).abs().amax(-1) / q.shape[-1] ** 0.5  # (B, H, Q)
    vmax = values.abs().amax((-1, -2)).repeat_interleave(g, 1)[..., None]
    dvmax = (dv - values).abs().amax((-1, -2)).repeat_interleave(g, 1)[..., None]
    return (torch.exp(2 * delta) - 1) * vmax + dvmax


def _cache(seed, h=2, s=40, d=16, tail=4, per_head=False):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, h, s + tail, d, generator=g), torch.randn(1, h, s + tail, d, generator=g)
    keys[..., 3] += 4  # an outlier key channel (what channel-wise ranges are for)
    if per_head:  # per-head eviction: different high counts per head -> the masked (flat) layout
        high = torch.rand(1, h, s, generator=g) > 0.6
    else:  # ZipVL: one token set per layer -> dense high / low blocks
        high = torch.zeros(1, h, s, dtype=torch.bool)
        high[..., torch.randperm(s, generator=g)[: s // 4]] = True
    return keys, values, high


@needs_triton
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("bits", [(4, 2), (16, 2), (8, 8)])
def test_mixed_precision_segment(per_head, bits):
    """MixedPrecisionKV (channel-wise keys, ZipCache joined-head token-wise values) + a causal float tail, GQA."""
    keys, values, high = _cache(0 if per_head else 1, per_head=per_head)
    s = high.shape[-1]
    seg = MixedPrecisionKV(keys[:, :, :s], values[:, :, :s], high, bits)
    assert (seg.high is not None) == per_head
    parts = [*segment_parts(seg), KVPart(keys[:, :, s:], values[:, :, s:], causal=True)]
    q = torch.randn(1, 4, 3, 16, generator=torch.Generator().manual_seed(2))
    ref = packed_attention_reference(q, parts)
    # the reference is attention over what the cache layer dequantizes (order of entries does not matter)
    dk, dv = seg.dequantize(torch.float32)
    torch.testing.assert_close(ref, _sdpa(q, torch.cat([dk, keys[:, :, s:]], 2), torch.cat([dv, values[:, :, s:]], 2)))
    torch.testing.assert_close(_kernel(q, parts, split=16), ref, atol=2e-6, rtol=1e-5)
    # ... and within the quantization error of attention over the unquantized cache
    if not per_head:  # dense layout: the high entries were regrouped first
        order = torch.argsort((~high).to(torch.int8), dim=-1, stable=True)[..., None].expand(-1, -1, -1, 16)
        keys, values = (
            torch.cat([keys[:, :, :s].gather(2, order), keys[:, :, s:]], 2),
            torch.cat([values[:, :, :s].gather(2, order), values[:, :, s:]], 2),
        )
    full_k, full_v = torch.cat([dk, keys[:, :, s:]], 2), torch.cat([dv, values[:, :, s:]], 2)
    err = (ref - _sdpa(q, keys, values)).abs().amax(-1)
    bound = _error_bound(q, keys, values, full_k, full_v)
    assert (err <= bound + 1e-6).all() and err.max() > 0, (err, bound)
    assert err.max() < (0.02 if bits == (8, 8) else 0.6)


@needs_triton
def test_plain_and_generic_layouts():
    """Float compacted caches (LOOK-M / kv_window, fp32 and fp16 entries), token-wise keys, channel-wise values,
    per-head values, MHA with one query, many splits."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 3, 37, 24, generator=g), torch.randn(2, 3, 37, 24, generator=g)
    q = torch.randn(2, 3, 1, 24, generator=g)
    plain = [KVPart(k[:, :, :20], v[:, :, :20]), KVPart(k[:, :, 20:].half(), v[:, :, 20:].half(), causal=True)]
    ref = packed_attention_reference(q, plain)
    torch.testing.assert_close(
        ref,
        _sdpa(
            q,
            torch.cat([k[:, :, :20], k[:, :, 20:].half().float()], 2),
            torch.cat([v[:, :, :20], v[:, :, 20:].half().float()], 2),
        ),
    )
    torch.testing.assert_close(_kernel(q, plain, split=8), ref, atol=2e-6, rtol=1e-5)
    odd = [
        KVPart(quantize(k, 4, "token"), quantize(v, 2, "channel"), vscale=torch.rand(2, 3, 1, 24, generator=g) + 0.5)
    ]
    torch.testing.assert_close(_kernel(q, odd), packed_attention_reference(q, odd), atol=2e-6, rtol=1e-5)
    # fp16 queries: fp16 tiles into tl.dot (bf16 is wrong in the interpreter; the CUDA test covers it)
    qh, parts = make_case(heads=4, kv_heads=2, queries=2, length=48, dim=16, tail=5, high=0.25, dtype=torch.float16)
    torch.testing.assert_close(_kernel(qh, parts), packed_attention_reference(qh, parts), atol=2e-3, rtol=2e-3)


@needs_triton
def test_dispatch(monkeypatch):
    q, parts = make_case(heads=2, kv_heads=1, queries=1, length=24, dim=16, tail=2, dtype=torch.float32)
    ref = packed_attention(q, parts)  # CPU tensors: the reference
    assert torch.equal(ref, packed_attention_reference(q, parts))
    monkeypatch.setenv("MMFAST_KERNEL_IMPL", "triton")
    torch.testing.assert_close(packed_attention(q, parts), ref, atol=2e-6, rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 4])
def test_cuda_matches_reference(dtype, queries):
    from mmfast.kernels.packed_attention.triton import packed_attention_triton

    q, parts = make_case(device="cuda", dtype=dtype, queries=queries, length=4096, heads=32, kv_heads=8, dim=128)
    ref = packed_attention_reference(q, parts).float()
    out = packed_attention_triton(q, parts).float()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    # the dense-block fp32 reference agrees too (the kernel accumulates in fp32)
    ref32 = packed_attention_reference(q.float(), parts)
    torch.testing.assert_close(out, ref32, atol=2 * tol, rtol=2 * tol)
