"""Probe attention scores (column sums of causal softmax(Q_probe K^T)); dispatches to Triton or torch.

See :func:`probe_attention` for the contract. :mod:`.reference` is the torch implementation and test oracle,
:mod:`.triton` the kernel (imported only when dispatched to, so importing this package never needs Triton).
Dispatch per docs/kernels.md: ``MMFAST_KERNEL_IMPL=triton`` opts in; CUDA default once
``GPU_VERIFIED["probe_attention"]`` is set. Used by ZipVL / ZipCache, LOOK-M, prefill-stage scoring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmfast.kernels import GPU_VERIFIED, use_triton
from mmfast.kernels.probe_attention.reference import probe_attention as probe_attention_reference
from mmfast.kernels.probe_attention.reference import visible_counts

__all__ = ["benchmark", "probe_attention", "probe_attention_reference", "visible_counts"]


def probe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    normalize: bool = False,
    per_head: bool = False,
) -> torch.Tensor:
    """Column sums of softmax(q k^T * scale + causal mask) over probe queries, float32.

    q (B, H, P, D), k (B, Hkv, S, D), q_pos (P,), k_pos (S,) → (B, Hkv, S) summed over the query heads of each KV
    group (or (B, H, S) with ``per_head``); ``normalize`` divides by the number of probe queries seeing each key.
    """
    if use_triton(q, k, verified=GPU_VERIFIED["probe_attention"]):
        from mmfast.kernels.probe_attention.triton import probe_attention_triton

        out = probe_attention_triton(q, k, q_pos, k_pos, scale=scale, per_head=per_head)
        if normalize:
            kp = torch.arange(k.shape[2], device=k.device) if k_pos is None else k_pos.to(k.device)
            out = out / visible_counts(q_pos.to(k.device), kp).clamp_min(1).to(out.dtype)
        return out
    return probe_attention_reference(q, k, q_pos, k_pos, scale=scale, normalize=normalize, per_head=per_head)


def benchmark(
    impl: str,
    *,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float16,
    batch: int = 1,
    heads: int = 32,
    kv_heads: int = 8,
    probes: int = 64,
    length: int = 4096,
    dim: int = 128,
) -> Callable[[], Any]:
    """A closure running one ``impl`` ("torch" | "triton") scoring of ``probes`` queries (the last ones) over
    ``length`` keys."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, probes, dim, generator=g).to(device, dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(device, dtype)
    q_pos = torch.arange(length - probes, length, device=device)
    if impl == "triton":
        from mmfast.kernels.probe_attention.triton import probe_attention_triton

        return lambda: probe_attention_triton(q, k, q_pos)
    return lambda: probe_attention_reference(q, k, q_pos)
