"""Glue between a transformers attention call and :func:`~mmfast.kernels.packed_attention.packed_attention`.

A transformers 5.x attention layer calls ``attention_interface(module, query, key, value, attention_mask,
dropout=..., scaling=..., **kwargs)`` right after its cache update. When the cache handed packed
:class:`~mmfast.kernels.packed_attention.KVPart` s instead of key / value tensors (a decode step over a compressed
cache, :class:`mmfast.models.cache.PackedStep`), :func:`packed_decode_attention` runs the kernel on them if the call
is plain decode attention — no mask beyond causal, no sliding window, no logit soft-capping, no attention sinks, no
dropout — and returns None otherwise (the caller then reads the dequantized view and runs the stock function).
"""

from __future__ import annotations

from typing import Any

import torch

from mmfast.kernels.packed_attention import KVPart, packed_attention

#: keyword arguments of an attention call that change what attention computes (the kernel does none of them)
EXTRAS = ("sliding_window", "softcap", "s_aux", "sinks")


def plain_causal(mask: torch.Tensor | None, queries: int) -> bool:
    """Whether ``mask`` (None, or a (B, 1 | H, Q, N) bool / additive float mask) lets the Q queries (the last Q of
    the N entries) see exactly every entry up to their own position (no padding, no window)."""
    if mask is None:
        return True
    if mask.dim() != 4 or mask.shape[-2] != queries:
        return False
    n = mask.shape[-1]
    visible = mask if mask.dtype == torch.bool else mask == 0
    q = torch.arange(queries, device=mask.device)[:, None]
    return bool((visible == (torch.arange(n, device=mask.device) <= n - queries + q)).all())


def packed_decode_attention(
    module: torch.nn.Module, query: torch.Tensor, parts: list[KVPart], attention_mask: Any, **kwargs: Any
) -> tuple[torch.Tensor, None] | None:
    """(attn_output (B, Q, H, D), None) as transformers' sdpa function returns them, or None when the call asks for
    more than plain causal attention (see the module docstring)."""
    if any(kwargs.get(name) is not None for name in EXTRAS) or getattr(module, "sliding_window", None) is not None:
        return None
    if kwargs.get("dropout") or not plain_causal(attention_mask, query.shape[2]):
        return None
    out = packed_attention(query, parts, scale=kwargs.get("scaling"))
    return out.transpose(1, 2).contiguous(), None
