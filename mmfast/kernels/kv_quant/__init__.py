"""KV-cache quantize / pack and unpack / dequantize (2/4/8-bit, channel-wise keys, token-wise values).

:mod:`.reference` is the torch implementation and test oracle; :mod:`.triton` quantizes + packs and unpacks +
dequantizes the dense layout (no row mask; masked tensors always take the reference). Dispatch per
docs/kernels.md: ``MMFAST_KERNEL_IMPL=triton`` opts in; on CUDA the kernels become the default once
``GPU_VERIFIED["kv_quant"]`` is set. Codes are bit-exact with the reference (round half to even, the same
float16 rounding of the stored min / scale); see :func:`mmfast.kernels.kv_quant.triton.quantize_triton`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmfast.kernels import GPU_VERIFIED, use_triton
from mmfast.kernels.kv_quant.reference import BITS, QTensor, meta_dtype, pack, unpack
from mmfast.kernels.kv_quant.reference import dequantize as dequantize_reference
from mmfast.kernels.kv_quant.reference import quantize as quantize_reference

__all__ = [
    "BITS",
    "QTensor",
    "benchmark",
    "dequantize",
    "dequantize_reference",
    "meta_dtype",
    "pack",
    "quantize",
    "quantize_reference",
    "unpack",
]


def _triton(*tensors: torch.Tensor) -> bool:
    return use_triton(*tensors, verified=GPU_VERIFIED["kv_quant"])


def quantize(
    x: torch.Tensor, bits: int, axis: str, mask: torch.Tensor | None = None, meta: torch.dtype | None = None
) -> QTensor:
    """Quantize ``x`` (..., N, D) to ``bits`` along ``axis`` (see the reference); a row ``mask`` takes torch."""
    if mask is None and bits in BITS and meta in (None, torch.float16, torch.float32) and _triton(x):
        from mmfast.kernels.kv_quant.triton import quantize_triton

        return quantize_triton(x, bits, axis, meta)
    return quantize_reference(x, bits, axis, mask, meta)


def dequantize(qt: QTensor, dtype: torch.dtype, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruct (..., N, D), or the (M, D) selected rows of a masked :class:`QTensor` (see the reference)."""
    if not qt.masked and _triton(qt.codes):
        from mmfast.kernels.kv_quant.triton import dequantize_triton

        return dequantize_triton(qt, dtype)
    return dequantize_reference(qt, dtype, mask)


def benchmark(
    impl: str,
    *,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float16,
    op: str = "quantize",
    batch: int = 1,
    heads: int = 8,
    length: int = 4096,
    dim: int = 128,
    bits: int = 2,
    axis: str = "channel",
) -> Callable[[], Any]:
    """A closure running one ``impl`` ("torch" | "triton") ``op`` ("quantize" | "dequantize") on (B, H, N, D)."""
    x = torch.randn(batch, heads, length, dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    if op == "dequantize":
        qt = quantize_reference(x, bits, axis)
        if impl == "triton":
            from mmfast.kernels.kv_quant.triton import dequantize_triton

            return lambda: dequantize_triton(qt, dtype)
        return lambda: dequantize_reference(qt, dtype)
    if impl == "triton":
        from mmfast.kernels.kv_quant.triton import quantize_triton

        return lambda: quantize_triton(x, bits, axis)
    return lambda: quantize_reference(x, bits, axis)
