"""Triton split-K decode attention reading packed 2/4/8-bit KV codes (or plain float entries) directly.

Two launches per part plus one combine (flash-decoding):

1. ``_split_attn``, grid (B * Hkv, splits): one program per (batch, KV head, stretch of the part's entries)
   holds the G * Q query rows of that KV head (every query head of the group, every query token), streams its
   entries in ``BLOCK_N`` tiles — loads the packed bytes, shifts out the codes and applies ``code * scale + min``
   in registers (channel-wise or token-wise ranges, ZipCache's per-channel value factor at the end), never writing
   a dequantized copy — with an online softmax, and writes its normalised partial output and log-sum-exp;
2. ``_combine``, grid (B * H * Q,): merges the partials of every split of every part (weights ``2^(lse - max)``).

Logits and accumulators are float32; the two matmuls take fp16 / bf16 tiles when q is fp16 / bf16 (as the
reference does after dequantizing to q's dtype) and exact fp32 (``input_precision="ieee"``) when q is fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmfast.kernels.kv_quant.reference import QTensor
from mmfast.kernels.packed_attention.reference import KVPart

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp2(x - m) stays defined for rows that see no entry
_LOG2E = 1.4426950408889634


@triton.jit
def _tile(ptr, s_ptr, z_ptr, rows, row_ok, row_len, col0, meta_ch, dims, D, MODE: tl.constexpr, BITS: tl.constexpr):
    """(BLOCK_N, BLOCK_D) float32 entries of ``rows`` (absolute row indices), channels ``col0 + dims``.

    MODE 0: float rows of ``row_len`` elements; 1: packed codes with a (scale, min) per channel at
    ``meta_ch + dims``; 2: packed codes with a (scale, min) per row. ``row_len`` is in bytes for codes."""
    ok = row_ok[:, None] & (dims[None, :] < D)
    if MODE == 0:
        x = tl.load(ptr + rows[:, None] * row_len + col0 + dims[None, :], mask=ok, other=0.0).to(tl.float32)
    else:
        e = col0 + dims  # element index inside the packed row
        byte = tl.load(ptr + rows[:, None] * row_len + (e // (8 // BITS))[None, :], mask=ok, other=0).to(tl.int32)
        code = ((byte >> ((e % (8 // BITS)) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        if MODE == 1:
            s = tl.load(s_ptr + meta_ch + dims, mask=dims < D, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + meta_ch + dims, mask=dims < D, other=0.0).to(tl.float32)[None, :]
        else:
            s = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            z = tl.load(z_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        x = code * s + z
    return x


@triton.jit
def _split_attn(
    q_ptr,
    k_ptr,
    ks_ptr,
    kz_ptr,
    v_ptr,
    vs_ptr,
    vz_ptr,
    vc_ptr,
    kstart_ptr,
    vstart_ptr,
    vcol_ptr,
    len_ptr,
    o_ptr,
    lse_ptr,
    R,
    QLEN,
    D,
    K_ROW,
    V_ROW,
    SPLIT,
    SPLIT0,
    NSPLIT,
    qk_scale,
    K_MODE: tl.constexpr,
    K_BITS: tl.constexpr,
    V_MODE: tl.constexpr,
    V_BITS: tl.constexpr,
    HAS_VC: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    length = tl.load(len_ptr + bh)
    kstart = tl.load(kstart_ptr + bh)
    vstart = tl.load(vstart_ptr + bh)
    vcol = tl.load(vcol_ptr + bh)
    r = tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    r_ok = r < R
    d_ok = dims < D
    q = tl.load(q_ptr + (bh * R + r[:, None]) * D + dims[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    limit = length - QLEN + r % QLEN  # causal parts: the last entry each query row sees
    meta_ch = bh * D
    m = tl.full((BLOCK_R,), _NEG, tl.float32)
    lsum = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    start = sp * SPLIT
    end = tl.minimum(start + SPLIT, length)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k = _tile(k_ptr, ks_ptr, kz_ptr, kstart + n, n_ok, K_ROW, 0, meta_ch, dims, D, K_MODE, K_BITS)
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        vis = r_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            vis = vis & (n[None, :] <= limit[:, None])
        s = tl.where(vis, s * qk_scale, _NEG)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.where(vis, tl.exp2(s - m_new[:, None]), 0.0)
        lsum = lsum * alpha + tl.sum(p, axis=1)
        v = _tile(v_ptr, vs_ptr, vz_ptr, vstart + n, n_ok, V_ROW, vcol, meta_ch, dims, D, V_MODE, V_BITS)
        if DOT_FP32:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
        acc = acc * alpha[:, None] + pv
        m = m_new
    o = acc / tl.maximum(lsum, 1e-30)[:, None]
    if HAS_VC:
        o = o * tl.load(vc_ptr + meta_ch + dims, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    lse = tl.where(lsum > 0, m + tl.log2(tl.maximum(lsum, 1e-30)), _NEG)
    slot = (bh * NSPLIT + SPLIT0 + sp) * R + r
    tl.store(o_ptr + slot[:, None] * D + dims[None, :], o, mask=r_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + slot, lse, mask=r_ok)


@triton.jit
def _combine(o_ptr, lse_ptr, out_ptr, R, D, NSPLIT, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)  # bh * R + r: the output row (B, H, Q, D) flattened
    bh = row // R
    r = row % R
    dims = tl.arange(0, BLOCK_D)
    mx = tl.full((BLOCK_S,), _NEG, tl.float32)
    for s0 in range(0, NSPLIT, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mx = tl.maximum(mx, tl.load(lse_ptr + (bh * NSPLIT + s) * R + r, mask=s < NSPLIT, other=_NEG))
    top = tl.max(mx, axis=0)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    den = tl.zeros((BLOCK_S,), tl.float32)
    for s0 in range(0, NSPLIT, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < NSPLIT
        slot = (bh * NSPLIT + s) * R + r
        w = tl.where(s_ok, tl.exp2(tl.load(lse_ptr + slot, mask=s_ok, other=_NEG) - top), 0.0)
        o = tl.load(o_ptr + slot[:, None] * D + dims[None, :], mask=s_ok[:, None] & (dims[None, :] < D), other=0.0)
        acc += tl.sum(w[:, None] * o, axis=0)
        den += w
    out = acc / tl.maximum(tl.sum(den, axis=0), 1e-30)
    tl.store(out_ptr + row * D + dims, out.to(out_ptr.dtype.element_ty), mask=dims < D)


def _operand(t: torch.Tensor | QTensor) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(mode, bits, data, scale, min, row length) of a float tensor or a QTensor."""
    if isinstance(t, QTensor):
        codes = t.codes.contiguous()
        mode = 1 if t.axis == "channel" else 2
        return mode, t.bits, codes, t.scale.contiguous(), t.zero.contiguous(), codes.shape[-1]
    data = t.contiguous()
    return 0, 8, data, data, data, data.shape[-1]


