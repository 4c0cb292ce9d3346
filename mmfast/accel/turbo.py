"""Turbo: informativity-driven token merging (Ju, Wang et al., "Turbo: Informativity-Driven Acceleration Plug-In
for Vision-Language Large Models", ECCV 2024, arXiv 2407.11717; code: anakin-skywalker-Joseph/Folder).

Bipartite soft matching (ToMe) ranked by *informativity*: split the tokens into alternating sets A (even) and
B (odd); score every pair by mutual redundancy minus semantic value,

    s_ij = cos(k_a_i, k_b_j) - alpha * 30 * beta^|gamma - l| * S(a_i)          (paper eq. 3-5; reference constants)

where ``k`` are the attention keys averaged over heads and ``S`` the attention the class token pays to ``a_i``
(mean over heads). The ``r`` A-tokens with the highest ``max_j s_ij`` (the least informative) are merged into
their best B partner by a size-weighted mean; sizes are tracked and later layers use proportional attention
(logits + log size) so a merged token keeps the weight of the tokens it stands for. The class token is never
merged and a layer with fewer than ``min_tokens`` tokens does not merge. Defaults follow the reference code:
alpha=5, beta=1, gamma=0 (no layer decay), min_tokens=40 (``r_threshold``), r=16 per layer for LLaVA-1.5.

Deployment paths (``path="auto"``: in-ViT where the tower has a class token and one grid per image, i.e.
LLaVA-1.5; else post-encoder; ``"vit"`` / ``"post"`` force one):

* **in-ViT** (``adapter.vision_tower``): merging inside every encoder block that feeds the selected hidden state,
  after the attention sub-layer, as the reference patches CLIP. Each token carries its *anchor* (the patch it sits
  at: a merge keeps the B token's anchor), so the adapter places kept tokens at their grid positions (anyres
  crops go through the family's own packing, with every row newline). ``keep`` is met per image:
  ``round(keep * visible patches)`` tokens shared among its crops by visible patches. Towers without a class
  token (SigLIP) run this path only with ``path="vit"``; prompts the adapter cannot rebuild from merged patches
  (videos pooled after the projector, interpolated anyres grids) raise with ``path="vit"``.
* **post-encoder** (the reference's simplified ``merge_features`` "fold" path): repeated bipartite merges of the
  projector outputs of one image / video (newline layout tokens excluded and kept), metric = the features
  themselves (``metric="features"``, as ``merge_features``) or the head-mean keys of the last tower layer feeding
  the features (``metric="keys"``, where the adapter offers them), then every token is rescaled by
  ``1 + log(size)`` (``rescale=True``, as ``merge_features`` does: a merged token's embedding gets longer instead
  of a log-size attention bias, which the LLM's attention cannot take).

Semantic value without a class token: post path ``semantic="auto"`` takes the first the tower offers of the class
token's row, SigLIP's MAP-pooling probe attention, the mean attention each patch receives (``"received"`` forces
the last), mapped through the family's layout and normalised to sum to 1 over the tokens being merged; in-ViT,
the mean attention each token receives in the merging block (each query weighted by its size). ``"none"`` ranks
by redundancy only (the reference ``merge_features`` default). Why ``auto`` keeps SigLIP towers on the post path:
on the tiny-vlm yardstick the in-ViT path scored below it (rows ``path='vit'`` in docs/methods/turbo.md).

Departures from the reference code: (1) token order is kept (merged tokens stay at their anchor, as the
reference ``folder.py`` does with ``transform_index``; the reference in-ViT patch appends merged tokens at the
end), so the A/B alternation stays spatial; (2) with ``keep=`` the per-layer r schedule is computed to land
exactly on the target and a layer that must merge more than half its tokens folds (repeats the matching on the
merged metric, as Folder does); ``min_tokens`` only applies to ``r=`` schedules; (3) the post path merges in
rounds of at most a quarter of the tokens (the reference fold merges all of set A per round when r is large,
which leaves the ranking no choice); (4) the Folder LLaVA code scales the semantic term by 100 instead of
Turbo's 30; we keep 30; (5) SigLIP in-ViT: the semantic value is the attention received (no class token);
tokens whose anchor falls in the margin that unpadding removes are dropped with it, so a non-square image may
keep fewer tokens than ``keep`` asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmfast.accel.base import VisionAccelerator, register
from mmfast.errors import ConfigError, IncompatibleAcceleratorError
from mmfast.kernels.token_merge import fold_merge, layer_schedule
from mmfast.models.vision import TowerProbe, VisionTower, ViTBlock
from mmfast.types import VisualTokens

SEMANTIC_SCALE = 30.0  # the reference multiplies alpha by 30 (BLIP Turbo)
_DONE = "turbo_in_vit"  # VisualTokens.extra key: tokens were already merged inside the ViT
_SEM = "turbo_semantic"  # VisualTokens.extra key: (N,) semantic value of each token (0 for layout tokens)
_LAYERS = "turbo_layers"  # VisualTokens.extra key: tower layers feeding the features (r= on the post path)
_KEYS = "turbo_keys"  # VisualTokens.extra key: (N, C) head-mean keys of the last tower layer (metric="keys")


# ----------------------------------------------------------------------------------------------------------
# the accelerator
# ----------------------------------------------------------------------------------------------------------
@register
@dataclass
class Turbo(VisionAccelerator):
    """Turbo informativity merging. Give ``keep`` (fraction of visual tokens kept) or ``r`` (tokens merged per
    ViT layer; on the post path the same total, r x the layers feeding the features). Neither: keep=0.25."""

    name = "turbo"
    keep: float | None = None
    r: int | None = None
    alpha: float = 5.0
    beta: float = 1.0
    gamma: float = 0.0
    min_tokens: int = 40
    path: str = "auto"  # "auto" | "vit" | "post"
    semantic: str = "auto"  # "auto" | "received" | "none"
    rescale: bool = True
    metric: str = "features"  # post path: "features" (merge_features) | "keys" (the tower's keys, as in the ViT)

    def validate(self) -> None:
        if self.keep is not None and self.r is not None:
            raise ConfigError("turbo: give either keep= (fraction of tokens kept) or r= (tokens per layer), not both.")
        if self.keep is None and self.r is None:
            self.keep = 0.25
        if self.keep is not None and (
            isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1
        ):
            raise ConfigError(f"turbo: keep must be a fraction in (0, 1], got {self.keep!r}.")
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0):
            raise ConfigError(f"turbo: r must be an integer >= 0, got {self.r!r}.")
        for k in ("alpha", "beta", "gamma"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"turbo: {k} must be a number, got {v!r}.")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ConfigError(f"turbo: min_tokens must be an integer >= 0, got {self.min_tokens!r}.")
        if self.path not in ("auto", "vit", "post"):
            raise ConfigError(f"turbo: path must be 'auto', 'vit' or 'post', got {self.path!r}.")
        if self.semantic not in ("auto", "received", "none"):
            raise ConfigError(f"turbo: semantic must be 'auto', 'received' or 'none', got {self.semantic!r}.")
        if self.metric not in ("features", "keys"):
            raise ConfigError(f"turbo: metric must be 'features' or 'keys', got {self.metric!r}.")

    def _weight(self, layer: int = 0) -> float:
        return self.alpha * SEMANTIC_SCALE * self.beta ** abs(self.gamma - layer)

    def _is_identity(self) -> bool:
        return (self.keep is not None and self.keep >= 1) or self.r == 0

    # ---- encode hook (called by VLMAdapter before its default encoding) ----------------------------
    def _probe(self) -> TowerProbe:
        kinds: tuple[str, ...] = ()
        if self.semantic != "none" and self._weight():
            kinds = ("received",) if self.semantic == "received" else ("cls", "map", "received")
        return TowerProbe(attention=kinds, keys=self.metric == "keys")

    def encode(self, adapter: Any, inputs: Any) -> list[VisualTokens] | None:
        if self._is_identity():
            return None
        tower = None
        if self.path != "post" and "vit_blocks" in adapter.capabilities:
            tower = adapter.vision_tower(inputs)
        if tower is not None and (self.path == "vit" or (tower.has_cls and not tower.anyres)):
            return self._encode_in_vit(tower)
        if self.path == "vit":
            raise IncompatibleAcceleratorError(
                f"turbo(path='vit') merges inside plain ViT towers for image prompts the adapter can rebuild from "
                f"merged patches; this {type(adapter.model).__name__} prompt needs the post-encoder path "
                "(path='post' or 'auto')."
            )
        probe = self._probe() if "tower_probe" in adapter.capabilities else TowerProbe()
        items = adapter.visual_tokens(inputs, probe)
        for item in items:
            extra: dict[str, Any] = {_LAYERS: adapter.tower_layers}
            sem = item.tower.get("attention") if probe.attention else None
            if sem is not None:
                sem = sem.float().clamp_min(0) * (~item.layout_mask)
                extra[_SEM] = sem / sem.sum().clamp_min(1e-12)
            if probe.keys and "keys" in item.tower:
                extra[_KEYS] = item.tower["keys"]
            item.extra = {**item.extra, **extra}
        return items

    # ---- post-encoder path ----------------------------------------------------------------------------
    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        if self._is_identity() or tokens.extra.get(_DONE) or len(tokens) == 0:
            return tokens
        regular = (~tokens.layout_mask).nonzero().flatten()
        n = regular.numel()
        if self.keep is not None:
            target = max(1, round(self.keep * n))
        else:
            target = max(1, n - self.r * int(tokens.extra.get(_LAYERS, 1)))
        if target >= n:
            return tokens
        sem = tokens.extra.get(_SEM)
        keys = tokens.extra.get(_KEYS)
        out = fold_merge(
            tokens.features[regular][None],
            tokens.sizes[regular].float()[None],
            regular[None],
            None if keys is None else keys[regular][None],
            n - target,
            None if sem is None else sem[regular].float()[None],
            self._weight(),
            max_fraction=0.25,
        )
        feats = out.x[0]
        if self.rescale:
            feats = (feats.float() * (1 + out.size[0].log())[:, None]).to(feats.dtype)
        keep_idx = out.anchor[0]
        layout = tokens.layout_mask.nonzero().flatten()
        return tokens.with_tokens(
            torch.cat([feats, tokens.features[layout]]),
            torch.cat([tokens.coords[keep_idx], tokens.coords[layout]]),
            torch.cat([tokens.source[keep_idx], tokens.source[layout]]),
            torch.cat([out.size[0].to(tokens.sizes.dtype), tokens.sizes[layout]]),
        )

    # ---- in-ViT path ------------------------------------------------------------------------------------
    def _encode_in_vit(self, tower: VisionTower) -> list[VisualTokens]:
        """Merge inside the tower, crops with the same schedule as one batch; the adapter's ``finish`` places the
        kept patches (size > 0) at their anchors in the family's layout."""
        h = tower.embed(tower.pixels)
        n_crops, t, d = h.shape
        n_patch = t - int(tower.has_cls)
        scheds = self._crop_schedules(tower.visible.sum(1), tower.crops_per_image, n_patch, len(tower.blocks))
        threshold = 0 if self.keep is not None else self.min_tokens  # keep-schedules land exactly on the target
        hidden = h.new_zeros(n_crops, n_patch, d)
        size = torch.zeros(n_crops, n_patch, device=h.device)  # 0 = merged away
        for sched in sorted(set(scheds)):
            rows = torch.tensor([c for c, s in enumerate(scheds) if s == sched], device=h.device)
            x, sz, anchor = self._merging_layers(tower.blocks, h[rows], list(sched), threshold, tower.has_cls)
            if tower.has_cls:  # the class token (anchor -1, never merged) is not a feature
                x, sz, anchor = x[:, 1:], sz[:, 1:], anchor[:, 1:]
            hidden[rows[:, None], anchor] = x
            size[rows[:, None], anchor] = sz
        items = tower.finish(hidden, size)
        for item in items:
            item.extra = {**item.extra, _DONE: True}
        return items

    def _crop_schedules(
        self, visible: torch.Tensor, counts: list[int], n_patch: int, n_layers: int
    ) -> list[tuple[int, ...]]:
        """Per crop, tokens merged in each layer. ``keep``: each image keeps ``round(keep * its visible patches)``
        tokens, shared among its crops in proportion to their visible patches (largest remainder)."""
        if self.keep is None:
            return [tuple([self.r] * n_layers)] * len(visible)
        targets: list[int] = []
        for vis in visible.split(counts):
            want = vis.double() * self.keep
            base = want.floor()
            extra = max(1, round(float(want.sum()))) - int(base.sum())
            base[want.sub(base).argsort(descending=True, stable=True)[:extra]] += 1
            targets.extend(max(1, int(t)) for t in base)
        return [tuple(layer_schedule(n_patch, t, n_layers)) for t in targets]

    def _merging_layers(
        self, blocks: list[ViTBlock], h: torch.Tensor, sched: list[int], threshold: int, has_cls: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run ViT ``blocks`` on ``h`` (B, T, D) with proportional attention, merging ``sched[i]`` tokens after the
        attention sub-layer of block ``i`` (skipped below ``threshold`` tokens). Returns hidden states, sizes and
        anchors (B, T'); the class token (anchor -1) is never merged.

        Semantic value: the class token's attention (mean over heads) with a class token, else the mean attention
        each token receives, weighting each query by its size (a merged query stands for ``size`` queries)."""
        bsz, t, _ = h.shape
        size = torch.ones(bsz, t, device=h.device)
        anchor = (torch.arange(t, device=h.device) - int(has_cls)).expand(bsz, -1)
        merged_layers = 0
        for block, r in zip(blocks, sched):
            q, k, v = block.qkv(h)
            merge = r > 0 and h.shape[1] >= threshold
            weight = self._weight(merged_layers) if self.semantic != "none" else 0.0
            sem = None
            if merge and weight and not has_cls:  # needs every query's attention row
                o, sem = block.attend(q, k, v, size, received=True)
            else:
                o, _ = block.attend(q, k, v, None if bool((size == 1).all()) else size)
                if merge and weight:
                    sem = block.cls_row(q, k, size)
            h = block.residual_out(h, o)
            if merge:
                out = fold_merge(h, size, anchor, k.mean(1), r, sem, weight, protect_first=has_cls)
                h, size, anchor = out.x, out.size, out.anchor
                merged_layers += 1
            h = block.ffn(h)
        return h, size, anchor
