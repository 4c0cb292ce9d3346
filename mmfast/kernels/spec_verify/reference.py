"""Speculative verification of a window of drafts, in torch: the test oracle of the spec_verify kernel.

One verify step of speculative sampling (Leviathan et al. 2023; Chen et al. 2023) as SJD (Teng et al., ICLR 2025)
runs it over a Jacobi window: draft ``x_k`` with proposal ``q_k`` is accepted iff ``u_k < min(1, p_k(x_k) /
q_k(x_k))`` (``q`` None: a point mass on the draft, ratio ``p_k(x_k)``); at the first rejection ``a`` a token is
drawn from ``norm(max(0, p_a - q_a))`` (``p_a`` itself when that has no mass); when every draft passes, the bonus
token is drawn from ``p_K``. Draws use a given uniform through the inverse CDF (``min j: cumsum(w)_j > u *
sum(w)``), so the kernel and this reference agree draw for draw; ``greedy`` takes the first argmax instead.

The relaxed rules stay in torch and reuse this op: LANTERN passes its relaxed targets ``p~_k = A_{k,delta}(x_k)``
as ``p`` rows 0..K-1 (acceptance and residual both use ``p~``), GSD passes the group masses ``p(G_k)`` / ``q(G_k)``
as ``px`` / ``qx`` (acceptance only; its residual is the strict one on ``p``).

Shapes: p (B, L, V) with L = K (no bonus row) or K + 1; x (B, K) long; q (B, K, V) or None; u_accept (B, K);
u_sample (B,); px / qx (B, K) or None.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Verdict(NamedTuple):
    """accepted (B,) long: drafts accepted before the first rejection (K: all); token (B,) long: the draw at
    position ``accepted`` (residual after a rejection, bonus when all passed; -1 when all passed and p has no bonus
    row); accept_prob (B, K) float32."""

    accepted: torch.Tensor
    token: torch.Tensor
    accept_prob: torch.Tensor


def inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B, V) non-negative weights, (B,) uniforms in [0, 1) → (B,) long ``min j: cumsum(w)_j > u * sum(w)`` (the
    last index with weight when rounding leaves none)."""
    c = w.cumsum(-1)
    idx = (c <= (u * c[:, -1])[:, None]).sum(-1)
    v = w.shape[-1]
    last = v - 1 - (w > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.where(idx >= v, last, idx)


def acceptance(
    p: torch.Tensor,
    x: torch.Tensor,
    q: torch.Tensor | None = None,
    px: torch.Tensor | None = None,
    qx: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, K) float32 ``min(1, px / qx)`` (1 where qx = 0), px / qx by default the target / proposal at the draft."""
    k = x.shape[1]
    if px is None:
        px = p[:, :k].float().gather(-1, x[..., None]).squeeze(-1)
    if qx is None:
        qx = torch.ones_like(px) if q is None else q.float().gather(-1, x[..., None]).squeeze(-1)
    px, qx = px.float(), qx.float()
    return torch.where(qx > 0, (px / qx.clamp_min(1e-30)).clamp(max=1.0), torch.ones_like(px))


def spec_verify(
    p: torch.Tensor,
    x: torch.Tensor,
    u_accept: torch.Tensor,
    u_sample: torch.Tensor,
    q: torch.Tensor | None = None,
    px: torch.Tensor | None = None,
    qx: torch.Tensor | None = None,
    greedy: bool = False,
) -> Verdict:
    """Verify the drafts of every row (see the module docstring)."""
    b, k = x.shape
    length, v = p.shape[1], p.shape[2]
    prob = acceptance(p, x, q, px, qx)
    ok = u_accept.to(prob.device) < prob
    if k:
        acc = torch.where(ok.all(1), torch.full((b,), k, device=p.device), (~ok).to(torch.int8).argmax(1))
    else:
        acc = torch.zeros(b, dtype=torch.long, device=p.device)
    rows = torch.arange(b, device=p.device)
    target = p.float()[rows, acc.clamp(max=length - 1)]
    if k:
        at = acc.clamp(max=k - 1)
        if q is None:
            qrow = torch.nn.functional.one_hot(x[rows, at], v).float()
        else:
            qrow = q.float()[rows, at]
        res = (target - qrow).clamp_min(0)
        use_res = (acc < k) & (res.sum(-1) > 1e-12)
        w = torch.where(use_res[:, None], res, target)
    else:
        w = target
    token = w.argmax(-1) if greedy else inverse_cdf(w, u_sample.to(w.device).float())
    if length == k:
        token = torch.where(acc == k, torch.full_like(token, -1), token)
    return Verdict(acc.long(), token.long(), prob)
