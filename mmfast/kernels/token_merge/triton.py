"""Triton bipartite token merging: cosine match (row max / argmax) and size-weighted scatter-mean.

* ``_cosine_match``, grid (G, A blocks): a block of A rows against every B row in ``BLOCK_B`` tiles (channels in
  ``BLOCK_C`` chunks), ``a.b / (max(|a|, eps) max(|b|, eps))`` with a running max and the first index reaching it —
  the Na x Nb score matrix never exists. fp32 ``tl.dot`` with ``input_precision="ieee"`` (no tf32: an argmax).
* ``_scatter_mean``, grid (G * n, D blocks): deterministic (no atomics): the source rows are sorted by slot in torch
  (a stable argsort, so each slot sums its rows in source order), each program sums the weighted rows of one slot,
  adds the slot's base row and divides by the total weight.

ToMe (Bolya et al., ICLR 2023) / Turbo bipartite merges, VisionZip's contextual merge and LOOK-M's nearest-kept-key
merge (:mod:`.reference` has the contracts).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmfast.kernels.token_merge.reference import Merged, apply_merge

_EPS = tl.constexpr(1e-12)  # F.normalize's eps


@triton.jit
def _cosine_match(
    a_ptr,
    b_ptr,
    best_ptr,
    idx_ptr,
    NA,
    NB,
    C,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    r_ok = rows < NA
    a_base = a_ptr + g * NA * C
    b_base = b_ptr + g * NB * C
    na = tl.zeros((BLOCK_A,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(a_base + rows[:, None] * C + ch[None, :], mask=r_ok[:, None] & (ch[None, :] < C), other=0.0)
        a = a.to(tl.float32)
        na += tl.sum(a * a, axis=1)
    inv_a = 1.0 / tl.maximum(tl.sqrt(na), _EPS)
    best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
    idx = tl.zeros((BLOCK_A,), tl.int64)
    for b0 in range(0, NB, BLOCK_B):
        cols = b0 + tl.arange(0, BLOCK_B)
        c_ok = cols < NB
        dot = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
        nb = tl.zeros((BLOCK_B,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + tl.arange(0, BLOCK_C)
            a = tl.load(a_base + rows[:, None] * C + ch[None, :], mask=r_ok[:, None] & (ch[None, :] < C), other=0.0)
            b = tl.load(b_base + cols[:, None] * C + ch[None, :], mask=c_ok[:, None] & (ch[None, :] < C), other=0.0)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            dot += tl.dot(a, tl.trans(b), input_precision="ieee")
            nb += tl.sum(b * b, axis=1)
        s = dot * inv_a[:, None] * (1.0 / tl.maximum(tl.sqrt(nb), _EPS))[None, :]
        s = tl.where(c_ok[None, :], s, float("-inf"))
        tile_best = tl.max(s, axis=1)
        tile_idx = tl.min(tl.where(s == tile_best[:, None], cols[None, :], NB), axis=1).to(tl.int64)
        better = tile_best > best  # strict: an earlier tile keeps its index on ties
        idx = tl.where(better, tile_idx, idx)
        best = tl.where(better, tile_best, best)
    tl.store(best_ptr + g * NA + rows, best, mask=r_ok)
    tl.store(idx_ptr + g * NA + rows, idx, mask=r_ok)


def cosine_match_triton(
    a: torch.Tensor, b: torch.Tensor, block_a: int = 32, block_b: int = 32, block_c: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`mmfast.kernels.token_merge.reference.cosine_match` (Nb >= 1)."""
    *lead, na, c = a.shape
    nb = b.shape[-2]
    if nb == 0:
        raise ValueError("cosine_match needs at least one B row")
    g = math.prod(lead)
    ac = a.detach().reshape(g, na, c).contiguous()
    bc = b.detach().reshape(g, nb, c).contiguous()
    best = torch.empty(g, na, dtype=torch.float32, device=a.device)
    idx = torch.empty(g, na, dtype=torch.int64, device=a.device)
    if g and na:
        block_c = min(block_c, max(16, triton.next_power_of_2(c)))
        _cosine_match[(g, triton.cdiv(na, block_a))](
            ac, bc, best, idx, na, nb, c, BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_C=block_c
        )
    return best.reshape(*lead, na), idx.reshape(*lead, na)


