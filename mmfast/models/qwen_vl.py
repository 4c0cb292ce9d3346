"""Adapters for Qwen2-VL and Qwen2.5-VL.

Layout: each image / video covers a ``(t, h, w)`` patch grid (``image_grid_thw`` / ``video_grid_thw``);
the merger folds ``m x m`` neighbouring patches (``spatial_merge_size``) into one LLM token, so the LLM reads
``t * (h/m) * (w/m)`` tokens in (t, row, col) order. For videos ``t`` counts temporal patches of
``temporal_patch_size`` frames each.

Positions are M-RoPE: ``generate`` feeds 4-row position ids (a text row, then temporal / height / width).
Reduced prompts keep the original 3-D positions of kept tokens (the rotary angles still say where each kept
token was in the image) and renumber only the text row, which transformers uses for masking.

Tower statistics: the vision blocks use windowed attention with rotary angles (Qwen2.5-VL) over packed
sequences, so the only attention offered is the mean attention each patch receives in the last block (per
attention window), summed over the ``m x m`` patches of an LLM token; keys are not offered.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from transformers import BatchFeature

from mmfast.models.vision import TowerProbe, received_attention
from mmfast.models.vlm import VLMAdapter
from mmfast.types import VisualTokens


class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    capabilities = frozenset({"tower_probe", "video_stream"})

    @property
    def tower_layers(self) -> int:
        return len(self.model.model.visual.blocks)

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

    def visual_tokens(self, inputs: BatchFeature, probe: TowerProbe | None = None) -> list[VisualTokens]:
        if not probe or probe.pick(("received",)) is None:
            return self._items(inputs, "image") + self._items(inputs, "video")
        calls: list[torch.Tensor] = []
        attn = self.model.model.visual.blocks[-1].attn
        handle = attn.register_forward_pre_hook(_received_hook(calls), with_kwargs=True)
        try:
            items = self._items(inputs, "image") + self._items(inputs, "video")
        finally:
            handle.remove()
        try:
            maps = self._map_patch_values(inputs, calls)
        except Exception:  # an unexpected layout: the method goes on without the statistic
            maps = []
        for i, item in enumerate(items):
            if i < len(maps) and maps[i].shape[0] == len(item):
                item.tower["attention"] = maps[i].to(item.features.device).flatten()
        return items

    def _map_patch_values(self, inputs: BatchFeature, calls: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-patch values (in the tower's window order for Qwen2.5-VL) -> per LLM token (sum over its patches)."""
        cfg = self.config
        m = cfg.vision_config.spatial_merge_size
        out: list[torch.Tensor] = []
        calls = list(calls)
        for key in ("image", "video"):
            if f"{key}_grid_thw" not in inputs or not calls:
                continue
            grid = inputs[f"{key}_grid_thw"]
            units = calls.pop(0).view(-1, m * m).sum(-1)
            if self.config.model_type == "qwen2_5_vl":
                from transformers.vision_utils import get_vision_window_index

                vc = cfg.vision_config
                widx, _ = get_vision_window_index(grid, m, vc.window_size, vc.patch_size)
                units = units[torch.argsort(widx.to(units.device))]
            out.extend(units.split((grid.prod(-1) // (m * m)).tolist()))
        return out

    def original_position_ids(self, inputs: BatchFeature) -> torch.Tensor | None:
        kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
        return self.model._prepare_position_ids_for_generation(inputs["input_ids"], kwargs)

    def reduce_position_ids(self, pos: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        pos = pos[..., kept].clone()
        if pos.shape[0] == 4:  # text row: a plain 0..L'-1 so masking never mistakes gaps for packed sequences
            pos[0] = torch.arange(kept.numel(), device=pos.device)
        return pos

    # ---- streaming: M-RoPE positions of a video fed one temporal patch at a time -------------------------------
    @property
    def stream_chunk(self) -> int:  # type: ignore[override]
        return int(self.config.vision_config.temporal_patch_size)

    def _stream_rope(self, state: Any, chunks: int, suffix: int = 1) -> torch.Tensor:
        """(3, L) the model's own positions of ``prefix + video of `chunks` temporal patches + suffix`` tokens."""
        ps = state.position_state
        ref = ps["inputs"]
        grid = ref["video_grid_thw"].clone()
        grid[:, 0] = chunks
        per = int(grid.prod()) // self.config.vision_config.spatial_merge_size ** 2
        prefix = state.layout.prefix
        tid = self.token_id("video")
        ids = torch.tensor([[*prefix, *([tid] * per), *state.layout.suffix[:1] * suffix]], device=self.device)
        types = (ids == tid).to(torch.int) * 2
        inputs = BatchFeature({"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types,
                               "video_grid_thw": grid})
        if "second_per_grid_ts" in ref:
            inputs["second_per_grid_ts"] = ref["second_per_grid_ts"]
        pos = self.original_position_ids(inputs)
        return pos[-3:, 0]

    def stream_positions(self, state: Any, kind: str, n: int, item: VisualTokens | None = None) -> torch.Tensor:
        ps = state.position_state
        if kind == "frame":
            ps.setdefault("inputs", item.extra["stream_inputs"])
            k = 0 if state.compact else state.chunks
            table = ps.get("table")
            if table is None or k >= ps["table_chunks"]:  # the model's own positions, for twice as many chunks
                chunks = max(2, 2 * ps.get("table_chunks", 1), k + 1)
                p = len(state.layout.prefix)
                ps["table"], ps["table_chunks"] = self._stream_rope(state, chunks, suffix=0)[:, p:] - p, chunks
                ps["per"] = ps["table"].shape[1] // chunks
            per = ps["per"]
            base = state.cache.stored if state.compact else len(state.layout.prefix)
            pos = base + ps["table"][:, k * per : (k + 1) * per]
            pos = pos[:, item.source.to(pos.device)]  # a vision method may have kept some of the chunk's tokens
            ps["next"] = int(pos.max()) + 1
            ps["offsets"] = True
            return pos[:, None]
        start = ps.get("next", 0)  # text: the prefix, separators, a carrier after its frame
        if kind in ("trailer", "question") and "offsets" in ps:
            if state.compact:  # the question continues over the compacted sequence
                start = state.cache.stored
            elif not ps.get("tail"):  # the text after the whole video, as the model places it
                start = int(self._stream_rope(state, state.chunks)[0, -1])
            ps["tail"] = True
        if kind == "frame" or kind == "text":
            ps.pop("tail", None)
        ps["next"] = start + n
        return torch.arange(start, start + n, device=self.device).expand(3, 1, n)

    def stream_answer_position(self, state: Any, last: torch.Tensor) -> None:
        # generate gives the next token the text position cache.seen; the rope delta makes it `last`
        self.model.model.rope_deltas = (last.reshape(3, -1)[0, -1] - state.cache.seen).view(1, 1)

    def fallback_prompt(self, question: str, kind: str, n_visual: int) -> str:
        pad = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
        vis = f"<|vision_start|>{pad}<|vision_end|>" * n_visual
        return f"<|im_start|>user\n{vis}{question}<|im_end|>\n<|im_start|>assistant\n"

    def video_kwargs(self) -> dict[str, Any]:
        return {"do_sample_frames": False}


def _received_hook(calls: list[torch.Tensor]) -> Any:
    """Pre-hook on a Qwen vision block's attention: mean attention each patch receives, per attention window."""

    @torch.no_grad()
    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        cu = kwargs["cu_seqlens"]
        cos, sin = kwargs["position_embeddings"]
        rope = importlib.import_module(type(module).__module__).apply_rotary_pos_emb_vision
        n = h.shape[0]
        q, k, _ = module.qkv(h).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rope(q, k, cos, sin)
        out = torch.zeros(n, device=h.device)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            out[s:e] = received_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), module.scaling)
        calls.append(out)

    return hook
