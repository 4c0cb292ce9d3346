"""Bipartite token merging (ToMe / Turbo, VisionZip's contextual merge, LOOK-M's nearest-kept-key merge).

:mod:`.reference` is the torch oracle, :mod:`.triton` the kernels; dispatch per docs/kernels.md
(``MMFAST_KERNEL_IMPL=triton`` opts in, CUDA default once ``GPU_VERIFIED["token_merge"]`` is set). The Triton
path is for inference (no autograd through the kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmfast.kernels import GPU_VERIFIED, use_triton
from mmfast.kernels.token_merge import reference
from mmfast.kernels.token_merge.reference import Merged, layer_schedule

__all__ = ["Merged", "benchmark", "bipartite_merge", "cosine_match", "fold_merge", "layer_schedule", "scatter_mean"]


def _triton(*tensors: torch.Tensor) -> bool:
    return use_triton(*tensors, verified=GPU_VERIFIED["token_merge"])


def cosine_match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine similarity of each row of a (..., Na, C) among the rows of b (..., Nb, C), and its index."""
    if _triton(a, b) and b.shape[-2] > 0:
        from mmfast.kernels.token_merge.triton import cosine_match_triton

        return cosine_match_triton(a, b)
    return reference.cosine_match(a, b)


def scatter_mean(
    x: torch.Tensor,
    index: torch.Tensor,
    n: int,
    weight: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted scatter-mean of rows into ``n`` slots (see :func:`.reference.scatter_mean`)."""
    if _triton(x, index):
        from mmfast.kernels.token_merge.triton import scatter_mean_triton

        return scatter_mean_triton(x, index, n, weight, base, base_weight)
    return reference.scatter_mean(x, index, n, weight, base, base_weight)


def bipartite_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    anchor: torch.Tensor,
    metric: torch.Tensor | None,
    r: int,
    semantic: torch.Tensor | None = None,
    weight: float = 0.0,
    protect_first: bool = False,
) -> Merged:
    """One bipartite merge of ``r`` tokens (see :func:`.reference.bipartite_merge`)."""
    if _triton(x):
        from mmfast.kernels.token_merge.triton import bipartite_merge_triton

        return bipartite_merge_triton(x, size, anchor, metric, r, semantic, weight, protect_first)
    return reference.bipartite_merge(x, size, anchor, metric, r, semantic, weight, protect_first)


def fold_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    anchor: torch.Tensor,
    metric: torch.Tensor | None,
    r: int,
    semantic: torch.Tensor | None = None,
    weight: float = 0.0,
    protect_first: bool = False,
    max_fraction: float = 0.5,
) -> Merged:
    """Remove ``r`` tokens by repeated bipartite merges (see :func:`.reference.fold_merge`)."""
    return reference.fold_merge(
        x, size, anchor, metric, r, semantic, weight, protect_first, max_fraction, merge=bipartite_merge
    )


def benchmark(
    impl: str,
    *,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float16,
    batch: int = 1,
    tokens: int = 576,
    dim: int = 1024,
    r: int = 288,
) -> Callable[[], Any]:
    """A closure running one ``impl`` ("torch" | "triton") bipartite merge of ``r`` out of ``tokens`` (B, T, D)."""
    x = torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    size = torch.ones(batch, tokens, device=device)
    anchor = torch.arange(tokens, device=device).expand(batch, -1)
    if impl == "triton":
        from mmfast.kernels.token_merge.triton import bipartite_merge_triton

        return lambda: bipartite_merge_triton(x, size, anchor, None, r)
    return lambda: reference.bipartite_merge(x, size, anchor, None, r)
