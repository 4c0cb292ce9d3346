"""Probe attention scores in torch: column sums of softmax(Q_probe K^T / sqrt(d) + causal mask), blockwise.

Only ``block`` query rows are materialised at a time (``block x S`` logits), never the full ``P x S`` matrix, so
a layer can be scored with a few (or all) of its queries while the model itself keeps sdpa / flash attention.
"""

from __future__ import annotations

import math

import torch


def visible_counts(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(S,) number of probe queries that can see each key (query at q_pos sees keys with k_pos <= q_pos)."""
    q_sorted = torch.sort(q_pos).values
    return q_sorted.numel() - torch.searchsorted(q_sorted, k_pos, right=False)


def probe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    normalize: bool = False,
    per_head: bool = False,
    block: int = 64,
) -> torch.Tensor:
    """Column sums of causal softmax attention for probe queries.

    Args:
        q: (B, H, P, D) probe queries (after RoPE).
        k: (B, Hkv, S, D) keys (after RoPE); ``H % Hkv == 0`` (GQA: query head h reads KV head ``h // (H/Hkv)``).
        q_pos: (P,) long, position of each probe query; k_pos: (S,) long, position of each key (default
            ``arange(S)``). Query i sees key j iff ``k_pos[j] <= q_pos[i]``.
        scale: logit scale, default ``1/sqrt(D)``.
        normalize: divide each column by the number of probe queries that can see that key (ZipCache / ZipVL
            normalized score; keys no probe can see get 0).
        per_head: return per query head (B, H, S) instead of summing the heads of each KV group (B, Hkv, S).
        block: probe queries per block.

    Returns:
        float32 (B, Hkv, S) or (B, H, S).
    """
    b, h, p, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k_pos = torch.arange(s, device=k.device) if k_pos is None else k_pos.to(k.device)
    q_pos = q_pos.to(k.device)
    qf = (q.float() * scale).reshape(b, hkv, g, p, d)
    kt = k.float().transpose(-1, -2)  # (B, Hkv, D, S)
    k_sorted = bool((k_pos[1:] >= k_pos[:-1]).all()) if s > 1 else True
    out = torch.zeros(b, hkv, g, s, dtype=torch.float32, device=k.device)
    for start in range(0, p, block):
        qp = q_pos[start : start + block]
        rows = qp.numel()
        # with sorted keys, columns after the block's last query are hidden from every row (skipped), and only
        # the columns after its earliest query can be hidden from some row (masked)
        last = int(torch.searchsorted(k_pos, qp.max(), right=True)) if k_sorted else s
        first = min(int(torch.searchsorted(k_pos, qp.min(), right=True)), last) if k_sorted else 0
        if last == 0:
            continue
        q_blk = qf[:, :, :, start : start + block].reshape(b, hkv, g * rows, d)
        logits = (q_blk @ kt[..., :last]).view(b, hkv, g, rows, last)
        if first < last:
            hidden = k_pos[None, first:last] > qp[:, None]  # (rows, last - first): True = masked
            logits[..., first:].masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if bool((qp < k_pos.min()).any()):  # a row that sees no key contributes nothing (softmax gave NaN)
            probs.nan_to_num_(0.0)
        out[..., :last] += probs.sum(dim=3)
    out = out.reshape(b, h, s) if per_head else out.sum(dim=2)
    if normalize:
        out = out / visible_counts(q_pos, k_pos).clamp_min(1).to(out.dtype)
    return out
