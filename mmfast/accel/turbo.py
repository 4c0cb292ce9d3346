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

Two deployment paths, chosen per model (``path="auto"``):

* **in-ViT** (CLIP towers with a class token whose blocks mmfast can run itself: LLaVA-1.5): merging inside
  every encoder layer that feeds the selected hidden state, after the attention sub-layer, exactly as the
  reference patches CLIP. Each token carries its *anchor* (the patch it sits at: a merge keeps the B token's
  anchor) so the kept tokens keep their grid coordinates and sequence positions.
* **post-encoder** (the reference's simplified ``merge_features`` "fold" path, used for anyres / video /
  pre-merged layouts: LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2(.5)-VL, or ``path="post"``): repeated bipartite
  merges of the projector outputs of one image / video (newline layout tokens excluded and kept), metric = the
  features themselves, then every token is rescaled by ``1 + log(size)`` (``rescale=True``, as ``merge_features``
  does to its output features; a merged token's embedding gets longer instead of getting a log-size attention
  bias, which the LLM's attention cannot take).

Semantic value where there is no class token (SigLIP in LLaVA-OneVision, Qwen's ViT): ``semantic="auto"`` uses
the class-token row when the tower has one, else the attention the SigLIP MAP-pooling probe pays to each patch
when the tower keeps its head, else the mean attention each patch *receives* in the last tower layer feeding the
features (recomputed from that layer's input by a probe hook; the merged-unit value for Qwen is the sum over its
2x2 patches). Values are mapped through the family's own layout functions and normalised to sum to 1 over the
tokens being merged (as class-token attention sums to ~1 over an image). ``semantic="none"`` ranks by redundancy
only (the reference ``merge_features`` default).

Departures from the reference code: (1) token order is kept (merged tokens stay at their anchor, as the
reference ``folder.py`` does with ``transform_index``; the reference in-ViT patch appends merged tokens at the
end), so the A/B alternation stays spatial; (2) with ``keep=`` the per-layer r schedule is computed to land
exactly on the target and a layer that must merge more than half its tokens folds (repeats the matching on the
merged metric, as Folder does); ``min_tokens`` only applies to ``r=`` schedules; (3) the post path merges in
rounds of at most a quarter of the tokens (the reference fold merges all of set A per round when r is large,
which leaves the ranking no choice); (4) the Folder LLaVA code scales the semantic term by 100 instead of
Turbo's 30; we keep 30.
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
        if self.path == "vit":
            raise IncompatibleAcceleratorError(
                f"turbo(path='vit') merges inside CLIP towers with a class token (LLaVA-1.5); "
                f"{type(adapter.model).__name__} needs the post-encoder path (path='post' or 'auto')."
            )
        with ExitStack() as stack:
            probe = None if self.semantic == "none" or not self._weight() else stack.enter_context(_Probe(adapter))
            items = adapter.visual_tokens(inputs)
        sems = probe.semantic(adapter, inputs, items) if probe is not None else [None] * len(items)
        depth = _layers_used(adapter, _tower_depth(adapter))
        for item, sem in zip(items, sems):
            item.extra = {**item.extra, _LAYERS: depth, **({} if sem is None else {_SEM: sem})}
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
        out = fold_merge(
            tokens.features[regular][None],
            tokens.sizes[regular].float()[None],
            regular[None],
            None,
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
        bsz, t, _ = h.shape
        n_patch = t - 1
        side = math.isqrt(n_patch)
        if side * side != n_patch:
            return None
        if self.keep is not None:
            target = max(1, round(self.keep * n_patch))
            sched = layer_schedule(n_patch, target, n_used)
            threshold = 0  # keep-schedules land exactly on the target
        else:
            sched = [self.r] * n_used
            threshold = self.min_tokens
        size = torch.ones(bsz, t, device=h.device)
        anchor = torch.arange(-1, n_patch, device=h.device).expand(bsz, -1)  # CLS anchor -1 stays first
        merged_layers = 0
        for i, layer in enumerate(layers[:n_used]):
            attn = layer.self_attn
            res = h
            z = layer.layer_norm1(h)
            q, k, v = (_heads(p(z), attn.num_heads) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            prop = None if bool((size == 1).all()) else size
            o = proportional_attention(q, k, v, prop, attn.scale)
            h = res + attn.out_proj(o.transpose(1, 2).reshape(bsz, h.shape[1], -1))
            r = sched[i]
            if r > 0 and h.shape[1] >= threshold and self.semantic == "none":
                out = fold_merge(h, size, anchor, k.mean(1), r, protect_first=True)
                h, size, anchor = out.x, out.size, out.anchor
            elif r > 0 and h.shape[1] >= threshold:
                cls_logits = (q[:, :, :1] @ k.transpose(-1, -2)) * attn.scale + size.log()[:, None, None, :]
                cls_attn = cls_logits.float().softmax(-1).mean(1)[:, 0]  # (B, T) attention from CLS, head mean
                out = fold_merge(
                    h, size, anchor, k.mean(1), r, cls_attn, self._weight(merged_layers), protect_first=True
                )
                h, size, anchor = out.x, out.size, out.anchor
                merged_layers += 1
            h = h + layer.mlp(layer.layer_norm2(h))
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
    features: class-token attention (CLIP), MAP-probe attention (SigLIP with head), else attention received."""

    def __init__(self, adapter: Any):
        self.adapter = adapter
        self.calls: list[torch.Tensor] = []
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
        try:
            maps = _map_to_layout(adapter, inputs, self.calls)
        except Exception:  # an unexpected layout: fall back to redundancy only for this prompt
            maps = []
        out: list[torch.Tensor | None] = []
        for i, item in enumerate(items):
            m = maps[i].flatten().float() if i < len(maps) else None
            if m is None or m.numel() != len(item):
                out.append(None)
                continue
            m = m.to(item.features.device).clamp_min(0) * (~item.layout_mask)
            out.append(m / m.sum().clamp_min(1e-12))
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
            units = calls.pop(0).view(-1, m * m).sum(-1)
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
                return [vals.flatten()]
            return list(vals)
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = inputs["image_sizes"]
        bni = inputs.get("batch_num_images")
        patching = [True] * len(sizes) if bni is None else [int(n) == 1 for n in bni for _ in range(int(n))]
        counts = [
            image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if p else 1
            for s, p in zip(sizes, patching)
        ]
        per_image = list(vals[..., None].split(counts))
        newline = torch.zeros(1, device=vals.device)
        if fam == "llava_onevision":
            packed, _ = model.pack_image_features(per_image, sizes, newline, getattr(cfg, "vision_aspect_ratio", "anyres_max_9"))
        else:
            packed, _ = model.pack_image_features(per_image, sizes, cfg.vision_feature_select_strategy, newline)
        out.extend(p.flatten() for p in packed)
    if "pixel_values_videos" in inputs and calls:
        vals = calls.pop(0)[..., None]
        b, frames = inputs["pixel_values_videos"].shape[:2]
        if vals.shape[1] != side * side:
            return out
        pooled = model.apply_pooling(vals) if fam == "llava_onevision" else model.vision_resampler(vals)
        pooled = pooled.reshape(b, -1)
        if fam == "llava_onevision":
            pooled = torch.cat([pooled, pooled.new_zeros(b, 1)], 1)  # the trailing newline
        out.extend(pooled)
    return out
