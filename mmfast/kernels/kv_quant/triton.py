"""Triton quantize + pack and unpack + dequantize of KV codes (dense layout: codes (..., N, ceil(D * bits / 8))).

* ``_dequant``: one program per block of rows; each output element reads its byte, shifts out its ``bits``-wide
  code and applies ``code * scale + min`` with a per-row (token axis) or per-(group, channel) (channel axis) scale.
* ``_quant_token`` / ``_quant_channel`` (KIVI / ZipCache / ZipVL quantization, :func:`quantize_triton`): the
  min / max of each row (token axis: values) or of each channel over a group's N rows (channel axis: keys), the
  stored min rounded down and scale rounded up in float16 (as the reference), then
  ``codes = round_half_even((x - min) / scale)`` packed ``8 / bits`` to a byte, first code in the low bits.
  The codes are bit-exact with the reference: the division is IEEE (``div_rn``) and the rounding exact (floor +
  explicit ties-to-even), so a value landing exactly on a rounding boundary (``.5``) rounds as ``torch.round``.
  The only source of a difference would be a backend evaluating ``(x - min) / scale`` in another precision
  (none does for float32); ties are then the only codes that could move (by 1).
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


# ------------------------------------------------------------------------------------------------
# quantize + pack
# ------------------------------------------------------------------------------------------------
@triton.jit
def _f16_down(x):
    """float32 -> float16 rounded towards -inf (the reference's ``_round(.., up=False)``)."""
    y = x.to(tl.float16)
    bits = y.to(tl.int16, bitcast=True)
    below = tl.where(y > 0, bits - 1, tl.where(y < 0, bits + 1, -32767)).to(tl.int16)  # 0 -> -2^-24 (0x8001)
    return tl.where(y.to(tl.float32) > x, below.to(tl.float16, bitcast=True), y)


@triton.jit
def _f16_up(x):
    """float32 -> float16 rounded towards +inf (``x`` > 0: a scale)."""
    y = x.to(tl.float16)
    bits = y.to(tl.int16, bitcast=True)
    above = tl.where(y > 0, bits + 1, tl.where(y < 0, bits - 1, 1)).to(tl.int16)  # 0 -> 2^-24
    return tl.where(y.to(tl.float32) < x, above.to(tl.float16, bitcast=True), y)


@triton.jit
def _meta(lo, hi, LEVELS: tl.constexpr, META16: tl.constexpr):
    """Stored (min, scale) from float32 ranges, as the reference: min rounded down, scale rounded up."""
    if META16:
        lo = _f16_down(lo)
        scale = _f16_up(tl.maximum(tl.math.div_rn(hi - lo.to(tl.float32), LEVELS * 1.0), 1e-8))
    else:
        scale = tl.maximum(tl.math.div_rn(hi - lo, LEVELS * 1.0), 1e-8)
    return lo, scale


@triton.jit
def _codes(x, lo, scale, LEVELS: tl.constexpr):
    """round-half-to-even(clamp((x - min) / scale, 0, levels)) as float32 (torch.round's ties-to-even: exact)."""
    y = tl.minimum(tl.maximum(tl.math.div_rn(x - lo, scale), 0.0), LEVELS * 1.0)
    r = tl.floor(y)
    f = y - r  # exact
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


@triton.jit
def _pack(code, ok, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """(BLOCK_M, BLOCK_B * 8 / BITS) codes -> (BLOCK_M, BLOCK_B) bytes, first code in the low bits."""
    c = tl.where(ok, code.to(tl.int32), 0)
    if BITS == 8:
        out = c.to(tl.uint8)
    else:
        c = tl.reshape(c, (BLOCK_M, BLOCK_B, 8 // BITS))
        shifts = tl.arange(0, 8 // BITS) * BITS
        out = tl.sum(c << shifts[None, None, :], axis=2).to(tl.uint8)
    return out


@triton.jit
def _quant_token(
    x_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    M,
    D,
    NBYTES,
    BITS: tl.constexpr,
    META16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One (scale, min) per row of D channels; programs own BLOCK_M rows, channels in blocks of BLOCK_B bytes."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    BLOCK_C: tl.constexpr = BLOCK_B * (8 // BITS)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    lo = tl.full((BLOCK_M,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for c0 in range(0, D, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (ch[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * D + ch[None, :], mask=ok, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(ok, x, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(ok, x, float("-inf")), axis=1))
    lo, scale = _meta(lo, hi, LEVELS, META16)
    tl.store(zero_ptr + rows, lo, mask=row_ok)
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    lo_f = lo.to(tl.float32)[:, None]
    scale_f = scale.to(tl.float32)[:, None]
    for c0 in range(0, D, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (ch[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * D + ch[None, :], mask=ok, other=0.0).to(tl.float32)
        packed = _pack(_codes(x, lo_f, scale_f, LEVELS), ok, BITS, BLOCK_M, BLOCK_B)
        byte = c0 // (8 // BITS) + tl.arange(0, BLOCK_B)
        tl.store(
            codes_ptr + rows[:, None] * NBYTES + byte[None, :], packed, mask=row_ok[:, None] & (byte[None, :] < NBYTES)
        )


@triton.jit
def _quant_channel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    N,
    D,
    NBYTES,
    BITS: tl.constexpr,
    META16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One (scale, min) per (group of N rows, channel); grid (groups, channel blocks of BLOCK_B bytes)."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    BLOCK_C: tl.constexpr = BLOCK_B * (8 // BITS)
    grp = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < D
    base = grp.to(tl.int64) * N
    lo = tl.full((BLOCK_C,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        ok = (rows[:, None] < N) & ch_ok[None, :]
        x = tl.load(x_ptr + (base + rows[:, None]) * D + ch[None, :], mask=ok, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(ok, x, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(ok, x, float("-inf")), axis=0))
    lo, scale = _meta(lo, hi, LEVELS, META16)
    tl.store(zero_ptr + grp * D + ch, lo, mask=ch_ok)
    tl.store(scale_ptr + grp * D + ch, scale, mask=ch_ok)
    lo_f = lo.to(tl.float32)[None, :]
    scale_f = scale.to(tl.float32)[None, :]
    byte = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        ok = (rows[:, None] < N) & ch_ok[None, :]
        x = tl.load(x_ptr + (base + rows[:, None]) * D + ch[None, :], mask=ok, other=0.0).to(tl.float32)
        packed = _pack(_codes(x, lo_f, scale_f, LEVELS), ok, BITS, BLOCK_N, BLOCK_B)
        tl.store(
            codes_ptr + (base + rows[:, None]) * NBYTES + byte[None, :],
            packed,
            mask=(rows[:, None] < N) & (byte[None, :] < NBYTES),
        )


_FP16_MAX = 6.0e4  # as the reference: ranges beyond it fall back to float32 metadata


def quantize_triton(x: torch.Tensor, bits: int, axis: str, meta: torch.dtype | None = None) -> QTensor:
    """Dense :func:`mmfast.kernels.kv_quant.reference.quantize` (no row mask): the same codes, scales and mins.

    The float16-or-float32 metadata choice needs one ``|x|.max()`` read (as the reference's range check)."""
    if bits not in (2, 4, 8) or axis not in ("token", "channel"):
        raise ValueError(f"unsupported bits={bits} / axis={axis!r}")
    md = meta or torch.float16
    if md not in (torch.float16, torch.float32):
        raise ValueError(f"metadata dtype must be float16 or float32, got {md}")
    if md == torch.float16 and x.numel() and bool(x.detach().abs().amax().float() > _FP16_MAX):
        md = torch.float32
    *lead, n, d = x.shape
    xc = x.detach().contiguous()
    per = 8 // bits
    nbytes = triton.cdiv(d, per)
    codes = torch.empty(*lead, n, nbytes, dtype=torch.uint8, device=x.device)
    block_b = max(1, min(64, triton.next_power_of_2(nbytes)))
    if axis == "token":
        m = xc.numel() // max(d, 1)
        scale = torch.empty(*lead, n, 1, dtype=md, device=x.device)
        zero = torch.empty_like(scale)
        block_m = 16
        if m:
            _quant_token[(triton.cdiv(m, block_m),)](
                xc,
                codes,
                scale,
                zero,
                m,
                d,
                nbytes,
                BITS=bits,
                META16=md == torch.float16,
                BLOCK_M=block_m,
                BLOCK_B=block_b,
            )
    else:
        groups = xc.numel() // max(n * d, 1)
        scale = torch.empty(*lead, 1, d, dtype=md, device=x.device)
        zero = torch.empty_like(scale)
        if groups:
            _quant_channel[(groups, triton.cdiv(nbytes, block_b))](
                xc, codes, scale, zero, n, d, nbytes, BITS=bits, META16=md == torch.float16, BLOCK_N=32, BLOCK_B=block_b
            )
    return QTensor(codes, scale, zero, bits, axis, d)
