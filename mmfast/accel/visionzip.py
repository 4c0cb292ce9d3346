"""VisionZip: a few dominant visual tokens plus contextual tokens merged from the rest.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025,
arXiv 2412.04467 (code: dvlab-research/VisionZip).

Per crop / frame (the unit the tower encodes), from the last tower layer feeding the features:

1. dominant tokens: the ``d`` patches that receive the most attention, ``a_j`` = the class token's attention row
   (heads averaged) where the tower has a class token, else the mean attention each patch receives;
2. contextual tokens: of the remaining patches, ``c`` targets at a uniform stride (every ``max(1, R // c)``-th,
   the first ``c``); every other remaining patch goes to its most similar target by cosine of the head-mean keys,
   ``t* = argmax_t cos(k_j, k_t)``, and each target becomes ``x_t + mean_{j -> t} x_j`` (the reference adds the
   mean of the tokens assigned to it to the target).

``keep=f`` keeps ``round(f * n)`` tokens of each n-token crop, split dominant : contextual = 54 : 10 as the
reference's 64-token setting (also 108 : 20, 162 : 30); ``dominant=d, contextual=c`` give the counts per crop.
Defaults: ``keep=0.25``.

Departures from the reference: (1) selection and merging act on the LLM-space tokens the adapter maps the tower's
statistics onto (projector outputs), not on the tower's hidden states before the projector: dominant tokens are
exactly the reference's (the projector is per token), contextual tokens average projected features; for pooled
layouts (video frames, Qwen's 2x2 merger) a token's attention is the sum over its patches; (2) kept tokens stay in
spatial order at their anchors (a contextual token at its target), with the family's layout tokens (newlines),
instead of dominant tokens followed by contextual ones; (3) where the adapter offers no keys (Qwen2-VL) the
features are the metric, and where the tower attention cannot be mapped onto a prompt's layout dominant tokens
are taken at a uniform stride.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmfast.accel.base import VisionAccelerator, register
from mmfast.errors import ConfigError
from mmfast.models.vision import TowerProbe
from mmfast.types import VisualTokens

#: the reference's dominant : contextual split (54 + 10 = 64 tokens)
CONTEXTUAL_SHARE = 10 / 64


@register
@dataclass
class VisionZip(VisionAccelerator):
    """VisionZip dominant + contextual tokens; ``keep`` (fraction) or ``dominant`` + ``contextual`` (per crop)."""

    name = "visionzip"
    requires = ("tower_probe",)
    keep: float | None = None
    dominant: int | None = None
    contextual: int | None = None

    def validate(self) -> None:
        counts = (self.dominant, self.contextual)
        if self.keep is not None and any(c is not None for c in counts):
            raise ConfigError("visionzip: give either keep= or dominant= and contextual= (tokens per crop), not both.")
        if self.keep is None and all(c is None for c in counts):
            self.keep = 0.25
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
                raise ConfigError(f"visionzip: keep must be a fraction in (0, 1], got {self.keep!r}.")
            return
        for name, v in (("dominant", self.dominant), ("contextual", self.contextual)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"visionzip: {name} must be an integer >= 0, got {v!r}.")
        if self.dominant + self.contextual < 1:
            raise ConfigError("visionzip: dominant + contextual must keep at least one token per crop.")

    def encode(self, adapter: Any, inputs: Any) -> list[VisualTokens] | None:
        if self.keep is not None and self.keep >= 1:
            return None
        return adapter.visual_tokens(inputs, TowerProbe(attention=("cls", "received"), keys=True))

    def counts(self, n: int) -> tuple[int, int]:
        """(dominant, contextual) tokens kept of an ``n``-token crop."""
        if self.keep is not None:
            total = min(n, max(1, round(self.keep * n)))
            ctx = round(total * CONTEXTUAL_SHARE)
            return total - ctx, ctx
        d = min(n, self.dominant)
        return d, min(n - d, self.contextual)

    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        if (self.keep is not None and self.keep >= 1) or len(tokens) == 0:
            return tokens
        attn = tokens.tower.get("attention")
        metric = tokens.tower.get("keys", tokens.features)
        regular = ~tokens.layout_mask
        feats, sizes, anchors = [], [], []
        for key in torch.unique(tokens.coords[regular][:, :2], dim=0):  # one crop / frame at a time
            idx = (regular & (tokens.coords[:, :2] == key).all(1)).nonzero().flatten()
            f, s, a = self._crop(tokens, idx, attn, metric)
            feats.append(f), sizes.append(s), anchors.append(a)
        layout = tokens.layout_mask.nonzero().flatten()
        anchor = torch.cat([*anchors, layout])
        return tokens.with_tokens(
            torch.cat([*feats, tokens.features[layout]]),
            tokens.coords[anchor],
            tokens.source[anchor],
            torch.cat([*sizes, tokens.sizes[layout]]),
        )

    def _crop(
        self, tokens: VisualTokens, idx: torch.Tensor, attn: torch.Tensor | None, metric: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features, sizes and anchors (indices into ``tokens``) of one crop's dominant + contextual tokens."""
        n = idx.numel()
        d, c = self.counts(n)
        if attn is not None:
            dom = attn[idx].float().topk(d).indices
        else:  # no tower attention for this layout: a uniform stride
            dom = torch.linspace(0, n - 1, d, device=idx.device).round().long() if d else idx[:0]
        rest = torch.ones(n, dtype=torch.bool, device=idx.device)
        rest[dom] = False
        rest = rest.nonzero().flatten()
        dom_idx = idx[dom]
        if c == 0 or rest.numel() == 0:
            return tokens.features[dom_idx], tokens.sizes[dom_idx], dom_idx
        c = min(c, rest.numel())
        step = max(1, rest.numel() // c)
        target = torch.zeros(rest.numel(), dtype=torch.bool, device=idx.device)
        target[torch.arange(0, rest.numel(), step, device=idx.device)[:c]] = True
        tgt, oth = idx[rest[target]], idx[rest[~target]]
        m = F.normalize(metric.float(), dim=-1)
        assign = (m[oth] @ m[tgt].T).argmax(-1) if oth.numel() else oth
        count = torch.zeros(tgt.numel(), device=idx.device).index_add_(0, assign, torch.ones(oth.numel(), device=idx.device))
        total = torch.zeros(tgt.numel(), tokens.features.shape[1], device=idx.device)
        total.index_add_(0, assign, tokens.features[oth].float())
        ctx_feats = tokens.features[tgt].float() + total / count.clamp_min(1)[:, None]
        size = tokens.sizes[tgt].float() + torch.zeros_like(count).index_add_(0, assign, tokens.sizes[oth].float())
        feats = torch.cat([tokens.features[dom_idx], ctx_feats.to(tokens.features.dtype)])
        return feats, torch.cat([tokens.sizes[dom_idx], size.to(tokens.sizes.dtype)]), torch.cat([dom_idx, tgt])
