"""What vision-stage methods may ask of a vision tower, without knowing its family.

Adapters build these from their family's modules; methods only use them:

* :class:`TowerProbe`: which per-token statistics of the last tower layer feeding the features a method wants
  (``adapter.visual_tokens(inputs, probe=...)`` returns them in ``item.tower``, mapped through the family's own
  layout onto the LLM tokens): ``"attention"`` (the first available of ``attention``'s kinds: ``"cls"`` = the class
  token's attention row, ``"map"`` = the attention of SigLIP's MAP-pooling probe, ``"received"`` = the mean
  attention each patch receives), and ``"keys"`` (head-mean keys, ToMe / Turbo's matching metric);
* :class:`ViTBlock`: one pre-norm ViT encoder layer (CLIP / SigLIP) run step by step, so a method can change the
  token set between its sub-layers (Turbo merges after the attention sub-layer);
* :class:`VisionTower`: the tower of one prompt as such blocks, with the crops it encodes and ``finish``, which
  turns the (possibly merged) patch states back into the family's LLM tokens.

All the vision attention mmfast recomputes lives here (:func:`received_attention`, :meth:`ViTBlock.attend`,
:meth:`ViTBlock.cls_row`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.types import VisualTokens

ATTENTION_KINDS = ("cls", "map", "received")


@dataclass(frozen=True)
class TowerProbe:
    """Per-token tower statistics a vision method asks for (see the module docstring)."""

    attention: tuple[str, ...] = ()  # preference order among ATTENTION_KINDS
    keys: bool = False

    def __post_init__(self) -> None:
        bad = [k for k in self.attention if k not in ATTENTION_KINDS]
        if bad:
            raise ValueError(f"unknown tower attention kind(s) {bad}; use {ATTENTION_KINDS}")

    def __bool__(self) -> bool:
        return bool(self.attention) or self.keys

    def pick(self, available: tuple[str, ...]) -> str | None:
        """The first wanted attention kind this tower offers."""
        return next((k for k in self.attention if k in available), None)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads * d) -> (B, heads, T, d)."""
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean attention each token receives, over heads and queries: q, k (H, T, d) -> (T,), float32."""
    return ((q @ k.transpose(-1, -2)) * scale).float().softmax(-1).mean((0, 1))


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The class token's (token 0) attention row, heads averaged: q, k (B, H, T, d) -> (B, T), float32.
    ``bias`` (B, 1, 1, T) is added to the logits (proportional attention: log sizes)."""
    logits = (q[:, :, :1] @ k.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias
    return logits.float().softmax(-1).mean(1)[:, 0]


def proportional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + log size) v. q, k, v: (B, H, T, d); size: (B, T) or None (plain attention)."""
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


class ViTBlock:
    """A pre-norm ViT encoder layer (transformers' CLIP / SigLIP ``EncoderLayer``) run sub-layer by sub-layer.

    ``h' = h + out(attend(qkv(norm1(h))))`` then ``h'' = h' + mlp(norm2(h'))``; between the two a caller may
    change the token set (merge, drop).
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.attn = layer.self_attn
        self.heads: int = self.attn.num_heads
        self.scale: float = self.attn.scale

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D) -> q, k, v each (B, heads, T, d)."""
        z = self.layer.layer_norm1(h)
        a = self.attn
        return tuple(split_heads(p(z), self.heads) for p in (a.q_proj, a.k_proj, a.v_proj))  # type: ignore[return-value]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, received: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Proportional attention ``softmax(q k^T * scale + log size) v`` -> ((B, heads, T, d), received).

        ``size`` (B, T): tokens each stands for (None: plain attention). With ``received`` the attention rows are
        computed explicitly and the mean attention each token receives is returned too, each query weighted by its
        size (a merged query stands for ``size`` queries), normalised to sum to 1 per row of the batch."""
        if received:
            sz = size if size is not None else torch.ones(q.shape[0], q.shape[2], device=q.device)
            logits = (q @ k.transpose(-1, -2)) * self.scale + sz.log()[:, None, None, :].to(q.dtype)
            probs = logits.float().softmax(-1)
            out = probs.to(v.dtype) @ v
            rec = (probs.mean(1) * sz[:, :, None]).sum(1)  # (B, T): size-weighted over queries
            return out, rec / sz.sum(1, keepdim=True)
        return proportional_attention(q, k, v, size, self.scale), None

    def cls_row(self, q: torch.Tensor, k: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        """The class token's attention row under proportional attention, heads averaged: (B, T)."""
        bias = None if size is None else size.log()[:, None, None, :]
        return cls_attention(q, k, self.scale, bias)

    def residual_out(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """h + out_proj(o): o (B, heads, T, d)."""
        b, t = h.shape[:2]
        return h + self.attn.out_proj(o.transpose(1, 2).reshape(b, t, -1))

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.layer.mlp(self.layer.layer_norm2(h))


@dataclass
class VisionTower:
    """The vision tower of one prompt's images as plain ViT blocks (from ``adapter.vision_tower(inputs)``).

    Attributes:
        pixels: (crops, 3, H, W) the crops the tower encodes (anyres tiles, frames of a frames-as-images video).
        embed: pixels -> (crops, T, D), the input of the first block (class token first when ``has_cls``).
        blocks: the blocks feeding the selected features, in order.
        has_cls: the tower prepends a class token (dropped from the features).
        anyres: the family re-packs several crops into one image's layout (tiles, unpadding, newlines).
        crops_per_image: crops of each image, in order.
        visible: (crops, patches) bool, the patches the family's layout shows (unpadding drops margins).
        finish: ``(hidden (crops, patches, D), size (crops, patches))`` -> the LLM tokens of every image; a patch
            with size 0 was merged away, the others keep their size (tokens they stand for).
    """

    pixels: torch.Tensor
    embed: Callable[[torch.Tensor], torch.Tensor]
    blocks: list[ViTBlock]
    has_cls: bool
    anyres: bool
    crops_per_image: list[int]
    visible: torch.Tensor
    finish: Callable[[torch.Tensor, torch.Tensor], list[VisualTokens]]
