"""Adapters for Qwen2-VL and Qwen2.5-VL.

Layout: each image / video covers a ``(t, h, w)`` patch grid (``image_grid_thw`` / ``video_grid_thw``);
the merger folds ``m x m`` neighbouring patches (``spatial_merge_size``) into one LLM token, so the LLM reads
``t * (h/m) * (w/m)`` tokens in (t, row, col) order. For videos ``t`` counts temporal patches of
``temporal_patch_size`` frames each.

Positions are M-RoPE: ``generate`` feeds 4-row position ids (a text row, then temporal / height / width).
Reduced prompts keep the original 3-D positions of kept tokens (the rotary angles still say where each kept
token was in the image) and renumber only the text row, which transformers uses for masking.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import BatchFeature

from mmfast.models.vlm import VisualTokens, VLMAdapter, register_adapter


@register_adapter
class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")

    def _items(self, inputs: BatchFeature, modality: str) -> list[VisualTokens]:
        key = "pixel_values" if modality == "image" else "pixel_values_videos"
        if key not in inputs:
            return []
        feats = self._encode(modality, inputs)
        grids = inputs[f"{modality}_grid_thw"]
        m = self.config.vision_config.spatial_merge_size
        items = []
        for i, (feat, (t, h, w)) in enumerate(zip(feats, grids.tolist())):
            items.append(
                VisualTokens.from_grid(
                    feat, [(0, t, h // m, w // m, False)], kind=modality, index=i, token_id=self.token_id(modality)
                )
            )
        return items

    def visual_tokens(self, inputs: BatchFeature) -> list[VisualTokens]:
        return self._items(inputs, "image") + self._items(inputs, "video")

    def original_position_ids(self, inputs: BatchFeature) -> torch.Tensor | None:
        kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
        return self.model._prepare_position_ids_for_generation(inputs["input_ids"], kwargs)

    def reduce_position_ids(self, pos: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        pos = pos[..., kept].clone()
        if pos.shape[0] == 4:  # text row: a plain 0..L'-1 so masking never mistakes gaps for packed sequences
            pos[0] = torch.arange(kept.numel(), device=pos.device)
        return pos

    def fallback_prompt(self, question: str, kind: str, n_visual: int) -> str:
        pad = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
        vis = f"<|vision_start|>{pad}<|vision_end|>" * n_visual
        return f"<|im_start|>user\n{vis}{question}<|im_end|>\n<|im_start|>assistant\n"

    def video_kwargs(self) -> dict[str, Any]:
        return {"do_sample_frames": False}
