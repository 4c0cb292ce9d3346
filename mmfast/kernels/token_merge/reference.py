"""Bipartite soft matching (ToMe, Bolya et al., ICLR 2023) with a semantic-value term (Turbo): the torch
reference, the oracle of the Triton kernels (:mod:`.triton`).

Two primitives, shared by every merge in the package's users:

* :func:`cosine_match`: for every row of set A (..., Na, C), the best cosine similarity among the rows of set B
  (..., Nb, C) and its index (first on ties) — ToMe / Turbo's bipartite scores, VisionZip's contextual
  assignment (``argmax_t cos(k_j, k_t)``), LOOK-M's nearest kept key;
* :func:`scatter_mean`: size-weighted scatter-mean of rows into slots, optionally around a base row per slot —
  ToMe / Turbo's merged features (weights = sizes), VisionZip's ``mean_{j -> t} x_j``, LOOK-M's
  ``(k_c + sum_e w_e k_e) / (1 + sum_e w_e)``.

:func:`bipartite_merge` merges the ``r`` least informative tokens of set A (even positions) into their most similar
partner in set B (odd positions) by size-weighted means, :func:`fold_merge` repeats it to remove any number of
tokens (Folder's fold), :func:`layer_schedule` spreads a token budget over layers. Every token keeps an *anchor*
(the original token it sits at; a merged token keeps its B partner's), and rows stay sorted by anchor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cosine_match(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """a (..., Na, C), b (..., Nb, C) → best cosine similarity (..., Na) float32 and its index into b (..., Na)
    long (the first on ties), in chunks of ``chunk`` A rows (the full Na x Nb matrix is never held)."""
    bn = F.normalize(b.float(), dim=-1).transpose(-1, -2)
    pairs = [(F.normalize(c.float(), dim=-1) @ bn).max(dim=-1) for c in a.split(chunk, dim=-2)]
    return torch.cat([p[0] for p in pairs], dim=-1), torch.cat([p[1] for p in pairs], dim=-1)


def scatter_mean(
    x: torch.Tensor,
    index: torch.Tensor,
    n: int,
    weight: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of the rows of x (..., T, D) landing in each of ``n`` slots: ``index`` (..., T) long in
    [0, n), ``weight`` (..., T) (default 1); ``base`` (..., n, D) rows already in the slots with ``base_weight``
    (..., n) (default 1). Returns the means (..., n, D) float32 (0 for a slot with no weight) and the total weight
    per slot (..., n) float32."""
    lead, t, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    g = index.numel() // max(t, 1)
    w = torch.ones(index.shape, device=x.device) if weight is None else weight.float()
    flat = (index.reshape(g, t) + torch.arange(g, device=x.device)[:, None] * n).flatten()
    tot = w.new_zeros(g * n).index_add_(0, flat, w.flatten())
    num = w.new_zeros(g * n, d).index_add_(0, flat, (x.float() * w[..., None]).reshape(g * t, d))
    if base is not None:
        bw = torch.ones(g * n, device=x.device) if base_weight is None else base_weight.float().flatten()
        num = num + base.float().reshape(g * n, d) * bw[:, None]
        tot = tot + bw
    mean = torch.where(tot[:, None] > 0, num / tot[:, None], 0.0)
    return mean.reshape(*lead, n, d), tot.reshape(*lead, n)


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
    return apply_merge(x, size, anchor, metric, r, semantic, node_max, node_idx, scatter_mean)


def apply_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    anchor: torch.Tensor,
    metric: torch.Tensor | None,
    r: int,
    semantic: torch.Tensor | None,
    node_max: torch.Tensor,
    node_idx: torch.Tensor,
    mean: Callable[..., tuple[torch.Tensor, torch.Tensor]],
) -> Merged:
    """The merge of :func:`bipartite_merge` once each A token has its score ``node_max`` (B, Ta) and partner
    ``node_idx`` (B, Ta) in B; ``mean`` is :func:`scatter_mean` or a kernel with its contract."""
    b, t, _ = x.shape
    with torch.no_grad():
        src = node_max.argsort(dim=-1, descending=True, stable=True)[:, :r]  # A indices merged away
        dst = node_idx.gather(1, src)  # their B partners
        # every token goes to an output slot: kept tokens (B and unmerged A) keep their order, merged A tokens
        # go to their partner's slot; one scatter-mean per tensor then does all the merging
        kept = torch.ones(b, t, dtype=torch.bool, device=x.device)
        kept.scatter_(1, 2 * src, False)
        rank = kept.cumsum(1) - 1
        slot = rank.scatter(1, 2 * src, rank.gather(1, 2 * dst + 1))

    w = size.float()
    new_x, new_size = mean(x, slot, t - r, w)
    new_x = new_x.to(x.dtype)
    new_metric = new_x if metric is None else mean(metric, slot, t - r, w)[0].to(metric.dtype)
    new_sem = None
    if semantic is not None:
        flat = (slot + torch.arange(b, device=x.device)[:, None] * (t - r)).flatten()
        new_sem = semantic.float().new_zeros(b * (t - r)).index_add_(0, flat, semantic.float().flatten())
        new_sem = new_sem.view(b, t - r)
    return Merged(
        x=new_x,
        size=new_size.to(size.dtype),
        anchor=anchor[kept].view(b, t - r),
        metric=new_metric,
        semantic=new_sem,
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
    merge: Callable[..., Merged] | None = None,
) -> Merged:
    """Remove ``r`` tokens by repeated :func:`bipartite_merge` rounds (or ``merge``, a function with its
    contract) of at most ``max_fraction`` of the tokens (0.5 = Folder's fold: every round takes as many as the
    bipartite split allows)."""
    merge = bipartite_merge if merge is None else merge
    same = metric is None  # the features are their own metric (post-encoder path)
    out = Merged(x, size, anchor, x if same else metric, semantic, anchor[:, :0], anchor[:, :0])
    srcs, dsts = [], []
    while r > 0:
        t = out.x.shape[1]
        step = min(r, max(1, int(t * max_fraction)), (t - int(protect_first)) // 2)
        if step <= 0:
            break
        metric_now = None if same else out.metric
        out = merge(out.x, out.size, out.anchor, metric_now, step, out.semantic, weight, protect_first)
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
