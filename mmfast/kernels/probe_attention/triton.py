"""Triton probe attention: column sums of causal softmax(Q_probe K^T * scale) without the full matrix.

Two passes, both streaming over key blocks so only (BLOCK_P x BLOCK_S) logits live at a time:

1. ``_row_stats``: per probe query the running max ``m`` and normaliser ``l`` (online softmax);
2. ``_col_sums``: per key block, recompute the logits of every probe query (of every query head of the KV
   group, or of one head with ``per_head``) and accumulate ``exp(x - m) / l`` down the columns. Each program owns
   its key block, so the sums are deterministic (no atomics).

Inputs are read as float32 (``tl.dot`` on bf16 is wrong in the CPU interpreter, and scores are float32 anyway).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": keeps exp(x - m) defined for rows that see no key


@triton.jit
def _row_stats(
    q_ptr,
    k_ptr,
    qpos_ptr,
    kpos_ptr,
    m_ptr,
    l_ptr,
    H,
    HKV,
    P,
    S,
    D,
    scale,
    BLOCK_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    kvh = h // (H // HKV)
    rows = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < P
    q = tl.load(
        q_ptr + (bh * P + rows[:, None]) * D + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D), other=0.0
    ).to(tl.float32)
    qpos = tl.load(qpos_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_P,), _NEG, tl.float32)
    lsum = tl.zeros((BLOCK_P,), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        col_ok = cols < S
        k = tl.load(
            k_ptr + ((b * HKV + kvh) * S + cols[:, None]) * D + dims[None, :],
            mask=col_ok[:, None] & (dims[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        kpos = tl.load(kpos_ptr + cols, mask=col_ok, other=0)
        x = tl.dot(q, tl.trans(k)) * scale
        vis = (kpos[None, :] <= qpos[:, None]) & col_ok[None, :] & row_ok[:, None]
        x = tl.where(vis, x, _NEG)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        e = tl.where(vis, tl.exp(x - m_new[:, None]), 0.0)
        lsum = lsum * tl.exp(m - m_new) + tl.sum(e, axis=1)
        m = m_new
    tl.store(m_ptr + bh * P + rows, m, mask=row_ok)
    tl.store(l_ptr + bh * P + rows, lsum, mask=row_ok)


@triton.jit
def _col_sums(
    q_ptr,
    k_ptr,
    qpos_ptr,
    kpos_ptr,
    m_ptr,
    l_ptr,
    out_ptr,
    H,
    HKV,
    P,
    S,
    D,
    scale,
    PER_HEAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    group = H // HKV
    if PER_HEAD:
        b = pid // H
        h0 = pid % H
        n_heads = 1
    else:
        b = pid // HKV
        h0 = (pid % HKV) * group
        n_heads = group
    kvh = h0 // group
    cols = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    col_ok = cols < S
    dims = tl.arange(0, BLOCK_D)
    k = tl.load(
        k_ptr + ((b * HKV + kvh) * S + cols[:, None]) * D + dims[None, :],
        mask=col_ok[:, None] & (dims[None, :] < D),
        other=0.0,
    ).to(tl.float32)
    kpos = tl.load(kpos_ptr + cols, mask=col_ok, other=0)
    acc = tl.zeros((BLOCK_S,), tl.float32)
    for i in range(0, n_heads):
        bh = b * H + h0 + i
        for p0 in range(0, P, BLOCK_P):
            rows = p0 + tl.arange(0, BLOCK_P)
            row_ok = rows < P
            q = tl.load(
                q_ptr + (bh * P + rows[:, None]) * D + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < D),
                other=0.0,
            ).to(tl.float32)
            qpos = tl.load(qpos_ptr + rows, mask=row_ok, other=-1)
            m = tl.load(m_ptr + bh * P + rows, mask=row_ok, other=0.0)
            lsum = tl.load(l_ptr + bh * P + rows, mask=row_ok, other=1.0)
            x = tl.dot(q, tl.trans(k)) * scale
            vis = (kpos[None, :] <= qpos[:, None]) & col_ok[None, :] & row_ok[:, None]
            prob = tl.where(vis, tl.exp(x - m[:, None]) / tl.maximum(lsum, 1e-30)[:, None], 0.0)
            acc += tl.sum(prob, axis=0)
    tl.store(out_ptr + pid * S + cols, acc, mask=col_ok)


def probe_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    per_head: bool = False,
    block_p: int = 32,
    block_s: int = 64,
) -> torch.Tensor:
    """Same contract as :func:`mmfast.kernels.probe_attention.reference.probe_attention` (unnormalised)."""
    b, h, p, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q = q.contiguous()
    k = k.contiguous()
    q_pos = q_pos.to(device=q.device, dtype=torch.int64).contiguous()
    k_pos = (torch.arange(s, device=q.device) if k_pos is None else k_pos.to(q.device, torch.int64)).contiguous()
    block_d = max(16, triton.next_power_of_2(d))
    m = torch.empty(b * h, p, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    _row_stats[(b * h, triton.cdiv(p, block_p))](
        q, k, q_pos, k_pos, m, lsum, h, hkv, p, s, d, scale, BLOCK_P=block_p, BLOCK_S=block_s, BLOCK_D=block_d
    )
    h_out = h if per_head else hkv
    out = torch.empty(b * h_out, s, dtype=torch.float32, device=q.device)
    _col_sums[(b * h_out, triton.cdiv(s, block_s))](
        q,
        k,
        q_pos,
        k_pos,
        m,
        lsum,
        out,
        h,
        hkv,
        p,
        s,
        d,
        scale,
        PER_HEAD=per_head,
        BLOCK_P=block_p,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
    )
    return out.reshape(b, h_out, s)
