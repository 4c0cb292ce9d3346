"""VideoScan: one semantic carrier token per video frame, a bounded memory of carriers, for streaming video QA.

Li et al., "VideoScan: Enabling Efficient Streaming Video Understanding via Frame-level Semantic Carriers",
arXiv 2503.09387 (code: LyliAgave/VideoScan, a LLaVA-Video fork). Acts in the ``streaming-video-qa`` task, frame by
frame (one chunk: a frame, or a temporal patch for Qwen models):

1. input: the frame's visual tokens F_t (the family's own pooled tokens) followed by its *semantic carrier*
   ``c_t = mean(F_t)``, one more token placed after them, so it attends to the whole frame (and to the prefix and
   the earlier carriers) but, under the causal mask, to no question;
2. after the chunk is prefilled the cache keeps the prefix, the earlier carriers and ``c_t``: the KV of F_t is
   dropped (``add_kv=k`` also keeps the k frame tokens the carrier attends to most, heads and layers averaged, from
   the probe path);
3. positions continue over the compacted sequence (the next frame starts at the number of entries held; cached keys
   keep their rotation), as the reference's cumsum over the kept sequence;
4. memory bank: at most ``memory`` carriers; a new one beyond that evicts the earlier member of the most similar
   adjacent pair (cosine of the carriers' input embeddings) with its KV.

A question is prefilled after the memory (and the family's closing layout tokens) and reads only the cache. The
model must be fine-tuned for this view of a video (the paper fine-tunes LLaVA-Video; the zoo's ``tiny-vlm-scan``
is tiny-vlm fine-tuned this way, ``mmfast zoo train tiny-vlm-scan``). Defaults: ``memory=64`` (the reference's
``MAX_MEMORY_LIMIT``), ``add_kv=0``.

Departures from the reference: ``add_kv`` ranks by the carrier row's attention averaged over every layer and
applies one token set to all layers (the reference ranks per layer or in one ``kv_select_layer``; one set keeps the
cache rectangular), and an evicted carrier takes its frame's ``add_kv`` tokens with it; the online mode's dummy
query ("GO") after each frame is not fed (under the causal mask it changes no kept entry); frames-as-images families
(LLaVA-1.5) drop the text between frames with the frame; for M-RoPE families (Qwen2-VL) each chunk is placed as a
one-patch video at the compacted position (the reference is 1-D RoPE only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmfast.accel.base import StreamAccelerator, register
from mmfast.errors import ConfigError

_BANK = "videoscan_bank"  # stream scratch key: [(frame, carrier input embedding)], oldest first


@register
@dataclass
class VideoScan(StreamAccelerator):
    """VideoScan semantic carriers + memory bank (see the module docstring)."""

    name = "videoscan"
    requires = ("video_stream",)
    zoo_model = "tiny-vlm-scan"
    positions = "compact"
    memory: int = 64
    add_kv: int = 0

    def validate(self) -> None:
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ConfigError(f"videoscan: memory must be an integer >= 1 (carriers kept), got {self.memory!r}.")
        if isinstance(self.add_kv, bool) or not isinstance(self.add_kv, int) or self.add_kv < 0:
            raise ConfigError(f"videoscan: add_kv must be an integer >= 0 (frame tokens kept), got {self.add_kv!r}.")

    @property
    def needs_attention(self) -> bool:
        return self.add_kv > 0

    def frame_input(self, feats: torch.Tensor, frame: int) -> torch.Tensor:
        return torch.cat([feats, feats.float().mean(0, keepdim=True).to(feats.dtype)])  # F_t, then c_t

    def after_frame(self, ctx: Any) -> torch.Tensor:
        carrier = ctx.start + ctx.length - 1
        keep = [torch.arange(ctx.start), torch.tensor([carrier])]
        if self.add_kv:
            visual = ctx.visual.nonzero().flatten()
            scores = ctx.attention(ctx.length - 1)[ctx.start + visual]
            top = visual[scores.topk(min(self.add_kv, visual.numel())).indices]
            keep.append(ctx.start + top)
        keep = torch.cat(keep).sort().values
        bank = ctx.scratch.setdefault(_BANK, [])
        bank.append((ctx.frame, ctx.inputs[-1].float()))
        if len(bank) > self.memory:  # evict the earlier of the most similar adjacent pair, with its entries
            emb = F.normalize(torch.stack([e for _, e in bank]), dim=-1)
            i = int((emb[:-1] * emb[1:]).sum(-1).argmax())
            frame, _ = bank.pop(i)
            keep = keep[ctx.groups[keep] != frame]
        return keep

    def held(self, stream: Any) -> dict[str, Any]:
        """Carriers in the memory bank of ``stream``."""
        return {"carriers_held": len(stream.scratch.get(_BANK, []))}
