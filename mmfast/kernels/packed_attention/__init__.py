"""Decode attention over a compressed KV cache: ZipVL / ZipCache mixed-precision packed codes or plain compacted
entries (LOOK-M, ``kv_window``), without dequantizing a copy of the cache.

:func:`packed_attention` dispatches (docs/kernels.md): :mod:`.reference` (dequantize + sdpa, the oracle) or
:mod:`.triton` (split-K flash-decoding over the codes). :func:`segment_parts` turns a
:class:`mmfast.models.cache.MixedPrecisionKV` into parts; a float tail is ``KVPart(k, v, causal=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmfast.kernels import GPU_VERIFIED, use_triton
from mmfast.kernels.packed_attention.reference import KVPart, part_kv, segment_parts
from mmfast.kernels.packed_attention.reference import packed_attention as packed_attention_reference

__all__ = ["KVPart", "benchmark", "packed_attention", "packed_attention_reference", "part_kv", "segment_parts"]


def packed_attention(q: torch.Tensor, parts: list[KVPart], *, scale: float | None = None) -> torch.Tensor:
    """q (B, H, Q, D) attending to every entry of ``parts`` → (B, H, Q, D) in q's dtype (see :mod:`.reference`)."""
    if use_triton(q, verified=GPU_VERIFIED["packed_attention"]):
        from mmfast.kernels.packed_attention.triton import packed_attention_triton

        return packed_attention_triton(q, parts, scale=scale)
    return packed_attention_reference(q, parts, scale=scale)


def make_case(
    *,
    batch: int = 1,
    heads: int = 32,
    kv_heads: int = 8,
    queries: int = 1,
    length: int = 4096,
    dim: int = 128,
    high: float = 0.1,
    bits: tuple[int, int] = (4, 2),
    tail: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> tuple[torch.Tensor, list[KVPart]]:
    """A ZipVL-style cache: a ``high`` share of ``length`` entries at ``bits[0]``, the rest at ``bits[1]``
    (channel-wise keys, ZipCache token-wise values over joined heads), plus a float tail of ``tail`` entries that
    holds the ``queries`` new tokens (causal)."""
    from mmfast.kernels.kv_quant.reference import meta_dtype, quantize

    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = rand(batch, heads, queries, dim)
    keys, values = rand(batch, kv_heads, length, dim), rand(batch, kv_heads, length, dim)
    c = values.float().abs().amax(dim=-2, keepdim=True).sqrt_().clamp_min_(1e-4).to(meta_dtype(dtype))
    n_hi = round(high * length)
    parts = []
    for nbits, lo, hi in ((bits[0], 0, n_hi), (bits[1], n_hi, length)):
        if hi > lo:
            k = quantize(keys[:, :, lo:hi], nbits, "channel")
            v = values[:, :, lo:hi].float() / c.float()
            v = v.transpose(1, 2).reshape(batch, 1, hi - lo, kv_heads * dim)
            parts.append(KVPart(k, quantize(v, nbits, "token"), c))
    if tail:
        parts.append(KVPart(rand(batch, kv_heads, tail, dim), rand(batch, kv_heads, tail, dim), causal=True))
    return q, parts


def benchmark(
    impl: str, *, device: str | torch.device = "cuda", dtype: torch.dtype = torch.float16, **shape: Any
) -> Callable[[], Any]:
    """A closure running one ``impl`` ("torch" | "triton") call on a :func:`make_case` cache of ``shape``."""
    q, parts = make_case(device=device, dtype=dtype, **shape)
    if impl == "triton":
        from mmfast.kernels.packed_attention.triton import packed_attention_triton

        return lambda: packed_attention_triton(q, parts)
    return lambda: packed_attention_reference(q, parts)