@triton.jit
def _scatter_mean(
    x_ptr,
    w_ptr,
    order_ptr,
    start_ptr,
    count_ptr,
    base_ptr,
    bw_ptr,
    mean_ptr,
    tot_ptr,
    D,
    HAS_W: tl.constexpr,
    HAS_BASE: tl.constexpr,
    HAS_BW: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64)  # g * n + j
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dims < D
    start = tl.load(start_ptr + slot)
    count = tl.load(count_ptr + slot)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    wsum = tl.zeros((BLOCK_T,), tl.float32)
    for j0 in range(0, count, BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)
        j_ok = j < count
        src = tl.load(order_ptr + start + j, mask=j_ok, other=0)  # flat source rows, in source order
        if HAS_W:
            w = tl.load(w_ptr + src, mask=j_ok, other=0.0).to(tl.float32)
        else:
            w = tl.where(j_ok, 1.0, 0.0)
        x = tl.load(x_ptr + src[:, None] * D + dims[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32) * w[:, None], axis=0)
        wsum += w
    tot = tl.sum(wsum, axis=0)
    if HAS_BASE:
        base = tl.load(base_ptr + slot * D + dims, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_BW:
            bw = tl.load(bw_ptr + slot).to(tl.float32)
            acc += base * bw
            tot += bw
        else:
            acc += base
            tot += 1.0
    mean = tl.where(tot > 0, acc / tl.where(tot > 0, tot, 1.0), 0.0)
    tl.store(mean_ptr + slot * D + dims, mean, mask=d_ok)
    tl.store(tot_ptr + slot, tot, mask=tl.program_id(1) == 0)


def scatter_mean_triton(
    x: torch.Tensor,
    index: torch.Tensor,
    n: int,
    weight: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
    block_t: int = 16,
    block_d: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`mmfast.kernels.token_merge.reference.scatter_mean`."""
    lead, t, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    g = index.numel() // max(t, 1)
    dev = x.device
    key = (index.reshape(g, t) + torch.arange(g, device=dev)[:, None] * n).flatten()
    order = torch.argsort(key, stable=True)
    count = torch.bincount(key, minlength=g * n)
    start = torch.cumsum(count, 0) - count
    xc = x.detach().reshape(g * t, d).contiguous()
    wc = weight.detach().reshape(g * t).contiguous() if weight is not None else xc
    bc = base.detach().reshape(g * n, d).contiguous() if base is not None else xc
    bwc = base_weight.detach().reshape(g * n).contiguous() if base_weight is not None else xc
    mean = torch.empty(g * n, d, dtype=torch.float32, device=dev)
    tot = torch.empty(g * n, dtype=torch.float32, device=dev)
    if g * n:
        block_d = min(block_d, max(16, triton.next_power_of_2(d)))
        _scatter_mean[(g * n, triton.cdiv(d, block_d))](
            xc, wc, order, start, count, bc, bwc, mean, tot, d,
            HAS_W=weight is not None, HAS_BASE=base is not None, HAS_BW=base_weight is not None,
            BLOCK_T=block_t, BLOCK_D=block_d,
        )  # fmt: skip
    return mean.reshape(*lead, n, d), tot.reshape(*lead, n)


def bipartite_merge_triton(
    x: torch.Tensor,
    size: torch.Tensor,
    anchor: torch.Tensor,
    metric: torch.Tensor | None,
    r: int,
    semantic: torch.Tensor | None = None,
    weight: float = 0.0,
    protect_first: bool = False,
) -> Merged:
    """:func:`mmfast.kernels.token_merge.reference.bipartite_merge` with the scores and the merge in Triton
    (the semantic term is a per-A-row shift: it changes the score, not the partner)."""
    b, t, _ = x.shape
    r = min(r, (t - int(protect_first)) // 2)
    if r <= 0:
        empty = anchor[:, :0]
        return Merged(x, size, anchor, x if metric is None else metric, semantic, empty, empty)
    m = x if metric is None else metric
    node_max, node_idx = cosine_match_triton(m[:, ::2], m[:, 1::2])
    if semantic is not None and weight:
        node_max = node_max - weight * semantic[:, ::2].float()
    if protect_first:
        node_max[:, 0] = -math.inf
        node_idx[:, 0] = 0
    return apply_merge(x, size, anchor, metric, r, semantic, node_max, node_idx, scatter_mean_triton)
