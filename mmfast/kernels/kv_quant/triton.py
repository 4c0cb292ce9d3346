"""Triton unpack + dequantize of packed KV codes (dense layout: codes (..., N, ceil(D * bits / 8))).

One program per block of rows; each output element reads its byte, shifts out its ``bits``-wide code and applies
``code * scale + min`` with a per-row (token axis) or per-(group, channel) (channel axis) scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.kernels.kv_quant.reference import QTensor


@triton.jit
def _dequant(
    codes_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    M,
    N,
    D,
    NBYTES,
    BITS: tl.constexpr,
    CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < M) & (dims[None, :] < D)
    per = 8 // BITS
    byte = tl.load(codes_ptr + rows[:, None] * NBYTES + dims[None, :] // per, mask=ok, other=0).to(tl.int32)
    code = (byte >> ((dims[None, :] % per) * BITS)) & ((1 << BITS) - 1)
    if CHANNEL:  # one range per (group of N rows, channel)
        meta = (rows[:, None] // N) * D + dims[None, :]
        scale = tl.load(scale_ptr + meta, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + meta, mask=ok, other=0.0).to(tl.float32)
    else:  # one range per row (token)
        scale = tl.load(scale_ptr + rows, mask=rows < M, other=0.0).to(tl.float32)[:, None]
        zero = tl.load(zero_ptr + rows, mask=rows < M, other=0.0).to(tl.float32)[:, None]
    x = code.to(tl.float32) * scale + zero
    tl.store(out_ptr + rows[:, None] * D + dims[None, :], x, mask=ok)


def dequantize_triton(qt: QTensor, dtype: torch.dtype, block_m: int = 16) -> torch.Tensor:
    """Dequantize a dense (unmasked) :class:`QTensor` to ``dtype`` (..., N, D)."""
    if qt.masked:
        raise ValueError("the Triton dequantize handles the dense layout only")
    *lead, n, nbytes = qt.codes.shape
    m = qt.codes.numel() // nbytes
    out = torch.empty(m, qt.dim, dtype=torch.float32, device=qt.codes.device)
    block_d = max(16, triton.next_power_of_2(qt.dim))
    _dequant[(triton.cdiv(m, block_m),)](
        qt.codes.contiguous(),
        qt.scale.contiguous(),
        qt.zero.contiguous(),
        out,
        m,
        n,
        qt.dim,
        nbytes,
        BITS=qt.bits,
        CHANNEL=qt.axis == "channel",
        BLOCK_M=block_m,
        BLOCK_D=block_d,
    )
    return out.reshape(*lead, n, qt.dim).to(dtype)
