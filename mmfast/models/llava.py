"""Adapters for the LLaVA families: LLaVA-1.5, LLaVA-NeXT (images), LLaVA-NeXT-Video, LLaVA-OneVision (also
LLaVA-Video checkpoints).

Layouts (what the language model reads, as produced by transformers' own feature functions):

* LLaVA: one square patch grid per image. Videos are read as frames, one ``<image>`` per frame (how
  image-only LLaVA checkpoints are used on video); the frames form one video item.
* LLaVA-NeXT / LLaVA-NeXT-Video / LLaVA-OneVision images ("anyres"): the base view's grid, then the unpadded
  high-res grid with one newline token closing each row. A base-view-only image (one crop, or a multi-image
  OneVision prompt) keeps the base grid plus one trailing newline.
* Videos: per frame a pooled square grid (NeXT-Video: stride pooling; OneVision: 2x bilinear), and for
  OneVision one trailing newline per video.

The towers are CLIP (class token, ``vision_feature_select_strategy="default"`` drops it) or SigLIP (no class
token, ``"full"``) read at ``vision_feature_layer``: everything a vision method may ask of them (attention and keys
of that layer mapped onto the LLM tokens, the tower as plain ViT blocks, the features before the projector, the
layout of pooled crops) is implemented here with the families' own layout functions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers import BatchFeature

from mmfast.errors import UnsupportedModelError
from mmfast.models.vision import TowerProbe, VisionTower, ViTBlock, cls_attention, received_attention, split_heads
from mmfast.models.vlm import VLMAdapter
from mmfast.types import VisualTokens

#: BatchFeature key marking a LLaVA-1.5 prompt whose images are the frames of one video (set by preprocess)
_FRAMES = "mmfast_video_frames"


def _square(n: int) -> int | None:
    s = math.isqrt(n)
    return s if s * s == n else None


def anchor_grid(rows: int, cols: int, rows0: int, cols0: int, offset: int, stride0: int) -> torch.Tensor:
    """Anchors (original indices) of a pooled rows x cols grid over an original rows0 x cols0 grid laid out
    row-major from ``offset`` with ``stride0`` tokens per row: each pooled cell anchors at its window's first cell."""
    y0 = torch.arange(rows) * rows0 // rows
    x0 = torch.arange(cols) * cols0 // cols
    return offset + y0[:, None] * stride0 + x0[None, :]


def _item(feats: torch.Tensor, blocks: list, anchors: torch.Tensor, n_orig: int, kind: str, index: int,
          token_id: int) -> VisualTokens:
    it = VisualTokens.from_grid(feats, blocks, kind=kind, index=index, token_id=token_id)
    it.source, it.n_original = anchors.to(feats.device), n_orig
    return it


