"""Adapters for the LLaVA families: LLaVA-1.5, LLaVA-NeXT-Video and LLaVA-OneVision (also LLaVA-Video).

Layouts (what the language model reads, as produced by transformers' own feature functions):

* LLaVA: one square patch grid per image. Videos are read as frames, one ``<image>`` per frame (how
  image-only LLaVA checkpoints are used on video); the frames form one video item.
* LLaVA-NeXT-Video / LLaVA-OneVision images ("anyres"): the base view's grid, then the unpadded high-res
  grid with one newline token closing each row. A multi-image OneVision prompt keeps only the base view
  plus one trailing newline per image.
* Videos: per frame a pooled square grid (NeXT-Video: stride pooling; OneVision: 2x bilinear), and for
  OneVision one trailing newline per video.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import BatchFeature

from mmfast.errors import UnsupportedModelError
from mmfast.models.vlm import VisualTokens, VLMAdapter, register_adapter


def _square(n: int) -> int | None:
    s = math.isqrt(n)
    return s if s * s == n else None


@register_adapter
class LlavaAdapter(VLMAdapter):
    family = "llava"
    model_types = ("llava",)
    supports_video = True  # as frames (one <image> each)

    def preprocess(self, question: str, images: Any = None, video: Any = None) -> BatchFeature:
        if video is None:
            return super().preprocess(question, images=images)
        frames = [f for f in video]  # (T,H,W,3) → list of frames, each an image
        prompt = self.build_prompt(question, "image", len(frames))
        inputs = self.processor(text=[prompt], images=frames, return_tensors="pt").to(self.device)
        inputs["mmfast_video_frames"] = torch.tensor([len(frames)])
        return inputs

    def _grid_item(self, feat: torch.Tensor, kind: str, index: int, frames: int = 1) -> VisualTokens:
        per = feat.shape[0] // frames
        side = _square(per)
        rows, cols = (side, side) if side else (1, per)
        return VisualTokens.from_grid(
            feat, [(0, frames, rows, cols, False)], kind=kind, index=index, token_id=self.token_id("image")
        )

    def visual_tokens(self, inputs: BatchFeature) -> list[VisualTokens]:
        if "pixel_values" not in inputs:
            return []
        feats = list(self._encode("image", inputs))
        if "mmfast_video_frames" in inputs:  # frames of one video
            return [self._grid_item(torch.cat(feats), "video", 0, frames=len(feats))]
        return [self._grid_item(f, "image", i) for i, f in enumerate(feats)]


class _AnyresMixin:
    """Layout of anyres image features (base view + unpadded high-res grid with row newlines)."""

    onevision: bool = False

    def _anyres_item(self: Any, feat: torch.Tensor, image_size: torch.Tensor, index: int) -> VisualTokens:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        vc = self.config.vision_config
        s = vc.image_size // vc.patch_size
        n = feat.shape[0]
        tid = self.token_id("image")
        if n in (s * s, s * s + 1):  # base view only (+ trailing newline)
            blocks = [(0, 1, s, s, False)] + ([(0, 0, 0, 0, True)] if n == s * s + 1 else [])
            return VisualTokens.from_grid(feat, blocks, kind="image", index=index, token_id=tid)
        nph, npw = get_anyres_image_grid_shape(image_size.tolist(), self.config.image_grid_pinpoints, vc.image_size)
        h, w = unpad_image(torch.empty(1, nph * s, npw * s), image_size.tolist()).shape[1:]
        if self.onevision:  # anyres_max_N: bilinear down-size of the high-res grid when too large
            max_patches = int(str(getattr(self.config, "vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
            ratio = math.sqrt(h * w / (max_patches * s * s))
            if ratio > 1.1:
                h, w = int(h // ratio), int(w // ratio)
        if s * s + h * (w + 1) != n:
            raise UnsupportedModelError(f"Unexpected anyres layout: {n} tokens for an image of size {image_size}.")
        blocks = [(0, 1, s, s, False), (1, 1, h, w, True)]
        return VisualTokens.from_grid(feat, blocks, kind="image", index=index, token_id=tid)

    def _image_items(self: Any, inputs: BatchFeature) -> list[VisualTokens]:
        if "pixel_values" not in inputs:
            return []
        feats = self._encode("image", inputs)
        sizes = inputs["image_sizes"]
        return [self._anyres_item(f, sizes[i], i) for i, f in enumerate(feats)]


@register_adapter
class LlavaNextVideoAdapter(_AnyresMixin, VLMAdapter):
    family = "llava_next_video"
    model_types = ("llava_next_video",)

    def visual_tokens(self, inputs: BatchFeature) -> list[VisualTokens]:
        items = self._image_items(inputs)
        if "pixel_values_videos" in inputs:
            frames = inputs["pixel_values_videos"].shape[1]
            video = self._encode("video", inputs)  # (B, frames * tokens, D)
            for i, feat in enumerate(video):
                side = _square(feat.shape[0] // frames)
                if side is None:
                    raise UnsupportedModelError("LLaVA-NeXT-Video frames are expected to give square grids.")
                items.append(
                    VisualTokens.from_grid(
                        feat, [(0, frames, side, side, False)], kind="video", index=i, token_id=self.token_id("video")
                    )
                )
        return items


@register_adapter
class LlavaOnevisionAdapter(_AnyresMixin, VLMAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    onevision = True

    def visual_tokens(self, inputs: BatchFeature) -> list[VisualTokens]:
        items = self._image_items(inputs)
        if "pixel_values_videos" in inputs:
            frames = inputs["pixel_values_videos"].shape[1]
            video = self._encode("video", inputs)  # (B, frames * tokens + 1, D): pooled frames, then a newline
            for i, feat in enumerate(video):
                side = _square((feat.shape[0] - 1) // frames)
                if side is None:
                    raise UnsupportedModelError("LLaVA-OneVision frames are expected to give square grids.")
                blocks = [(0, frames, side, side, False), (0, 0, 0, 0, True)]
                items.append(
                    VisualTokens.from_grid(feat, blocks, kind="video", index=i, token_id=self.token_id("video"))
                )
        return items

    def fallback_prompt(self, question: str, kind: str, n_visual: int) -> str:
        token = getattr(self.processor, f"{kind}_token", f"<{kind}>")
        return f"<|im_start|>user {token * n_visual}\n{question}<|im_end|><|im_start|>assistant\n"