def _plan(n: int, bh: int, parts: int, block_n: int, split: int | None, target: int) -> tuple[int, int]:
    """(entries per split, splits) for a part of at most ``n`` entries per (batch, KV head)."""
    if split is None:
        want = max(1, min(triton.cdiv(n, block_n), triton.cdiv(target, bh * parts)))
        split = triton.cdiv(triton.cdiv(n, want), block_n) * block_n
    return split, triton.cdiv(n, split)


def packed_attention_triton(
    q: torch.Tensor,
    parts: list[KVPart],
    *,
    scale: float | None = None,
    block_n: int = 64,
    split: int | None = None,
    target_programs: int = 256,
) -> torch.Tensor:
    """Same contract as :func:`mmfast.kernels.packed_attention.reference.packed_attention`; ``split`` fixes the
    entries per split (default: enough splits for about ``target_programs`` programs in all). Query rows that see
    no entry at all get zeros (the reference gives NaN)."""
    b, h, nq, d = q.shape
    parts = [p for p in parts if p.geometry()[2] > 0]
    if not parts:
        raise ValueError("packed_attention needs at least one non-empty part")
    hkv = parts[0].geometry()[1]
    if h % hkv:
        raise ValueError(f"{h} query heads do not split into {hkv} KV heads")
    rows = (h // hkv) * nq
    sm = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q = q.contiguous()
    dev = q.device
    bh = b * hkv
    plans = []
    for part in parts:
        pb, ph, n, pd = part.geometry()
        if (pb, ph, pd) != (b, hkv, d):
            raise ValueError(f"part of geometry {(pb, ph, n, pd)} does not match q {tuple(q.shape)} / {hkv} KV heads")
        plans.append(_plan(n, bh, len(parts), block_n, split, target_programs))
    nsplit = sum(p[1] for p in plans)
    o = torch.empty(bh, nsplit, rows, d, dtype=torch.float32, device=dev)
    lse = torch.empty(bh, nsplit, rows, dtype=torch.float32, device=dev)
    block_d = max(16, triton.next_power_of_2(d))
    ids = torch.arange(bh, device=dev)
    split0 = 0
    for part, (per, count) in zip(parts, plans):
        n = part.geometry()[2]
        lengths = part.lengths().reshape(bh).to(device=dev, dtype=torch.int64)
        if part.mask is not None:
            kstart = torch.cumsum(lengths, 0) - lengths
            vstart, vcol = kstart, torch.zeros_like(lengths)
        elif part.joined_values():
            kstart, vstart, vcol = ids * n, (ids // hkv) * n, (ids % hkv) * d
        else:
            kstart = ids * n
            vstart, vcol = kstart, torch.zeros_like(kstart)
        k_mode, k_bits, k, ks, kz, k_row = _operand(part.k)
        v_mode, v_bits, v, vs, vz, v_row = _operand(part.v)
        vc = part.vscale.contiguous() if part.vscale is not None else v
        _split_attn[(bh, count)](
            q, k, ks, kz, v, vs, vz, vc, kstart, vstart, vcol, lengths, o, lse,
            rows, nq, d, k_row, v_row, per, split0, nsplit, sm * _LOG2E,
            K_MODE=k_mode, K_BITS=k_bits, V_MODE=v_mode, V_BITS=v_bits, HAS_VC=part.vscale is not None,
            CAUSAL=part.causal, DOT_FP32=q.dtype == torch.float32,
            BLOCK_R=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
        split0 += count
    out = torch.empty_like(q)
    _combine[(bh * rows,)](
        o, lse, out, rows, d, nsplit, BLOCK_S=min(64, triton.next_power_of_2(nsplit)), BLOCK_D=block_d
    )
    return out
