"""KV-cache quantize / pack and unpack / dequantize (2/4/8-bit, channel-wise keys, token-wise values).

:mod:`.reference` is the torch implementation and test oracle; :mod:`.triton` unpacks and dequantizes the dense
layout (dispatched per docs/architecture.md, Kernels: CUDA tensors with Triton importable, or ``MMFAST_KERNEL_IMPL=triton``).
Quantizing happens once per segment and stays in torch.
"""

from __future__ import annotations

import torch

from mmfast.kernels import use_triton
from mmfast.kernels.kv_quant.reference import BITS, QTensor, meta_dtype, pack, quantize, unpack
from mmfast.kernels.kv_quant.reference import dequantize as dequantize_reference

__all__ = ["BITS", "QTensor", "dequantize", "dequantize_reference", "meta_dtype", "pack", "quantize", "unpack"]


def dequantize(qt: QTensor, dtype: torch.dtype, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruct (..., N, D), or the (M, D) selected rows of a masked :class:`QTensor` (see the reference)."""
    if not qt.masked and use_triton(qt.codes):
        from mmfast.kernels.kv_quant.triton import dequantize_triton

        return dequantize_triton(qt, dtype)
    return dequantize_reference(qt, dtype, mask)
