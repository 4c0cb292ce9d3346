"""Decode attention over a compressed KV cache, in torch: the test oracle of the packed-attention kernel.

A cache is a list of :class:`KVPart` s (attention does not depend on the order of cached entries, so a part is just
a stretch of entries every query sees): ZipVL / ZipCache mixed-precision blocks (packed 2/4/8-bit codes,
channel-wise keys, token-wise values with ZipCache's per-channel value normalisation ``vscale``; the layout of
:class:`mmfast.models.cache.MixedPrecisionKV`, see :func:`segment_parts`), or plain fp16 / bf16 / fp32 entries
(LOOK-M's or ``kv_window``'s compacted cache, a full-precision tail). The reference dequantizes every part with the
kv_quant reference and runs ``scaled_dot_product_attention`` over the concatenation.

Shapes: q (B, H, Q, D) (a few query tokens per head; GQA: query head h reads KV head ``h // (H / Hkv)``); a part
holds, for every (batch, KV head), N entries of (B, Hkv, N, D) keys / values, or per-head row counts with a row
``mask`` (B, Hkv, N) when the rows were kept flat (per-head eviction). Output (B, H, Q, D) in q's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmfast.kernels.kv_quant.reference import QTensor, dequantize

Packed = torch.Tensor | QTensor


@dataclass
class KVPart:
    """One stretch of cached entries.

    Attributes:
        k, v: float tensors (B, Hkv, N, D) — or (M, D) rows with ``mask`` — or :class:`QTensor` s: keys quantized
            channel-wise or token-wise, values token-wise (dense (B, Hkv, N, ·), ZipCache's joined heads
            (B, 1, N, Hkv * D) with one range per token, or masked (M, ·) rows) or channel-wise.
        vscale: (B, Hkv, 1, D) per-channel factor multiplied into the dequantized values (ZipCache's ``c``), or None.
        mask: (B, Hkv, N) bool: the rows of each (batch, head) stored flat in row-major mask order (the
            ``masked`` layout of :mod:`mmfast.kernels.kv_quant`; float k / v are then (M, D) rows too), or None.
        causal: the queries are this part's last Q entries (a tail holding the new tokens): query t sees the
            entries up to ``N - Q + t``; other parts are fully visible.
    """

    k: Packed
    v: Packed
    vscale: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    causal: bool = False

    def geometry(self) -> tuple[int, int, int, int]:
        """(B, Hkv, N, D)."""
        if self.mask is not None:
            b, h, n = self.mask.shape
            d = self.k.dim if isinstance(self.k, QTensor) else self.k.shape[-1]
            return b, h, n, d
        if isinstance(self.k, QTensor):
            b, h, n, _ = self.k.codes.shape
            return b, h, n, self.k.dim
        b, h, n, d = self.k.shape
        return b, h, n, d

    def lengths(self) -> torch.Tensor:
        """(B, Hkv) long: entries held per (batch, KV head)."""
        b, h, n, _ = self.geometry()
        if self.mask is None:
            return torch.full((b, h), n, dtype=torch.long, device=self.device)
        return self.mask.sum(-1)

    @property
    def device(self) -> torch.device:
        return (self.k.codes if isinstance(self.k, QTensor) else self.k).device

    def joined_values(self) -> bool:
        """Values quantized as ZipCache's joined heads: one (B, 1, N, Hkv * D) row per token."""
        b, h, n, d = self.geometry()
        v = self.v
        return isinstance(v, QTensor) and not v.masked and h > 1 and v.codes.shape[1] == 1 and v.dim == h * d


def _dense(part: KVPart, values: bool, dtype: torch.dtype) -> torch.Tensor:
    """Dequantized (B, Hkv, N, D) keys or ``values`` of ``part`` (rows outside a mask are zeros)."""
    b, h, n, d = part.geometry()
    t = part.v if values else part.k
    x = dequantize(t, torch.float32, part.mask) if isinstance(t, QTensor) else t.float()
    if values and part.joined_values():  # (B, 1, N, Hkv * D) -> (B, Hkv, N, D)
        x = x.reshape(b, n, h, d).transpose(1, 2)
    if part.mask is not None:
        full = x.new_zeros(b, h, n, d)
        full[part.mask] = x
        x = full
    if values and part.vscale is not None:
        x = x * part.vscale.float()
    return x.to(dtype)


def part_kv(part: KVPart, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dequantized keys, values (B, Hkv, N, D) in ``dtype`` and the visible rows (B, Hkv, N) (None: all)."""
    return _dense(part, False, dtype), _dense(part, True, dtype), part.mask


def packed_attention(q: torch.Tensor, parts: list[KVPart], *, scale: float | None = None) -> torch.Tensor:
    """softmax(q K^T * scale) V over the entries of every part (see the module docstring), in q's dtype."""
    b, h, nq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys, values, visible = [], [], []
    for part in parts:
        k, v, mask = part_kv(part, q.dtype)
        hkv, n = k.shape[1], k.shape[2]
        vis = torch.ones(b, hkv, nq, n, dtype=torch.bool, device=q.device)
        if mask is not None:
            vis &= mask[:, :, None, :]
        if part.causal:
            qi = torch.arange(nq, device=q.device)[:, None]
            vis &= torch.arange(n, device=q.device)[None, :] <= n - nq + qi
        keys.append(k)
        values.append(v)
        visible.append(vis)
    k, v, vis = torch.cat(keys, -2), torch.cat(values, -2), torch.cat(visible, -1)
    g = h // k.shape[1]
    k, v, vis = (t.repeat_interleave(g, dim=1) for t in (k, v, vis))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=scale)


def segment_parts(segment: Any) -> list[KVPart]:
    """The parts of a :class:`mmfast.models.cache.MixedPrecisionKV` (read through its attributes, so the kernels
    do not import the cache): one per precision, quantized ones with the segment's value scale."""
    out = []
    for bits, sel, k, v in segment.parts:
        out.append(KVPart(k, v, None if bits >= 16 else segment.vscale, sel))
    return out
