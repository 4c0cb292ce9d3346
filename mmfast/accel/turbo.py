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

Deployment paths (``path="auto"``: in-ViT for CLIP towers, else post-encoder; ``"vit"`` / ``"post"`` force one):

* **in-ViT, CLIP** (towers with a class token whose blocks mmfast can run itself: LLaVA-1.5; the default there):
  merging inside every encoder layer that feeds the selected hidden state, after the attention sub-layer, exactly
  as the reference patches CLIP. Each token carries its *anchor* (the patch it sits at: a merge keeps the B
  token's anchor) so the kept tokens keep their grid coordinates and sequence positions.
* **in-ViT, SigLIP** (LLaVA-OneVision image prompts; opt-in with ``path="vit"``): the same loop (proportional
  attention, keys as metric, r per layer) run on each anyres crop (base view, tiles) separately. The merged crops
  go through the projector and the model's own ``pack_image_features`` at their anchors, so the LLM reads the kept
  tokens at their grid positions with every row newline, as ``random(keep=...)`` keeps a subset. ``keep`` is met
  per image: ``round(keep * visible patches)`` tokens shared among its crops by visible patches. Not for video
  (OneVision 2x-pools frames after the projector, which merged tokens cannot go through) nor for images whose
  anyres grid is bilinearly down-sized (``anyres_max``): those prompts raise with ``path="vit"``.
* **post-encoder** (the reference's simplified ``merge_features`` "fold" path, used for anyres / video /
  pre-merged layouts: LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2(.5)-VL, or ``path="post"``): repeated bipartite
  merges of the projector outputs of one image / video (newline layout tokens excluded and kept), metric = the
  features themselves (``metric="features"``, as ``merge_features``) or, for the LLaVA families, the head-mean keys
  of the last tower layer feeding the features (``metric="keys"``, Turbo's in-ViT metric, mapped through the
  family's layout like the semantic values), then every token is rescaled by ``1 + log(size)``
  (``rescale=True``, as ``merge_features`` does to its output features; a merged token's embedding gets longer
  instead of getting a log-size attention bias, which the LLM's attention cannot take).

Why ``auto`` keeps the post path for LLaVA-OneVision: on the tiny-vlm yardstick (``mmfast bench vlm-quality``,
626 questions; baseline 0.867, pool(factor=2) 0.829, random(keep=0.25) 0.714) the SigLIP in-ViT path scored
0.650 at keep=0.25 against 0.770 for the post path; keep=0.5: 0.736 vs 0.773; keep=0.125: 0.519 vs 0.706. The
tower has 36 patches per crop and 4 layers, far from the reference's regime (577 tokens, ``r_threshold=40`` would
not even merge a 36-token crop), and it has no class token, so the semantic value is a stand-in (below).
``metric="keys"`` on the post path scored 0.770, ``semantic="none"`` 0.685, ``alpha=16.7`` 0.765. Turbo trails
pool here (0.770 vs 0.829 at 25%): global bipartite matching merges look-alike objects, which counting needs apart,
while pooling only averages neighbours.

Semantic value where there is no class token (SigLIP in LLaVA-OneVision, Qwen's ViT). Post path:
``semantic="auto"`` uses the class-token row when the tower has one, else the attention the SigLIP MAP-pooling
probe pays to each patch when the tower keeps its head, else the mean attention each patch *receives* in the last
tower layer feeding the features (recomputed from that layer's input by a probe hook; the merged-unit value for
Qwen is the sum over its 2x2 patches). Values are mapped through the family's own layout functions and normalised
to sum to 1 over the tokens being merged (as class-token attention sums to ~1 over an image). SigLIP in-ViT path:
in each merging layer, the mean attention each token receives (heads averaged, each query weighted by its size,
since a merged query stands for ``size`` queries), summing to 1 over the crop. ``semantic="none"`` ranks by
redundancy only (the reference ``merge_features`` default).

Departures from the reference code: (1) token order is kept (merged tokens stay at their anchor, as the
reference ``folder.py`` does with ``transform_index``; the reference in-ViT patch appends merged tokens at the
end), so the A/B alternation stays spatial; (2) with ``keep=`` the per-layer r schedule is computed to land
exactly on the target and a layer that must merge more than half its tokens folds (repeats the matching on the
merged metric, as Folder does); ``min_tokens`` only applies to ``r=`` schedules; (3) the post path merges in
rounds of at most a quarter of the tokens (the reference fold merges all of set A per round when r is large,
which leaves the ranking no choice); (4) the Folder LLaVA code scales the semantic term by 100 instead of
Turbo's 30; we keep 30; (5) SigLIP in-ViT: the semantic value is the attention received (no class token), and
with alpha=5 over a 36-token crop (mean value 1/36, not ~1/577 as in LLaVA-1.5) it outweighs the cosine term;
tokens whose anchor falls in the margin that unpadding removes are dropped with it, so a non-square image may
keep fewer tokens than ``keep`` asks.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmfast.accel.base import VisionAccelerator, register
from mmfast.errors import ConfigError, IncompatibleAcceleratorError
from mmfast.models.vlm import VisualTokens

SEMANTIC_SCALE = 30.0  # the reference multiplies alpha by 30 (BLIP Turbo)
_DONE = "turbo_in_vit"  # VisualTokens.extra key: tokens were already merged inside the ViT
_SEM = "turbo_semantic"  # VisualTokens.extra key: (N,) semantic value of each token (0 for layout tokens)
_LAYERS = "turbo_layers"  # VisualTokens.extra key: tower layers feeding the features (r= on the post path)
_KEYS = "turbo_keys"  # VisualTokens.extra key: (N, C) head-mean keys of the last tower layer (metric="keys")


# ----------------------------------------------------------------------------------------------------------
# the merge itself (pure tensor functions; unit-tested on hand-built inputs)
# ----------------------------------------------------------------------------------------------------------
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


def proportional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + log size) v. q, k, v: (B, H, T, hd); size: (B, T) or None (plain attention)."""
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def layer_schedule(n_tokens: int, target: int, layers: int) -> list[int]:
    """Per-layer r reaching ``target`` tokens from ``n_tokens`` over ``layers`` layers (spread evenly, earlier
    layers take the remainder)."""
    total = max(0, n_tokens - target)
    if layers <= 0:
        return []
    return [total // layers + (1 if i < total % layers else 0) for i in range(layers)]


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
    def encode(self, adapter: Any, inputs: Any) -> list[VisualTokens] | None:
        if self._is_identity():
            return None
        if self.path != "post" and _clip_in_vit_ok(adapter):
            return self._encode_in_vit(adapter, inputs)
        # opt-in only: on tiny-vlm the SigLIP in-ViT path scored below the post path (see the module docstring)
        if self.path == "vit" and _onevision_in_vit_ok(adapter, inputs):
            items = self._encode_onevision_in_vit(adapter, inputs)
            if items is not None:
                return items
        if self.path == "vit":
            raise IncompatibleAcceleratorError(
                f"turbo(path='vit') merges inside CLIP towers with a class token (LLaVA-1.5) and inside the SigLIP "
                f"tower of LLaVA-OneVision image prompts without down-sizing; this {type(adapter.model).__name__} "
                f"prompt needs the post-encoder path (path='post' or 'auto')."
            )
        want_sem = self.semantic != "none" and bool(self._weight())
        want_keys = self.metric == "keys" and not hasattr(adapter.model.model, "visual")
        with ExitStack() as stack:
            probe = stack.enter_context(_Probe(adapter, want_sem, want_keys)) if want_sem or want_keys else None
            items = adapter.visual_tokens(inputs)
        sems = probe.semantic(adapter, inputs, items) if want_sem and probe else [None] * len(items)
        keys = probe.keys(adapter, inputs, items) if want_keys and probe else [None] * len(items)
        depth = _layers_used(adapter, _tower_depth(adapter))
        for item, sem, key in zip(items, sems, keys):
            extra = {_LAYERS: depth, **({} if sem is None else {_SEM: sem}), **({} if key is None else {_KEYS: key})}
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

    # ---- in-ViT path (CLIP with a class token) ------------------------------------------------------
    def _encode_in_vit(self, adapter: Any, inputs: Any) -> list[VisualTokens] | None:
        if "pixel_values" not in inputs:
            return None
        model = adapter.model.model
        tower = model.vision_tower
        vm = getattr(tower, "vision_model", tower)
        layers = vm.encoder.layers
        n_used = _layers_used(adapter, len(layers))
        pixels = inputs["pixel_values"].to(tower.dtype)
        h = vm.pre_layrnorm(vm.embeddings(pixels))
        n_patch = h.shape[1] - 1
        side = math.isqrt(n_patch)
        if side * side != n_patch:
            return None
        bsz = h.shape[0]
        if self.keep is not None:
            sched = layer_schedule(n_patch, max(1, round(self.keep * n_patch)), n_used)
            threshold = 0  # keep-schedules land exactly on the target
        else:
            sched = [self.r] * n_used
            threshold = self.min_tokens
        h, size, anchor = self._merging_layers(layers[:n_used], h, sched, threshold, has_cls=True)
        feats = model.multi_modal_projector(h[:, 1:])  # drop CLS ("default" strategy)
        anchor, size = anchor[:, 1:], size[:, 1:]
        frames = "mmfast_video_frames" in inputs
        tid = adapter.token_id("image")
        items = []
        groups = [list(range(bsz))] if frames else [[i] for i in range(bsz)]
        for index, members in enumerate(groups):
            base = VisualTokens.from_grid(
                torch.zeros(len(members) * n_patch, 1, device=h.device),
                [(0, len(members), side, side, False)],
                kind="video" if frames else "image",
                index=index,
                token_id=tid,
            )
            src = torch.cat([anchor[b] + j * n_patch for j, b in enumerate(members)])
            item = base.with_tokens(
                torch.cat([feats[b] for b in members]), base.coords[src], src, torch.cat([size[b] for b in members])
            )
            item.extra = {_DONE: True}
            items.append(item)
        return items

    # ---- in-ViT path (LLaVA-OneVision images: SigLIP, no class token) ------------------------------
    def _encode_onevision_in_vit(self, adapter: Any, inputs: Any) -> list[VisualTokens] | None:
        """Merge inside the SigLIP tower, one anyres crop (base view or tile) at a time, then let the model's own
        ``pack_image_features`` place the crops; each image keeps the tokens whose anchor survived the merges,
        at their grid positions, plus its newline tokens (as ``random(keep=...)`` keeps a subset). None when the
        packing down-sizes the grid (``anyres_max`` interpolation mixes patches, so a token has no one anchor)."""
        model = adapter.model.model
        cfg = adapter.config
        tower = model.vision_tower
        vm = getattr(tower, "vision_model", tower)
        layers = vm.encoder.layers[: _layers_used(adapter, len(vm.encoder.layers))]
        counts = _onevision_crop_counts(adapter, inputs)
        pixels = inputs["pixel_values"]
        if pixels.dim() == 5:  # (images, max crops, C, H, W): drop the padding crops, as get_image_features does
            pixels = torch.cat([p[:n] for p, n in zip(pixels, counts)])
        h = vm.embeddings(pixels.to(tower.dtype))
        n_crops, n_patch, _ = h.shape
        sizes_hw = inputs["image_sizes"]
        aspect = getattr(cfg, "vision_aspect_ratio", "anyres_max_9")

        def pack(per_crop: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
            return list(model.pack_image_features(list(per_crop.split(counts)), sizes_hw, newline, aspect)[0])

        # 1-based patch index of every packed token (0 = newline): where the model's layout puts each crop patch
        index = torch.arange(1, n_crops * n_patch + 1, dtype=torch.float32, device=h.device)
        ids = [i.flatten() for i in pack(index.view(n_crops, n_patch, 1), torch.zeros(1, device=h.device))]
        flat = torch.cat(ids)
        regular = flat[flat > 0]
        if not torch.equal(regular, regular.round()) or regular.unique().numel() != regular.numel():
            return None
        visible = torch.zeros(n_crops * n_patch, device=h.device)
        visible[regular.long() - 1] = 1  # unpadding drops the patches of the padded margin
        scheds = self._crop_schedules(visible.view(n_crops, n_patch).sum(1), counts, n_patch, len(layers))

        hidden = torch.zeros_like(h)
        size = torch.zeros(n_crops, n_patch, device=h.device)  # 0 = merged away
        threshold = 0 if self.keep is not None else self.min_tokens  # keep-schedules land exactly on the target
        for sched in sorted(set(scheds)):  # crops with the same schedule merge as one batch
            rows = torch.tensor([c for c, s in enumerate(scheds) if s == sched], device=h.device)
            x, sz, anchor = self._merging_layers(layers, h[rows], list(sched), threshold, has_cls=False)
            hidden[rows[:, None], anchor] = x
            size[rows[:, None], anchor] = sz
        feats = pack(model.multi_modal_projector(hidden), model.image_newline)
        patch_sizes = size.flatten()
        items = []
        for i, (f, idx) in enumerate(zip(feats, ids)):
            item = adapter._anyres_item(f, sizes_hw[i], i)
            patch = (idx.long() - 1).clamp_min(0)
            tok_size = torch.where(item.layout_mask, torch.ones_like(idx), patch_sizes[patch])
            item.sizes = tok_size.to(item.sizes.dtype)
            item = item.select((item.layout_mask | (tok_size > 0)).nonzero().flatten())
            item.extra = {_DONE: True}
            items.append(item)
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

    # ---- the encoder loop shared by the in-ViT paths -------------------------------------------------
    def _merging_layers(
        self, layers: Any, h: torch.Tensor, sched: list[int], threshold: int, has_cls: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run CLIP / SigLIP encoder ``layers`` on ``h`` (B, T, D) with proportional attention, merging ``sched[i]``
        tokens after the attention sub-layer of layer ``i`` (skipped below ``threshold`` tokens). Returns hidden
        states, sizes and anchors (B, T'); the class token (anchor -1) is never merged.

        Semantic value: the class token's attention (mean over heads) with a class token, else the mean attention
        each token receives, weighting each query by its size (a merged query stands for ``size`` queries)."""
        bsz, t, _ = h.shape
        size = torch.ones(bsz, t, device=h.device)
        anchor = (torch.arange(t, device=h.device) - int(has_cls)).expand(bsz, -1)
        merged_layers = 0
        for layer, r in zip(layers, sched):
            attn = layer.self_attn
            z = layer.layer_norm1(h)
            q, k, v = (_heads(p(z), attn.num_heads) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            merge = r > 0 and h.shape[1] >= threshold
            weight = self._weight(merged_layers) if self.semantic != "none" else 0.0
            sem = None
            if merge and weight and not has_cls:  # needs every query's attention row: compute them explicitly
                logits = (q @ k.transpose(-1, -2)) * attn.scale + size.log()[:, None, None, :].to(q.dtype)
                probs = logits.float().softmax(-1)
                o = probs.to(v.dtype) @ v
                received = (probs.mean(1) * size[:, :, None]).sum(1)  # (B, T): size-weighted over queries
                sem = received / size.sum(1, keepdim=True)
            else:
                prop = None if bool((size == 1).all()) else size
                o = proportional_attention(q, k, v, prop, attn.scale)
                if merge and weight:
                    cls_logits = (q[:, :, :1] @ k.transpose(-1, -2)) * attn.scale + size.log()[:, None, None, :]
                    sem = cls_logits.float().softmax(-1).mean(1)[:, 0]  # (B, T) attention from CLS, head mean
            h = h + attn.out_proj(o.transpose(1, 2).reshape(bsz, h.shape[1], -1))
            if merge:
                out = fold_merge(h, size, anchor, k.mean(1), r, sem, weight, protect_first=has_cls)
                h, size, anchor = out.x, out.size, out.anchor
                merged_layers += 1
            h = h + layer.mlp(layer.layer_norm2(h))
        return h, size, anchor


def _onevision_crop_counts(adapter: Any, inputs: Any) -> list[int]:
    """Crops per image (base view + anyres tiles; 1 in multi-image prompts), as ``get_image_features`` counts them."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = adapter.config
    sizes = inputs["image_sizes"]
    bni = inputs.get("batch_num_images")
    patching = [True] * len(sizes) if bni is None else [int(n) == 1 for n in bni for _ in range(int(n))]
    return [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if p else 1
        for s, p in zip(sizes, patching)
    ]


def _onevision_in_vit_ok(adapter: Any, inputs: Any) -> bool:
    """In-ViT merging for LLaVA-OneVision *image* prompts: a SigLIP tower (no class token) read in full from one
    layer. Video frames are 2x pooled after the projector, which merged tokens cannot go through: post path."""
    if getattr(adapter, "family", "") != "llava_onevision" or "pixel_values" not in inputs:
        return False
    if "pixel_values_videos" in inputs:
        return False
    cfg = adapter.config
    tower = getattr(adapter.model.model, "vision_tower", None)
    vm = getattr(tower, "vision_model", tower)
    return (
        not hasattr(getattr(vm, "embeddings", None), "class_embedding")
        and hasattr(getattr(vm, "encoder", None), "layers")
        and getattr(cfg, "vision_feature_select_strategy", "") == "full"
        and isinstance(getattr(cfg, "vision_feature_layer", None), int)
    )


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def _layers_used(adapter: Any, n_layers: int) -> int:
    """How many tower layers feed the selected hidden state (``vision_feature_layer``; -1 = all)."""
    fl = getattr(adapter.config, "vision_feature_layer", -1)
    if not isinstance(fl, int):
        return n_layers
    return fl if fl >= 0 else n_layers + 1 + fl


def _tower_depth(adapter: Any) -> int:
    model = adapter.model.model
    if hasattr(model, "visual"):
        return len(model.visual.blocks)
    tower = model.vision_tower
    return len(getattr(tower, "vision_model", tower).encoder.layers)


def _clip_in_vit_ok(adapter: Any) -> bool:
    """In-ViT merging applies to plain LLaVA (one grid per image) on a CLIP tower with a class token."""
    if getattr(adapter, "family", "") != "llava":
        return False
    cfg = adapter.config
    tower = getattr(adapter.model.model, "vision_tower", None)
    vm = getattr(tower, "vision_model", tower)
    return (
        hasattr(getattr(vm, "embeddings", None), "class_embedding")
        and getattr(cfg, "vision_feature_select_strategy", "") == "default"
        and isinstance(getattr(cfg, "vision_feature_layer", None), int)
        and hasattr(vm, "pre_layrnorm")
    )


# ----------------------------------------------------------------------------------------------------------
# semantic-value probe for the post-encoder path
# ----------------------------------------------------------------------------------------------------------
class _Probe:
    """Forward hooks recording, per tower call, each patch's semantic value in the last layer feeding the
    features: class-token attention (CLIP), MAP-probe attention (SigLIP with head), else attention received;
    with ``keys=True`` (LLaVA families) also that layer's head-mean keys, the post path's ``metric="keys"``."""

    def __init__(self, adapter: Any, semantic: bool = True, keys: bool = False):
        self.adapter = adapter
        self.want_semantic, self.want_keys = semantic, keys
        self.calls: list[torch.Tensor] = []
        self.key_calls: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def __enter__(self) -> _Probe:
        model = self.adapter.model.model
        if hasattr(model, "visual"):  # Qwen2(.5)-VL
            attn = model.visual.blocks[-1].attn
            self.handles.append(attn.register_forward_pre_hook(self._qwen_hook, with_kwargs=True))
            return self
        tower = model.vision_tower
        vm = getattr(tower, "vision_model", tower)
        layers = vm.encoder.layers
        layer = layers[_layers_used(self.adapter, len(layers)) - 1]
        self.cls = hasattr(vm.embeddings, "class_embedding")
        head = getattr(vm, "head", None)
        if self.want_keys:
            self.handles.append(layer.self_attn.register_forward_pre_hook(self._key_hook, with_kwargs=True))
        if not self.want_semantic:
            return self
        if not self.cls and head is not None and _layers_used(self.adapter, len(layers)) == len(layers):
            self.handles.append(head.attention.register_forward_hook(self._map_hook))
        else:
            self.handles.append(layer.self_attn.register_forward_pre_hook(self._vit_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    @torch.no_grad()
    def _vit_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        q, k = _heads(module.q_proj(h), module.num_heads), _heads(module.k_proj(h), module.num_heads)
        if self.cls:
            p = ((q[:, :, :1] @ k.transpose(-1, -2)) * module.scale).float().softmax(-1)
            val = p.mean(1)[:, 0]
        else:  # mean attention received, one crop at a time to bound memory
            val = torch.stack([((qq @ kk.transpose(-1, -2)) * module.scale).float().softmax(-1).mean((0, 1))
                               for qq, kk in zip(q, k)])
        if getattr(self.adapter.config, "vision_feature_select_strategy", "full") == "default":
            val = val[:, 1:]
        self.calls.append(val)

    @torch.no_grad()
    def _key_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        k = _heads(module.k_proj(h), module.num_heads).mean(1).float()  # (B, T, head_dim): Turbo's metric
        if getattr(self.adapter.config, "vision_feature_select_strategy", "full") == "default":
            k = k[:, 1:]
        self.key_calls.append(k)

    def keys(self, adapter: Any, inputs: Any, items: list[VisualTokens]) -> list[torch.Tensor | None]:
        """Per item: (N, C) keys aligned with its tokens (zeros on layout tokens), or None (the features stay the
        metric for that prompt)."""
        return _aligned(adapter, inputs, self.key_calls, items)

    @torch.no_grad()
    def _map_hook(self, module: Any, args: tuple, output: Any) -> None:
        self.calls.append(output[1][:, 0].float())  # (B, T): the probe query's head-averaged attention

    @torch.no_grad()
    def _qwen_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        cu = kwargs["cu_seqlens"]
        cos, sin = kwargs["position_embeddings"]
        import importlib

        fn = importlib.import_module(type(module).__module__).apply_rotary_pos_emb_vision
        n = h.shape[0]
        q, k, _ = module.qkv(h).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = fn(q, k, cos, sin)
        out = torch.zeros(n, device=h.device)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qq, kk = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1)
            out[s:e] = ((qq @ kk.transpose(-1, -2)) * module.scaling).float().softmax(-1).mean((0, 1))
        self.calls.append(out)

    def semantic(self, adapter: Any, inputs: Any, items: list[VisualTokens]) -> list[torch.Tensor | None]:
        """Per item: (N,) values aligned with its tokens (0 on layout tokens), summing to 1; None if the layout
        could not be matched."""
        out: list[torch.Tensor | None] = []
        for item, m in zip(items, _aligned(adapter, inputs, self.calls, items)):
            if m is not None:  # None: redundancy only for this prompt
                m = m.flatten().float().clamp_min(0) * (~item.layout_mask)
                m = m / m.sum().clamp_min(1e-12)
            out.append(m)
        return out


def _aligned(adapter: Any, inputs: Any, calls: list[torch.Tensor], items: list[VisualTokens]) -> list[Any]:
    """Per item: the probe values mapped onto its tokens (first dim = len(item)), or None if the layout of this
    prompt could not be matched."""
    try:
        maps = _map_to_layout(adapter, inputs, calls)
    except Exception:  # an unexpected layout
        maps = []
    out: list[torch.Tensor | None] = []
    for i, item in enumerate(items):
        m = maps[i] if i < len(maps) else None
        ok = m is not None and m.shape[0] == len(item)
        out.append(m.to(item.features.device) if ok else None)
    return out


def _map_to_layout(adapter: Any, inputs: Any, calls: list[torch.Tensor]) -> list[torch.Tensor]:
    """Place per-patch probe values where the family's own layout code puts the patches' features."""
    model = adapter.model.model
    cfg = adapter.config
    fam = adapter.family
    calls = list(calls)
    out: list[torch.Tensor] = []
    if fam in ("qwen2_vl", "qwen2_5_vl"):
        m = cfg.vision_config.spatial_merge_size
        for key in ("image", "video"):
            if f"{key}_grid_thw" not in inputs or not calls:
                continue
            grid = inputs[f"{key}_grid_thw"]
            units = calls.pop(0).view(-1, m * m).sum(-1)  # scalar values only (keys use the features there)
            if fam == "qwen2_5_vl":
                from transformers.vision_utils import get_vision_window_index

                vc = cfg.vision_config
                widx, _ = get_vision_window_index(grid, m, vc.window_size, vc.patch_size)
                units = units[torch.argsort(widx.to(units.device))]
            out.extend(units.split((grid.prod(-1) // (m * m)).tolist()))
        return out
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    if "pixel_values" in inputs and calls:
        vals = calls.pop(0)
        if fam == "llava":
            if "mmfast_video_frames" in inputs:
                return [vals.flatten(0, 1)]
            return list(vals)
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = inputs["image_sizes"]
        bni = inputs.get("batch_num_images")
        patching = [True] * len(sizes) if bni is None else [int(n) == 1 for n in bni for _ in range(int(n))]
        counts = [
            image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if p else 1
            for s, p in zip(sizes, patching)
        ]
        vals = vals if vals.dim() == 3 else vals[..., None]
        per_image = list(vals.split(counts))
        newline = torch.zeros(vals.shape[-1], device=vals.device)
        if fam == "llava_onevision":
            packed, _ = model.pack_image_features(per_image, sizes, newline, getattr(cfg, "vision_aspect_ratio", "anyres_max_9"))
        else:
            packed, _ = model.pack_image_features(per_image, sizes, cfg.vision_feature_select_strategy, newline)
        out.extend(p.flatten(0, -2) for p in packed)
    if "pixel_values_videos" in inputs and calls:
        vals = calls.pop(0)
        vals = vals if vals.dim() == 3 else vals[..., None]
        b, frames = inputs["pixel_values_videos"].shape[:2]
        if vals.shape[1] != side * side:
            return out
        pooled = model.apply_pooling(vals) if fam == "llava_onevision" else model.vision_resampler(vals)
        pooled = pooled.reshape(b, -1, vals.shape[-1])
        if fam == "llava_onevision":
            pooled = torch.cat([pooled, pooled.new_zeros(b, 1, vals.shape[-1])], 1)  # the trailing newline
        out.extend(pooled)
    return out
