"""Bipartite soft matching (ToMe, Bolya et al., ICLR 2023) with a semantic-value term (Turbo): the torch
reference, the oracle of any faster kernel.

:func:`bipartite_merge` merges the ``r`` least informative tokens of set A (even positions) into their most similar
partner in set B (odd positions) by size-weighted means, :func:`fold_merge` repeats it to remove any number of
tokens (Folder's fold), :func:`layer_schedule` spreads a token budget over layers. Every token keeps an *anchor*
(the original token it sits at; a merged token keeps its B partner's), and rows stay sorted by anchor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Merged:
    """Tokens after one bipartite merge, sorted by anchor. Shapes: x (B,T',D), size / anchor (B,T'),
    metric (B,T',C), semantic (B,T') or None; ``src`` / ``dst`` (B,r): anchors of the merged A tokens and of
    the B tokens they went into (for inspection and tests)."""

    x: torch.Tensor
    size: torch.Tensor
    anchor: torch.Tensor
    metric: torch.Tensor
    semantic: torch.Tensor | None
    src: torch.Tensor
    dst: torch.Tensor


def bipartite_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    anchor: torch.Tensor,
    metric: torch.Tensor | None,
    r: int,
    semantic: torch.Tensor | None = None,
    weight: float = 0.0,
    protect_first: bool = False,
) -> Merged:
    """Merge the ``r`` least informative tokens of set A (even positions) into their best partner in set B.

    Args:
        x: (B, T, D) features; size: (B, T) tokens each stands for; anchor: (B, T) long, increasing along each
        row; metric: (B, T, C) matching metric (cosine), None = ``x``; semantic: (B, T) semantic value S,
        subtracted from the scores of A tokens with factor ``weight`` (alpha * 30 * decay); protect_first: never
        merge token 0 (the class token).

    Features and metric are merged by size-weighted mean, sizes and semantic values are summed (the attention
    a merged token receives under proportional attention is the sum of its parts'), a merged token keeps its B
    partner's anchor, so rows stay sorted by anchor.
    """
    b, t, _ = x.shape
    r = min(r, (t - int(protect_first)) // 2)
    if r <= 0:
        empty = anchor[:, :0]
        return Merged(x, size, anchor, x if metric is None else metric, semantic, empty, empty)
    with torch.no_grad():
        m = F.normalize((x if metric is None else metric).float(), dim=-1)
        scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # (B, Ta, Tb) mutual redundancy
        if semantic is not None and weight:
            scores = scores - weight * semantic[:, ::2, None].float()
        if protect_first:
            scores[:, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        src = node_max.argsort(dim=-1, descending=True, stable=True)[:, :r]  # A indices merged away
        dst = node_idx.gather(1, src)  # their B partners
        # every token goes to an output slot: kept tokens (B and unmerged A) keep their order, merged A tokens
        # go to their partner's slot; one index_add per tensor then does all the merging
        kept = torch.ones(b, t, dtype=torch.bool, device=x.device)
        kept.scatter_(1, 2 * src, False)
        rank = kept.cumsum(1) - 1
        slot = rank.scatter(1, 2 * src, rank.gather(1, 2 * dst + 1))
        flat = (slot + torch.arange(b, device=x.device)[:, None] * (t - r)).flatten()

    def total(v: torch.Tensor) -> torch.Tensor:
        out = v.new_zeros(b * (t - r), *v.shape[2:])
        return out.index_add_(0, flat, v.flatten(0, 1)).view(b, t - r, *v.shape[2:])

    w = size.float()
    new_size = total(w)
    new_x = (total(x.float() * w[..., None]) / new_size[..., None]).to(x.dtype)
    new_metric = new_x if metric is None else (total(metric.float() * w[..., None]) / new_size[..., None]).to(metric.dtype)
    return Merged(
        x=new_x,
        size=new_size.to(size.dtype),
        anchor=anchor[kept].view(b, t - r),
        metric=new_metric,
        semantic=None if semantic is None else total(semantic.float()),
        src=anchor.gather(1, 2 * src),
        dst=anchor.gather(1, 2 * dst + 1),
    )


def fold_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    anchor: torch.Tensor,
    metric: torch.Tensor | None,
    r: int,
    semantic: torch.Tensor | None = None,
    weight: float = 0.0,
    protect_first: bool = False,
    max_fraction: float = 0.5,
) -> Merged:
    """Remove ``r`` tokens by repeated :func:`bipartite_merge` rounds of at most ``max_fraction`` of the tokens
    (0.5 = Folder's fold: every round takes as many as the bipartite split allows)."""
    same = metric is None  # the features are their own metric (post-encoder path)
    out = Merged(x, size, anchor, x if same else metric, semantic, anchor[:, :0], anchor[:, :0])
    srcs, dsts = [], []
    while r > 0:
        t = out.x.shape[1]
        step = min(r, max(1, int(t * max_fraction)), (t - int(protect_first)) // 2)
        if step <= 0:
            break
        metric_now = None if same else out.metric
        out = bipartite_merge(out.x, out.size, out.anchor, metric_now, step, out.semantic, weight, protect_first)
        srcs.append(out.src)
        dsts.append(out.dst)
        r -= step
    if srcs:
        out.src, out.dst = torch.cat(srcs, 1), torch.cat(dsts, 1)
    return out


def layer_schedule(n_tokens: int, target: int, layers: int) -> list[int]:
    """Per-layer r reaching ``target`` tokens from ``n_tokens`` over ``layers`` layers (spread evenly, earlier
    layers take the remainder)."""
    total = max(0, n_tokens - target)
    if layers <= 0:
        return []
    return [total // layers + (1 if i < total % layers else 0) for i in range(layers)]
