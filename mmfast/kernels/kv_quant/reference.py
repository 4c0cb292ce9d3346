"""KV quantization in torch: asymmetric min-max integer codes, packed along the feature dim, dequantized on read.

* ``axis="channel"`` (keys, KIVI / ZipCache): one (scale, min) per channel, taken over the rows (tokens) of a
  group — keys have outlier channels, so per-channel ranges keep the error small;
* ``axis="token"`` (values): one (scale, min) per row (token) over its channels.

Codes are ``round((x - min) / scale)`` in ``[0, 2^bits - 1]`` with ``scale = (max - min) / (2^bits - 1)``, so the
reconstruction error of every element is at most ``scale / 2`` (plus the rounding of the stored scale / min).
``8 / bits`` codes share a byte, packed along the last dim (``D`` is padded to a multiple of ``8 / bits``).
Scales and mins are stored in float16 whatever the input dtype (as KIVI / ZipVL store them): bf16's 8-bit mantissa
is too coarse for a zero-point at 8 bits, and float32 metadata would cost a 32-channel token group of 2-bit values
as much again as its codes. Groups whose range does not fit float16 fall back to float32 metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 4, 8)


@dataclass
class QTensor:
    """Packed codes of rows of a (..., N, D) tensor.

    Attributes:
        codes: uint8 (..., N, ceil(D * bits / 8)) or, with a row mask, (M, ceil(D * bits / 8)) for the M selected rows.
        scale, zero: token axis → (..., N, 1) or (M, 1); channel axis → (..., 1, D).
        bits, axis, dim (D), masked (codes are the selected rows only).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    axis: str
    dim: int
    masked: bool = False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


_FP16_MAX = 6.0e4  # below float16's 65504, so a min rounded down / a scale rounded up stay finite


def meta_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of stored scales / mins: float16 (``dtype`` is accepted for call-site symmetry)."""
    return torch.float16


def _round(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Cast float32 ``x`` to ``dtype`` rounding towards +inf (``up``) or -inf."""
    y = x.to(dtype)
    if dtype == x.dtype:
        return y
    bad = y.float() < x if up else y.float() > x
    step = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(bad, torch.nextafter(y, step), y)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., D) in [0, 2^bits) → (..., ceil(D / (8 / bits))) bytes, little end first."""
    per = 8 // bits
    d = codes.shape[-1]
    pad = (-d) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, per).to(torch.uint8)
    out = torch.zeros(codes.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per):
        out |= codes[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (..., B) bytes → (..., dim) uint8 codes."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :dim] if per > 1 else packed[..., :dim]


def quantize(
    x: torch.Tensor, bits: int, axis: str, mask: torch.Tensor | None = None, meta: torch.dtype | None = None
) -> QTensor:
    """Quantize ``x`` (..., N, D) to ``bits`` ∈ {2, 4, 8}.

    ``mask`` (..., N) bool selects the rows to keep: channel ranges are then taken over the selected rows of each
    group only, and only their codes are stored (flattened to (M, ·) in row-major order of the mask). ``meta`` is
    the dtype of the stored scales / mins (default :func:`meta_dtype` of ``x``).
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if axis not in ("token", "channel"):
        raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
    levels = (1 << bits) - 1
    xf = x.float()
    if axis == "token":
        rows = xf[mask] if mask is not None else xf
        lo = rows.amin(dim=-1, keepdim=True)
        hi = rows.amax(dim=-1, keepdim=True)
    else:
        if mask is not None:
            m = mask[..., None]
            lo = torch.where(m, xf, float("inf")).amin(dim=-2, keepdim=True)
            hi = torch.where(m, xf, float("-inf")).amax(dim=-2, keepdim=True)
            empty = ~mask.any(dim=-1)[..., None, None]  # groups with no selected row
            lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
        else:
            lo = xf.amin(dim=-2, keepdim=True)
            hi = xf.amax(dim=-2, keepdim=True)
    md = meta or meta_dtype(x.dtype)
    if md == torch.float16 and bool((lo.abs() > _FP16_MAX).any() or (hi.abs() > _FP16_MAX).any()):
        md = torch.float32  # out of float16's range: keep the error bound rather than the bytes
    # min rounded down and scale rounded up in the stored dtype: every code then lies in [0, levels] before
    # rounding, so the reconstruction error is at most scale / 2 for the stored scale
    lo = _round(lo, md, up=False)
    scale = _round(((hi - lo.float()) / levels).clamp_min(1e-8), md, up=True)
    # codes from the *stored* (rounded) scale / min, so the error bound holds against what is dequantized
    if axis == "token":
        codes = ((rows - lo.float()) / scale.float()).round_().clamp_(0, levels)
    else:
        codes = ((xf - lo.float()) / scale.float()).round_().clamp_(0, levels)
        if mask is not None:
            codes = codes[mask]
    return QTensor(pack(codes.to(torch.uint8), bits), scale, lo, bits, axis, x.shape[-1], masked=mask is not None)


def dequantize(qt: QTensor, dtype: torch.dtype, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruct (..., N, D), or the (M, D) selected rows when ``qt`` was quantized with a row ``mask``."""
    codes = unpack(qt.codes, qt.bits, qt.dim).float()
    scale, zero = qt.scale.float(), qt.zero.float()
    if qt.masked and qt.axis == "channel":
        if mask is None:
            raise ValueError("dequantize needs the row mask the channel-wise tensor was quantized with")
        shape = (*mask.shape, qt.dim)
        scale = scale.expand(shape)[mask]
        zero = zero.expand(shape)[mask]
    return (codes * scale + zero).to(dtype)
