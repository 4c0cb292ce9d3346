"""Grouped Speculative Decoding (GSD).

So et al., "Grouped Speculative Decoding for Autoregressive Image Generation", ICCV 2025, arXiv 2508.07747.

Image tokens are redundant and diverse: several tokens are equally valid where SJD's strict test accepts only
the sampled one. GSD verifies a draft ``x`` against a dynamic group ``G(x)`` of visually valid alternatives and
accepts with probability ``min(1, sum_{y in G} p(y) / sum_{y in G} q(y))``, committing ``x`` itself. The group is
rebuilt at every step from the current target (the paper's "dynamic" clustering; static embedding clusters
failed in the paper), as in the official code:

1. ``R``: the reference sorts the processed logits in ascending order and takes the slice
   ``[c - rank_window : c + rank_window]`` around the draft's position ``c`` (Python slicing); in descending rank
   ``r`` (0 = likeliest) that is ranks ``r - rank_window + 1 .. r + rank_window``: with the default 7, six more
   likely and seven less likely tokens than ``x``, and ``x`` itself;
2. ``G = {y in R : |p(y) - p(x)| < prob_threshold and ||e_y - e_x||^2 < emb_threshold}``, where ``e`` are the
   language model's input embeddings of the image tokens (not the VQ codebook).

Defaults are the paper's: ``rank_window=7, prob_threshold=0.15, emb_threshold=0.5`` (the embedding threshold is
in the units of the model's embedding table: it was set for Lumina-mGPT; rescale it for other models). After a
rejection the SJD residual ``norm(max(0, p - q))`` is sampled. GSD is lossy and has no TV bound; the bench
reports its drift. Drafts are SJD's Jacobi drafts.

Edges, as the reference decides them (junhyukso/GSD, ``SpeculativeSampler.__call__``):

* near the top of the ranking the slice simply ends at the likeliest token (fewer than ``2 * rank_window`` tokens);
* when ``x`` is among the ``rank_window`` LEAST likely tokens, the slice's start ``c - rank_window`` is negative,
  Python counts it from the end, and the slice comes out empty (for ``V >= 2 * rank_window``); the reference's
  ``max()`` over it then raises and its ``except`` falls back to the plain test ``min(1, p(x) / q(x))``. Here the
  group is ``{x}`` alone, which is that test.
* Not reproduced: the reference skips the embedding test when the slice holds a token id above 10000 (Lumina-mGPT's
  text ids, forced to -inf) and falls back to the plain test on id 10000 (its distance table has 10000 rows);
  mmfast's tokens are codebook indices only. ``x`` is always in its group: the reference's group holds ``x``
  whenever its slice does and both thresholds are positive, but with ``prob_threshold=0`` its group is empty and
  its 0/0 ratio rejects every draft, where mmfast's ``gsd(prob_threshold=0)`` is SJD's test; and for a codebook of
  fewer than ``2 * rank_window`` codes a wrapped slice can miss ``x``. Ties in the ranking (tokens cut by top-k
  share -inf) are ordered arbitrarily by both sorts, so groups there can differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmfast.accel.base import DecodeAccelerator, register
from mmfast.accel.sjd import INIT_SCHEMES, JacobiDrafter, _check_window
from mmfast.accel.speculative import StrictRule, speculative_decode
from mmfast.errors import ConfigError
from mmfast.models.argen import ARGenAdapter


class GSDRule(StrictRule):
    """Grouped acceptance ``min(1, p(G) / q(G))`` with the group rebuilt from the current target."""

    name = "gsd"

    def __init__(self, rank_window: int = 7, prob_threshold: float = 0.15, emb_threshold: float = 0.5):
        self.rank_window, self.prob_threshold, self.emb_threshold = rank_window, prob_threshold, emb_threshold
        self.group_sizes: list[float] = []
        self._emb: torch.Tensor | None = None

    def group(self, p: torch.Tensor, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """p (B, K, V), x (B, K), emb (V, D) → (B, K, V) bool membership of G(x) (x always included).

        One sort of the target; the probability and embedding tests run on the at most ``2 * rank_window`` tokens
        of the slice only (not on all V: at V = 16384 and D = 768 that was most of a step's cost)."""
        v, w = p.shape[-1], self.rank_window
        order = p.argsort(-1)  # ascending, as the reference sorts the processed logits: order[c] = token at c
        c = (order == x[..., None]).to(torch.int8).argmax(-1)  # position of x, (B, K)
        start = c - w  # Python slice semantics: a negative start counts from the end, then clamps at 0
        start = torch.where(start < 0, start + v, start).clamp_min(0)
        stop = (c + w).clamp_max(v)
        pos = start[..., None] + torch.arange(2 * w, device=p.device)  # (B, K, 2w)
        valid = pos < stop[..., None]  # an empty slice (x among the w least likely) leaves G = {x}
        cand = order.gather(-1, pos.clamp(max=v - 1))
        px = p.gather(-1, x[..., None])
        close_p = (p.gather(-1, cand) - px).abs() < self.prob_threshold
        d2 = (emb[cand] - emb[x][..., None, :]).square().sum(-1)  # (B, K, 2w)
        ok = valid & close_p & (d2 < self.emb_threshold)
        g = torch.zeros(p.shape, dtype=torch.int8, device=p.device)
        g.scatter_reduce_(-1, cand, ok.to(torch.int8), reduce="amax")  # clamped duplicates cannot unset a member
        return g.bool().scatter(-1, x[..., None], True)

    def accept_probs(self, p, q, x, adapter: ARGenAdapter) -> torch.Tensor:  # type: ignore[override]
        if self._emb is None or self._emb.device != p.device:  # once per decode, not once per step
            self._emb = adapter.token_embeddings().detach().float().to(p.device)
        emb = self._emb
        g = self.group(p, x, emb)
        pg = (p * g).sum(-1)
        qg = torch.ones_like(pg) if q is None else (q * g).sum(-1)
        self.group_sizes.append(float(g.sum(-1).float().mean()))
        return torch.where(qg > 0, (pg / qg.clamp_min(1e-30)).clamp(max=1.0), torch.ones_like(pg))


@register
@dataclass
class GSD(DecodeAccelerator):
    """Grouped Speculative Decoding on Jacobi drafts (training-free, lossy)."""

    name = "gsd"
    rank_window: int = 7
    prob_threshold: float = 0.15
    emb_threshold: float = 0.5
    window: int = 16
    init: str = "random"

    def validate(self) -> None:
        if isinstance(self.rank_window, bool) or not isinstance(self.rank_window, int) or self.rank_window < 1:
            raise ConfigError(f"gsd: rank_window must be an integer >= 1, got {self.rank_window!r}.")
        for name in ("prob_threshold", "emb_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"gsd: {name} must be a number >= 0, got {value!r}.")
        _check_window("gsd", self.window)
        if self.init not in INIT_SCHEMES:
            raise ConfigError(f"gsd: init must be one of {', '.join(INIT_SCHEMES)}, got {self.init!r}.")

    def decode(self, adapter, conditions, sampling, generator, callback=None, progress=True):  # type: ignore[override]
        rule = GSDRule(self.rank_window, self.prob_threshold, self.emb_threshold)
        res = speculative_decode(
            adapter, conditions, sampling, JacobiDrafter(self.init), rule, self.window, generator, callback, progress
        )
        res.stats["mean_group_size"] = sum(rule.group_sizes) / max(len(rule.group_sizes), 1)
        return res