class _LlavaBase(VLMAdapter):
    """What every LLaVA family shares: a CLIP / SigLIP tower read at ``vision_feature_layer``, a projector."""

    capabilities = frozenset({"tower_probe", "vit_blocks", "tower_features", "video_stream"})

    # ---- the tower ------------------------------------------------------------------------------
    @property
    def _vision_model(self) -> Any:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    @property
    def _has_cls(self) -> bool:
        return hasattr(getattr(self._vision_model, "embeddings", None), "class_embedding")

    def _layers_used(self) -> int:
        """How many tower layers feed the selected hidden state (``vision_feature_layer``; -1 = all)."""
        n = len(self._vision_model.encoder.layers)
        fl = getattr(self.config, "vision_feature_layer", -1)
        if not isinstance(fl, int):
            return n
        return fl if fl >= 0 else n + 1 + fl

    @property
    def tower_layers(self) -> int:
        return self._layers_used()

    @property
    def _side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def _drops_cls(self) -> bool:
        return getattr(self.config, "vision_feature_select_strategy", "full") == "default"

    def _plain_blocks(self) -> bool:
        """The selected features are one tower layer's output, class token dropped iff there is one."""
        return (
            hasattr(getattr(self._vision_model, "encoder", None), "layers")
            and isinstance(getattr(self.config, "vision_feature_layer", None), int)
            and self._drops_cls() == self._has_cls
        )

    def _select(self, pixels: torch.Tensor) -> torch.Tensor:
        """(crops, s * s, D): the selected tower hidden states, as ``get_*_features`` selects them."""
        out = self.model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True)
        layer = self.config.vision_feature_layer
        if isinstance(layer, int):
            h = out.hidden_states[layer]
        else:
            h = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        return h[:, 1:] if self._drops_cls() else h

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        vm = self._vision_model
        h = vm.embeddings(pixels.to(self.model.model.vision_tower.dtype))
        return vm.pre_layrnorm(h) if hasattr(vm, "pre_layrnorm") else h

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(x)

    def native_side(self, modality: str) -> int:
        return self._side

    # ---- tower statistics ---------------------------------------------------------------------------
    def visual_tokens(self, inputs: BatchFeature, probe: TowerProbe | None = None) -> list[VisualTokens]:
        if not probe:
            return self._items(inputs)
        with _ViTProbe(self, probe) as hooks:
            items = self._items(inputs)
        for name, calls in (("attention", hooks.calls), ("keys", hooks.key_calls)):
            if name == "keys" and not probe.keys or name == "attention" and hooks.kind is None:
                continue
            for item, m in zip(items, self._aligned(inputs, calls, items)):
                if m is not None:
                    item.tower[name] = m.flatten() if name == "attention" else m
        return items

    def _aligned(self, inputs: BatchFeature, calls: list[torch.Tensor], items: list[VisualTokens]) -> list[Any]:
        """Per item: the per-patch probe values placed where the family's layout puts the patches' features (first
        dim = len(item)), or None where the layout of this prompt could not be matched."""
        try:
            maps = self._map_patch_values(inputs, list(calls))
        except Exception:  # an unexpected layout: the method goes on without the statistic
            maps = []
        out: list[torch.Tensor | None] = []
        for i, item in enumerate(items):
            m = maps[i] if i < len(maps) else None
            ok = m is not None and m.shape[0] == len(item)
            out.append(m.to(item.features.device) if ok else None)
        return out

    def _items(self, inputs: BatchFeature) -> list[VisualTokens]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _map_patch_values(self, inputs: BatchFeature, calls: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract


class _ViTProbe:
    """Hooks on the last tower layer feeding the features recording, per tower call, the wanted attention (the class
    token's row, SigLIP's MAP-probe attention or the mean attention received) and / or the head-mean keys."""

    def __init__(self, adapter: _LlavaBase, probe: TowerProbe):
        self.adapter, self.probe = adapter, probe
        self.calls: list[torch.Tensor] = []
        self.key_calls: list[torch.Tensor] = []
        self.handles: list[Any] = []
        vm = adapter._vision_model
        self.layers = vm.encoder.layers
        self.used = adapter._layers_used()
        self.head = getattr(vm, "head", None)
        has_cls = adapter._has_cls
        has_map = not has_cls and self.head is not None and self.used == len(self.layers)
        self.kind = probe.pick(("cls",) * has_cls + ("map",) * has_map + ("received",))

    def __enter__(self) -> _ViTProbe:
        attn = self.layers[self.used - 1].self_attn
        if self.probe.keys:
            self.handles.append(attn.register_forward_pre_hook(self._key_hook, with_kwargs=True))
        if self.kind == "map":
            self.handles.append(self.head.attention.register_forward_hook(self._map_hook))
        elif self.kind is not None:
            self.handles.append(attn.register_forward_pre_hook(self._attention_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def _qk(self, module: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        h = args[0] if args else kwargs["hidden_states"]
        return split_heads(module.q_proj(h), module.num_heads), split_heads(module.k_proj(h), module.num_heads)

    @torch.no_grad()
    def _attention_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        q, k = self._qk(module, args, kwargs)
        if self.kind == "cls":
            val = cls_attention(q, k, module.scale)
        else:  # one crop at a time to bound memory
            val = torch.stack([received_attention(qq, kk, module.scale) for qq, kk in zip(q, k)])
        self.calls.append(val[:, 1:] if self.adapter._drops_cls() else val)

    @torch.no_grad()
    def _key_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        k = split_heads(module.k_proj(h), module.num_heads).mean(1).float()  # (B, T, head_dim): Turbo's metric
        self.key_calls.append(k[:, 1:] if self.adapter._drops_cls() else k)

    @torch.no_grad()
    def _map_hook(self, module: Any, args: tuple, output: Any) -> None:
        self.calls.append(output[1][:, 0].float())  # (B, T): the probe query's head-averaged attention


# --------------------------------------------------------------------------------------------------------------
# LLaVA-1.5
# --------------------------------------------------------------------------------------------------------------
class LlavaAdapter(_LlavaBase):
    family = "llava"
    model_types = ("llava",)
    supports_video = True  # as frames (one <image> each)

    def preprocess(self, question: str, images: Any = None, video: Any = None) -> BatchFeature:
        if video is None:
            return super().preprocess(question, images=images)
        frames = [f for f in video]  # (T,H,W,3) -> list of frames, each an image
        prompt = self.build_prompt(question, "image", len(frames))
        inputs = self.processor(text=[prompt], images=frames, return_tensors="pt").to(self.device)
        inputs[_FRAMES] = torch.tensor([len(frames)])
        return inputs

    @property
    def stream_kind(self) -> str:  # type: ignore[override]
        return "image"  # a video is its frames, one <image> placeholder each

    def _groups(self, inputs: BatchFeature, n: int) -> tuple[str, list[list[int]]]:
        """(kind, images of each item): all frames form one video item, else one item per image."""
        if _FRAMES in inputs:
            return "video", [list(range(n))]
        return "image", [[i] for i in range(n)]

    def _grid_item(self, feat: torch.Tensor, kind: str, index: int, frames: int = 1) -> VisualTokens:
        per = feat.shape[0] // frames
        side = _square(per)
        rows, cols = (side, side) if side else (1, per)
        return VisualTokens.from_grid(
            feat, [(0, frames, rows, cols, False)], kind=kind, index=index, token_id=self.token_id("image")
        )

    def _items(self, inputs: BatchFeature) -> list[VisualTokens]:
        if "pixel_values" not in inputs:
            return []
        feats = list(self._encode("image", inputs))
        kind, groups = self._groups(inputs, len(feats))
        return [self._grid_item(torch.cat([feats[j] for j in g]), kind, i, frames=len(g)) for i, g in enumerate(groups)]

    def _map_patch_values(self, inputs: BatchFeature, calls: list[torch.Tensor]) -> list[torch.Tensor]:
        if "pixel_values" not in inputs or not calls:
            return []
        vals = calls.pop(0)
        return [vals.flatten(0, 1)] if _FRAMES in inputs else list(vals)

    def tower_features(self, inputs: BatchFeature, modality: str) -> torch.Tensor | None:
        if modality != "image" or "pixel_values" not in inputs:
            return None  # a video's frames are images here
        return self._select(inputs["pixel_values"])

    def grid_items(self, inputs: BatchFeature, modality: str, grids: torch.Tensor) -> list[VisualTokens]:
        s, n = self._side, grids.shape[1]
        kind, groups = self._groups(inputs, grids.shape[0])
        items = []
        for index, members in enumerate(groups):
            f = len(members)
            feats = grids[members].reshape(f * n * n, -1)
            anchors = torch.cat([anchor_grid(n, n, s, s, j * s * s, s).flatten() for j in range(f)])
            items.append(_item(feats, [(0, f, n, n, False)], anchors, f * s * s, kind, index, self.token_id("image")))
        return items

    def vision_tower(self, inputs: BatchFeature) -> VisionTower | None:
        vm = self._vision_model
        if "pixel_values" not in inputs or not self._plain_blocks() or not self._has_cls:
            return None
        pixels = inputs["pixel_values"]
        patch = self.config.vision_config.patch_size
        n_patch = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        side = _square(n_patch)
        if side is None or not hasattr(vm, "pre_layrnorm"):
            return None
        crops = pixels.shape[0]
        kind, groups = self._groups(inputs, crops)
        tid = self.token_id("image")

        def finish(hidden: torch.Tensor, size: torch.Tensor) -> list[VisualTokens]:
            kept = size > 0  # every crop keeps the same number of tokens (one schedule for all)
            t = int(kept[0].sum())
            h = hidden[kept].view(crops, t, -1)
            anchor = kept.nonzero()[:, 1].view(crops, t)
            sz = size[kept].view(crops, t)
            feats = self.project(h)
            items = []
            for index, members in enumerate(groups):
                base = VisualTokens.from_grid(
                    torch.zeros(len(members) * n_patch, 1, device=h.device), [(0, len(members), side, side, False)],
                    kind=kind, index=index, token_id=tid,
                )
                src = torch.cat([anchor[b] + j * n_patch for j, b in enumerate(members)])
                items.append(base.with_tokens(
                    torch.cat([feats[b] for b in members]), base.coords[src], src, torch.cat([sz[b] for b in members])
                ))
            return items

        return VisionTower(
            pixels=pixels, embed=self._embed, blocks=[ViTBlock(x) for x in vm.encoder.layers[: self._layers_used()]],
            has_cls=True, anyres=False, crops_per_image=[1] * crops,
            visible=torch.ones(crops, n_patch, dtype=torch.bool, device=pixels.device), finish=finish,
        )


# --------------------------------------------------------------------------------------------------------------
# anyres families
# --------------------------------------------------------------------------------------------------------------
class _AnyresAdapter(_LlavaBase):
    """Anyres images (base view + unpadded high-res tiles with row newlines) and pooled video frames."""

    onevision: bool = False

    # ---- layout arithmetic (the families' own functions) ---------------------------------------------
    def _crop_counts(self, inputs: BatchFeature) -> list[int]:
        """Crops per image (base view + anyres tiles; 1 in multi-image OneVision prompts), as
        ``get_image_features`` counts them."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.config
        sizes = inputs["image_sizes"]
        bni = inputs.get("batch_num_images")
        patching = [True] * len(sizes) if bni is None else [int(n) == 1 for n in bni for _ in range(int(n))]
        return [
            image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if p else 1
            for s, p in zip(sizes, patching)
        ]

    def _image_crops(self, inputs: BatchFeature) -> torch.Tensor:
        """(crops, C, H, W) the tower encodes for the images (padding crops dropped, as get_image_features)."""
        pv = inputs["pixel_values"]
        if pv.dim() == 5:
            pv = torch.cat([p[:c] for p, c in zip(pv, self._crop_counts(inputs))])
        return pv

    def _hires_shape(self, image_size: Any, side: int) -> tuple[int, int]:
        """(rows, cols) of the unpadded hi-res grid when every tile is a ``side`` x ``side`` grid (OneVision:
        after its ``anyres_max`` down-sizing)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        cfg = self.config
        size = image_size.tolist() if hasattr(image_size, "tolist") else list(image_size)
        nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        h, w = unpad_image(torch.empty(1, nph * side, npw * side), size).shape[1:]
        if self.onevision:
            max_patches = int(str(getattr(cfg, "vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
            ratio = math.sqrt(h * w / (max_patches * side * side))
            if ratio > 1.1:
                h, w = int(h // ratio), int(w // ratio)
        return h, w

    def _pack(self, per_image: list[torch.Tensor], sizes: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
        """The family's ``pack_image_features`` (crops of each image -> its LLM tokens)."""
        model = self.model.model
        if self.onevision:
            aspect = getattr(self.config, "vision_aspect_ratio", "anyres_max_9")
            return list(model.pack_image_features(per_image, sizes, newline, aspect)[0])
        strategy = self.config.vision_feature_select_strategy
        return list(model.pack_image_features(per_image, sizes, strategy, newline)[0])

    def _anyres_item(self, feat: torch.Tensor, image_size: torch.Tensor, index: int) -> VisualTokens:
        s = self._side
        n = feat.shape[0]
        tid = self.token_id("image")
        if n in (s * s, s * s + 1):  # base view only (+ trailing newline)
            blocks = [(0, 1, s, s, False)] + ([(0, 0, 0, 0, True)] if n == s * s + 1 else [])
            return VisualTokens.from_grid(feat, blocks, kind="image", index=index, token_id=tid)
        h, w = self._hires_shape(image_size, s)
        if s * s + h * (w + 1) != n:
            raise UnsupportedModelError(f"Unexpected anyres layout: {n} tokens for an image of size {image_size}.")
        blocks = [(0, 1, s, s, False), (1, 1, h, w, True)]
        return VisualTokens.from_grid(feat, blocks, kind="image", index=index, token_id=tid)

    def _image_items(self, inputs: BatchFeature) -> list[VisualTokens]:
        if "pixel_values" not in inputs:
            return []
        feats = self._encode("image", inputs)
        sizes = inputs["image_sizes"]
        return [self._anyres_item(f, sizes[i], i) for i, f in enumerate(feats)]

    def _video_items(self, inputs: BatchFeature) -> list[VisualTokens]:
        if "pixel_values_videos" not in inputs:
            return []
        frames = inputs["pixel_values_videos"].shape[1]
        video = self._encode("video", inputs)  # (B, frames * tokens [+ 1 newline], D)
        items = []
        for i, feat in enumerate(video):
            side = _square((feat.shape[0] - int(self.onevision)) // frames)
            if side is None:
                raise UnsupportedModelError(f"{type(self.model).__name__} frames are expected to give square grids.")
            blocks = [(0, frames, side, side, False)] + ([(0, 0, 0, 0, True)] if self.onevision else [])
            items.append(VisualTokens.from_grid(feat, blocks, kind="video", index=i, token_id=self.token_id("video")))
        return items

    def _items(self, inputs: BatchFeature) -> list[VisualTokens]:
        return self._image_items(inputs) + self._video_items(inputs)

    def _pool_frames(self, vals: torch.Tensor) -> torch.Tensor:
        """Per-frame tower values (B * frames, s * s, C) -> what the family's video pooling makes of them."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _map_patch_values(self, inputs: BatchFeature, calls: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        s = self._side
        if "pixel_values" in inputs and calls:
            vals = calls.pop(0)
            vals = vals if vals.dim() == 3 else vals[..., None]
            per_image = list(vals.split(self._crop_counts(inputs)))
            newline = torch.zeros(vals.shape[-1], device=vals.device)
            out.extend(p.flatten(0, -2) for p in self._pack(per_image, inputs["image_sizes"], newline))
        if "pixel_values_videos" in inputs and calls:
            vals = calls.pop(0)
            vals = vals if vals.dim() == 3 else vals[..., None]
            b = inputs["pixel_values_videos"].shape[0]
            if vals.shape[1] != s * s:
                return out
            pooled = self._pool_frames(vals).reshape(b, -1, vals.shape[-1])
            if self.onevision:
                pooled = torch.cat([pooled, pooled.new_zeros(b, 1, vals.shape[-1])], 1)  # the trailing newline
            out.extend(pooled)
        return out

    # ---- features before the projector, and the layout of pooled crops ---------------------------------
    def tower_features(self, inputs: BatchFeature, modality: str) -> torch.Tensor | None:
        if modality == "image":
            return self._select(self._image_crops(inputs)) if "pixel_values" in inputs else None
        if "pixel_values_videos" not in inputs:
            return None
        return self._select(inputs["pixel_values_videos"].flatten(0, 1))

    def grid_items(self, inputs: BatchFeature, modality: str, grids: torch.Tensor) -> list[VisualTokens]:
        s, n = self._side, grids.shape[1]
        newline = getattr(self.model.model, "image_newline", None)
        if modality == "image":
            counts = self._crop_counts(inputs)
            sizes = inputs["image_sizes"]
            return [self._anyres_grid_item(c, sizes[i], n, s, i, newline) for i, c in enumerate(grids.split(counts))]
        b, frames = inputs["pixel_values_videos"].shape[:2]
        v = self.native_side("video")
        h = grids.reshape(b, frames * n * n, -1)
        items = []
        for i in range(b):
            feats, blocks = h[i], [(0, frames, n, n, False)]
            anchors = torch.cat([anchor_grid(n, n, v, v, f * v * v, v).flatten() for f in range(frames)])
            n_orig = frames * v * v
            if self.onevision:
                feats = torch.cat([feats, newline[None].to(feats)])
                blocks.append((0, 0, 0, 0, True))
                anchors = torch.cat([anchors, torch.tensor([n_orig])])
                n_orig += 1
            items.append(_item(feats, blocks, anchors, n_orig, "video", i, self.token_id("video")))
        return items

    def _anyres_grid_item(
        self, crops: torch.Tensor, image_size: Any, n: int, s: int, index: int, newline: Any
    ) -> VisualTokens:
        """Pooled crops (crops, n, n, D) laid out like the family's ``pack_image_features`` lays out full ones."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        cfg = self.config
        d = crops.shape[-1]
        tid = self.token_id("image")
        base = crops[0].reshape(n * n, d)
        base_anchor = anchor_grid(n, n, s, s, 0, s).flatten()
        if crops.shape[0] == 1:  # base view only (+ trailing newline)
            feats, blocks, anchors, n_orig = base, [(0, 1, n, n, False)], base_anchor, s * s
            if newline is not None:
                feats = torch.cat([base, newline[None].to(base)])
                blocks.append((0, 0, 0, 0, True))
                anchors = torch.cat([anchors, torch.tensor([s * s])])
                n_orig += 1
            return _item(feats, blocks, anchors, n_orig, "image", index, tid)
        size = image_size.tolist()
        nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        grid = crops[1:].reshape(nph, npw, n, n, d).permute(4, 0, 2, 1, 3).reshape(d, nph * n, npw * n)
        grid = unpad_image(grid, size)
        h, w = self._hires_shape(image_size, n)
        if (h, w) != tuple(grid.shape[1:]):
            grid = F.interpolate(grid[None], [h, w], mode="bilinear")[0]
        rows = torch.cat([grid, newline[:, None, None].expand(d, h, 1).to(grid)], -1)
        feats = torch.cat([base, rows.flatten(1).transpose(0, 1)])
        h0, w0 = self._hires_shape(image_size, s)
        hi = anchor_grid(h, w, h0, w0, s * s, w0 + 1)
        nl = s * s + ((torch.arange(h) + 1) * h0 // h - 1) * (w0 + 1) + w0  # the newline before the next row's window
        anchors = torch.cat([base_anchor, torch.cat([hi, nl[:, None]], 1).flatten()])
        return _item(feats, [(0, 1, n, n, False), (1, 1, h, w, True)], anchors, s * s + h0 * (w0 + 1), "image", index, tid)

    # ---- the tower as ViT blocks (image prompts) ---------------------------------------------------------
    def vision_tower(self, inputs: BatchFeature) -> VisionTower | None:
        """Image prompts only (video frames are pooled after the projector, which merged tokens cannot go
        through); None when the packing interpolates the hi-res grid (``anyres_max``: a token has no one patch)."""
        if "pixel_values" not in inputs or "pixel_values_videos" in inputs or not self._plain_blocks():
            return None
        model = self.model.model
        counts = self._crop_counts(inputs)
        pixels = self._image_crops(inputs)
        n_crops = pixels.shape[0]
        n_patch = (pixels.shape[-1] // self.config.vision_config.patch_size) ** 2
        sizes_hw = inputs["image_sizes"]
        dev = pixels.device
        # 1-based patch index of every packed token (0 = newline): where the family's layout puts each crop patch
        index = torch.arange(1, n_crops * n_patch + 1, dtype=torch.float32, device=dev)
        ids = [i.flatten() for i in self._pack(list(index.view(n_crops, n_patch, 1).split(counts)), sizes_hw,
                                               torch.zeros(1, device=dev))]
        flat = torch.cat(ids)
        regular = flat[flat > 0]
        if not torch.equal(regular, regular.round()) or regular.unique().numel() != regular.numel():
            return None
        visible = torch.zeros(n_crops * n_patch, dtype=torch.bool, device=dev)
        visible[regular.long() - 1] = True  # unpadding drops the patches of the padded margin

        def finish(hidden: torch.Tensor, size: torch.Tensor) -> list[VisualTokens]:
            feats = self._pack(list(self.project(hidden).split(counts)), sizes_hw, model.image_newline)
            patch_sizes = size.flatten()
            items = []
            for i, (f, idx) in enumerate(zip(feats, ids)):
                item = self._anyres_item(f, sizes_hw[i], i)
                patch = (idx.long() - 1).clamp_min(0)
                tok_size = torch.where(item.layout_mask, torch.ones_like(idx), patch_sizes[patch])
                item.sizes = tok_size.to(item.sizes.dtype)
                items.append(item.select((item.layout_mask | (tok_size > 0)).nonzero().flatten()))
            return items

        vm = self._vision_model
        return VisionTower(
            pixels=pixels, embed=self._embed, blocks=[ViTBlock(x) for x in vm.encoder.layers[: self._layers_used()]],
            has_cls=self._has_cls, anyres=True, crops_per_image=counts, visible=visible.view(n_crops, n_patch),
            finish=finish,
        )


class LlavaNextAdapter(_AnyresAdapter):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres images, no video input."""

    family = "llava_next"
    model_types = ("llava_next",)
    supports_video = False
    capabilities = _AnyresAdapter.capabilities - {"video_stream"}

    def _items(self, inputs: BatchFeature) -> list[VisualTokens]:
        return self._image_items(inputs)


class LlavaNextVideoAdapter(_AnyresAdapter):
    family = "llava_next_video"
    model_types = ("llava_next_video",)

    def native_side(self, modality: str) -> int:
        if modality == "video":
            return self._side // int(getattr(self.config, "spatial_pool_stride", 2))
        return self._side

    def _pool_frames(self, vals: torch.Tensor) -> torch.Tensor:
        return self.model.model.vision_resampler(vals)


class LlavaOnevisionAdapter(_AnyresAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    onevision = True

    def native_side(self, modality: str) -> int:
        return math.ceil(self._side / 2) if modality == "video" else self._side

    def _pool_frames(self, vals: torch.Tensor) -> torch.Tensor:
        return self.model.model.apply_pooling(vals)

    def fallback_prompt(self, question: str, kind: str, n_visual: int) -> str:
        token = getattr(self.processor, f"{kind}_token", f"<{kind}>")
        return f"<|im_start|>user {token * n_visual}\n{question}<|im_end|><|im_start|>assistant\n"
