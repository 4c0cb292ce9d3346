"""LOOK-M: text-prior KV eviction with merge compensation, once, after prefill.

Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context Inference",
EMNLP 2024 Findings, arXiv 2406.18139. Per decoder layer, right after the prompt is prefilled:

1. accumulated attention per KV head: ``A_j = sum over prompt queries i and the query heads of the group of
   softmax(q_i K^T / sqrt(d))_ij`` (H2O-style, as the reference accumulates over the whole prefill attention map).
   Computed by the shared blockwise probe kernel over *all* prompt queries by default (faithful to the
   reference, costs about one extra attention pass at prefill); ``window=w`` scores with the last w queries only;
2. budget ``k`` (``budget`` is a fraction of the prompt if float, a token count if int): the last
   ``round(recent * k)`` tokens are always kept (recent window); the other slots go to the top tokens by ``A``
   with **text prior**: every text token outranks every image / frame token (visual tokens only fill the slots
   text leaves), independently per head (same count per head);
3. merge compensation: each evicted entry ``e`` is assigned to its most similar kept key
   ``c = argmax_c cos(k_e, k_c)`` (same head), then, with ``n_c`` entries assigned to ``c`` and ``s_e`` the cosine:

   * ``avg``:      ``k_c <- (k_c + sum_e k_e) / (1 + n_c)``, same for ``v``;
   * ``pivot``:    ``k_e' = (k_e + k_c) / 2``, then ``k_c <- (k_c + sum_e k_e') / (1 + n_c)``;
   * ``weighted``: ``k_c <- (k_c + sum_e s_e k_e) / (1 + n_c)`` (scatter-mean of similarity-weighted entries);
   * ``none``: plain text-prior eviction.

   As in the reference, ``avg`` and ``weighted`` merge only the evicted entries whose best similarity is at least
   the mean best similarity (the others are just dropped); ``pivot`` merges all.

Defaults: ``budget=0.2`` (the paper's 20% cache: 10% heavy hitters + 10% recent), ``recent=0.5`` (that even split,
also the best share on a validation draw), ``merge="avg"`` (the paper leaves the choice open and its code ships
every variant; on tiny-vlm the variants differ by less than the sampling noise, see docs/methods/lookm.md).

Departures from the reference code (LLaVA-1.5 fork, ``llava/model/kv_token_merge/modify_llama.py``), which has
indexing bugs, so the merges are implemented from their definitions above: its ``avg`` passes the unfiltered
evicted entries with the filtered target indices to ``scatter_reduce`` (entries land on the wrong pivots), its
text-prior ``weighted`` assigns ``v_hh_pruned = k_hh_pruned = <values>``, its text-prior masks keep every text
token whatever the budget (``score >= 0`` after zeroing the kept ones), and its image positions assume 576 tokens
per image. Here image / frame positions come from the adapter's spans, the budget is exact, and the filter mean is
taken per head (evicted sets differ per head, so the reference's mean over heads of the j-th evicted entry would
mix different tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmfast.accel.base import KVAccelerator, register
from mmfast.errors import ConfigError
from mmfast.kernels.probe_attention import probe_attention
from mmfast.models.attention import AttentionTap, project_queries
from mmfast.types import KVContext

MERGES = ("avg", "pivot", "weighted", "none")


def select_kept(scores: torch.Tensor, text: torch.Tensor | None, keep: int, recent: int) -> torch.Tensor:
    """Sorted indices (..., keep) of the entries to keep per head.

    scores: (..., S) accumulated attention; text: (S,) or (..., S) bool, True for text tokens (ranked above every
    non-text token; None: no prior); the last ``recent`` entries are always kept.
    """
    s = scores.shape[-1]
    recent = min(recent, keep)
    pri = scores.float().clone()
    if text is not None:  # lexicographic (is_text, score): shift text above the largest score
        pri = pri + text.to(pri.dtype) * (pri.abs().amax() + 1.0)
    heavy = pri[..., : s - recent].topk(keep - recent, dim=-1).indices
    tail = torch.arange(s - recent, s, device=scores.device).expand(*scores.shape[:-1], recent)
    return torch.cat([heavy, tail], dim=-1).sort(dim=-1).values


def _nearest_kept(evicted: torch.Tensor, kept: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine similarity (B, H, E) and index of the most similar kept key, in chunks of evicted rows (the full
    (E, k) similarity of a long video would not fit in memory)."""
    kn = F.normalize(kept, dim=-1).transpose(-1, -2)
    best, idx = zip(*((F.normalize(c, dim=-1) @ kn).max(dim=-1) for c in evicted.split(chunk, dim=2)))
    return torch.cat(best, dim=-1), torch.cat(idx, dim=-1)


