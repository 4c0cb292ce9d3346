"""Triton speculative verification: one launch per step, one program per batch row.

Each program gathers ``p_k(x_k)`` / ``q_k(x_k)`` (or the given ``px`` / ``qx``) for the K drafts, tests them
against the uniforms and takes the first rejection ``a``; then streams the row it samples from (``p_a`` minus
``q_a`` — or minus the draft's point mass — clamped at 0 after a rejection, ``p_K`` for the bonus) in ``BLOCK_V``
tiles twice: the mass (and, for the fallback, the target's mass), then the inverse CDF with a running prefix sum
(``tl.cumsum`` per tile). Both passes build the prefix the same way, so the threshold ``u * total`` uses exactly
the total the search walks. The reference's ``torch.cumsum`` rounds its partial sums differently: a uniform
landing within float32 rounding of a CDF step may pick the neighbouring token (probability ~1e-7 per draw).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.kernels.spec_verify.reference import Verdict


@triton.jit
def _weights(p_ptr, q_ptr, prow, qrow, j, j_ok, xa, USE_RES, RES_MODE, HAS_Q: tl.constexpr):
    """Sampling weights of entries ``j``: max(0, p - q) in residual mode, p otherwise."""
    pv = tl.load(p_ptr + prow + j, mask=j_ok, other=0.0).to(tl.float32)
    if HAS_Q:
        qv = tl.load(q_ptr + qrow + j, mask=j_ok & USE_RES, other=0.0).to(tl.float32)
    else:
        qv = tl.where(j == xa, 1.0, 0.0)
    res = tl.maximum(pv - qv, 0.0)
    return tl.where(RES_MODE, res, pv), res, pv


@triton.jit
def _verify(
    p_ptr,
    q_ptr,
    x_ptr,
    ua_ptr,
    us_ptr,
    px_ptr,
    qx_ptr,
    prob_ptr,
    acc_ptr,
    tok_ptr,
    K,
    L,
    V,
    HAS_Q: tl.constexpr,
    HAS_PX: tl.constexpr,
    HAS_QX: tl.constexpr,
    GREEDY: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    x = tl.load(x_ptr + b * K + k, mask=k_ok, other=0)
    if HAS_PX:
        px = tl.load(px_ptr + b * K + k, mask=k_ok, other=0.0).to(tl.float32)
    else:
        px = tl.load(p_ptr + (b * L + k) * V + x, mask=k_ok, other=0.0).to(tl.float32)
    if HAS_QX:
        qx = tl.load(qx_ptr + b * K + k, mask=k_ok, other=1.0).to(tl.float32)
    elif HAS_Q:
        qx = tl.load(q_ptr + (b * K + k) * V + x, mask=k_ok, other=1.0).to(tl.float32)
    else:
        qx = tl.full((BLOCK_K,), 1.0, tl.float32)
    prob = tl.where(qx > 0, tl.minimum(tl.math.div_rn(px, tl.maximum(qx, 1e-30)), 1.0), 1.0)  # IEEE, as torch
    tl.store(prob_ptr + b * K + k, prob, mask=k_ok)
    u = tl.load(ua_ptr + b * K + k, mask=k_ok, other=0.0).to(tl.float32)
    a = tl.min(tl.where(k_ok & (u >= prob), k, K), axis=0)  # first rejection (K: none)
    tl.store(acc_ptr + b, a.to(tl.int64))

    use_res = a < K
    row = tl.minimum(a, L - 1)
    at = tl.minimum(a, tl.maximum(K - 1, 0))
    xa = tl.load(x_ptr + b * K + at, mask=K > 0, other=-1)
    prow = (b * L + row) * V
    qrow = (b * K + at) * V
    # pass 1: the residual's mass (summed as the prefix search sums) and the target's
    c_res = 0.0
    c_p = 0.0
    for v0 in range(0, V, BLOCK_V):
        j = v0 + tl.arange(0, BLOCK_V)
        j_ok = j < V
        _, res, pv = _weights(p_ptr, q_ptr, prow, qrow, j, j_ok, xa, use_res, use_res, HAS_Q)
        c_res = tl.max(c_res + tl.cumsum(res, axis=0), axis=0)
        c_p = tl.max(c_p + tl.cumsum(pv, axis=0), axis=0)
    res_mode = use_res & (c_res > 1e-12)
    total = tl.where(res_mode, c_res, c_p)
    thr = tl.load(us_ptr + b).to(tl.float32) * total
    # pass 2: inverse CDF (or first argmax) over the chosen weights
    carry = 0.0
    count = 0
    last = -1
    top = -1.0
    arg = 0
    for v0 in range(0, V, BLOCK_V):
        j = v0 + tl.arange(0, BLOCK_V)
        j_ok = j < V
        w, _, _ = _weights(p_ptr, q_ptr, prow, qrow, j, j_ok, xa, use_res, res_mode, HAS_Q)
        w = tl.where(j_ok, w, 0.0)
        if GREEDY:
            tile_top = tl.max(w, axis=0)
            tile_arg = tl.min(tl.where(w == tile_top, j, V), axis=0)
            better = tile_top > top
            arg = tl.where(better, tile_arg, arg)
            top = tl.where(better, tile_top, top)
        else:
            c = carry + tl.cumsum(w, axis=0)
            count += tl.sum(tl.where(j_ok & (c <= thr), 1, 0), axis=0)
            last = tl.maximum(last, tl.max(tl.where(w > 0, j, -1), axis=0))
            carry = tl.max(c, axis=0)
    if GREEDY:
        tok = arg
    else:
        tok = tl.where(count >= V, last, count)
    tok = tl.where((a == K) & (L == K), -1, tok)
    tl.store(tok_ptr + b, tok.to(tl.int64))


def spec_verify_triton(
    p: torch.Tensor,
    x: torch.Tensor,
    u_accept: torch.Tensor,
    u_sample: torch.Tensor,
    q: torch.Tensor | None = None,
    px: torch.Tensor | None = None,
    qx: torch.Tensor | None = None,
    greedy: bool = False,
    block_v: int = 1024,
) -> Verdict:
    """Same contract as :func:`mmfast.kernels.spec_verify.reference.spec_verify`."""
    b, k = x.shape
    length, v = p.shape[1], p.shape[2]
    if length not in (k, k + 1) or length == 0:
        raise ValueError(f"p has {length} rows for {k} drafts (expected K or K + 1, at least 1)")
    dev = p.device
    pc = p.contiguous()
    xc = x.to(device=dev, dtype=torch.int64).contiguous()
    ua = u_accept.to(dev).contiguous()
    us = u_sample.to(dev).contiguous()
    qc = q.contiguous() if q is not None else pc
    pxc = px.to(dev).contiguous() if px is not None else pc
    qxc = qx.to(dev).contiguous() if qx is not None else pc
    prob = torch.empty(b, k, dtype=torch.float32, device=dev)
    acc = torch.empty(b, dtype=torch.int64, device=dev)
    tok = torch.empty(b, dtype=torch.int64, device=dev)
    if b:
        _verify[(b,)](
            pc, qc, xc, ua, us, pxc, qxc, prob, acc, tok, k, length, v,
            HAS_Q=q is not None, HAS_PX=px is not None, HAS_QX=qx is not None, GREEDY=greedy,
            BLOCK_K=max(2, triton.next_power_of_2(max(k, 1))), BLOCK_V=min(block_v, max(16, triton.next_power_of_2(v))),
        )  # fmt: skip
    return Verdict(acc, tok, prob)