def merge_evicted(
    keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, how: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``kept`` (B, H, k) of keys / values (B, H, S, D) and merge the evicted entries in (module docstring)."""
    b, h, s, d = keys.shape
    k = kept.shape[-1]
    kk = keys.gather(2, kept[..., None].expand(b, h, k, d))
    vk = values.gather(2, kept[..., None].expand(b, h, k, d))
    if how == "none" or k >= s:
        return kk, vk
    is_kept = torch.zeros(b, h, s, dtype=torch.bool, device=keys.device).scatter_(-1, kept, True)
    evicted = torch.argsort(is_kept.to(torch.int8), dim=-1, stable=True)[..., : s - k]  # not-kept first
    ke = keys.gather(2, evicted[..., None].expand(b, h, s - k, d)).float()
    ve = values.gather(2, evicted[..., None].expand(b, h, s - k, d)).float()
    best, pivot = _nearest_kept(ke, kk.float())
    use = torch.ones_like(best) if how == "pivot" else (best >= best.mean(dim=-1, keepdim=True)).float()
    if how == "pivot":
        at = pivot[..., None].expand(b, h, s - k, d)
        src_k, src_v = (ke + kk.float().gather(2, at)) / 2, (ve + vk.float().gather(2, at)) / 2
    elif how == "weighted":
        src_k, src_v = best[..., None] * ke, best[..., None] * ve
    else:  # avg
        src_k, src_v = ke, ve
    idx = pivot[..., None].expand(b, h, s - k, d)
    w = use[..., None]
    num_k = kk.float().scatter_add(2, idx, src_k * w)
    num_v = vk.float().scatter_add(2, idx, src_v * w)
    count = torch.ones(b, h, k, device=keys.device).scatter_add(2, pivot, use)[..., None]
    return (num_k / count).to(keys.dtype), (num_v / count).to(values.dtype)


@register
@dataclass
class LookM(KVAccelerator):
    """LOOK-M text-prior eviction + merge of the prompt KV, once after prefill (see the module docstring)."""

    name = "lookm"
    role = "evict"
    budget: float | int = 0.2
    merge: str = "avg"  # see the module docstring
    recent: float = 0.5  # share of the budget reserved for the recent window (reference: 0.1 + 0.1 of the prompt)
    text_prior: bool = True
    window: int | None = None  # score with the last `window` prompt queries only (None: all prompt queries)

    def validate(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not ((isinstance(b, float) and 0 < b <= 1) or (isinstance(b, int) and b >= 1)):
            raise ConfigError(f"lookm: budget must be a fraction in (0, 1] or a token count >= 1, got {b!r}.")
        if self.merge not in MERGES:
            raise ConfigError(f"lookm: merge must be one of {', '.join(MERGES)}, got {self.merge!r}.")
        if isinstance(self.recent, bool) or not isinstance(self.recent, (int, float)) or not 0 <= self.recent <= 1:
            raise ConfigError(f"lookm: recent must be a fraction in [0, 1], got {self.recent!r}.")
        if self.window is not None and (
            isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1
        ):
            raise ConfigError(f"lookm: window must be None or an integer >= 1, got {self.window!r}.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._tap: AttentionTap | None = None

    def attach(self, adapter: Any) -> None:
        super().attach(adapter)
        self._tap = AttentionTap(adapter)

    def detach(self, adapter: Any) -> None:
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        super().detach(adapter)

    def keep_count(self, n: int) -> int:
        """Entries kept out of a prompt of ``n``."""
        if isinstance(self.budget, float):
            return min(n, max(1, round(self.budget * n)))
        return min(n, self.budget)

    def scores(self, keys: torch.Tensor, ctx: KVContext) -> torch.Tensor:
        """(B, kv_heads, S) accumulated prompt attention of this layer (recomputed queries, blockwise)."""
        attn, hidden, pos = self._tap.latest(ctx.layer_idx)
        n = hidden.shape[1]
        rows = torch.arange(0 if self.window is None else max(0, n - self.window), n, device=keys.device)
        q = project_queries(attn, hidden, pos, rows)
        return probe_attention(q, keys, rows)

    def compress(self, keys: torch.Tensor, values: torch.Tensor, ctx: KVContext) -> tuple[torch.Tensor, torch.Tensor]:
        s = keys.shape[-2]
        k = self.keep_count(s)
        if k >= s:
            return keys, values
        pos = ctx.entry_positions(keys)
        text = None
        if self.text_prior:
            visual = torch.zeros(ctx.seen, dtype=torch.bool, device=keys.device)
            for span in ctx.spans:
                visual[span.start : span.end] = True
            text = ~visual[pos]
        kept = select_kept(self.scores(keys, ctx), text, k, round(self.recent * k))
        ctx.positions = pos.gather(-1, kept)
        return merge_evicted(keys, values, kept, self.merge)
