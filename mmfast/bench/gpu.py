"""``mmfast bench gpu``: the one-command GPU suite (issue #23) — ``eval/gpu/run.sh`` on a lent GPU.

One process, four sections by default; every row has the harness schema plus ``section`` (and, on a failure, ``error``: a
section that raises is recorded and the next one runs). With ``--opt out_dir=DIR`` the rows so far are written
to ``DIR/gpu.json`` / ``DIR/gpu.md`` after each section, so a run cut short keeps what it measured.

* ``kernels``: every Triton kernel against its torch reference at real sizes (7B-model heads: 32 query / 8 KV
  heads, head_dim 128; 4k and 32k cached tokens for attention; SigLIP-400M token grids for merging; LlamaGen's
  16384-code windows for verification), in fp16 and bf16 (spec_verify: fp32 and bf16): the error against the
  reference, the op's pass criterion (those of its ``tests/test_kernels_*`` CUDA test; below), ``torch_ms`` /
  ``triton_ms`` (``triton.testing.do_bench`` medians; CUDA events) and ``speedup``. A ``kernels-summary`` row per
  op says whether every case passed (``ok``) beside its current :data:`mmfast.kernels.GPU_VERIFIED` flag: flip
  the flag for an op whose summary is ok on CUDA (and whose CUDA tests passed, which ``run.sh`` also runs).
  Criteria: ``packed_attention`` max |out - ref| within 5e-3 (fp16) / 2e-2 (bf16), twice that against the fp32
  reference; ``kv_quant`` identical fp16 metadata, codes off by at most one and only at float32 ties of a .5
  boundary, dequantize within 1e-4; ``token_merge`` best cosine within 1e-5, the same partner wherever the best
  leads the runner-up by 1e-5, scatter-means within 1e-4; ``spec_verify`` identical acceptances, acceptance
  probabilities within 1e-5, at most one differing draw (none when greedy); ``probe_attention`` relative error
  ``|out - ref| / |ref|`` <= 1e-2 (its ``tl.dot`` runs in tf32 on a GPU; the torch reference in fp32).
* ``vlm-prefill`` / ``vlm-kv``: :func:`mmfast.bench.vlm.vlm_speed` on a random LLaVA-OneVision-7B-shaped model
  (Qwen2-7B LM: 28 layers, 28 / 4 heads, head_dim 128, vocab 152064; SigLIP-so400m tower, 26 layers, 384 px;
  ``vlm.REAL_SHAPES["7b"]``), bf16, sdpa, built from configs on the GPU (16 GB: no download, no checkpoint
  written, seconds to initialise; all 28 layers fit, so nothing is extrapolated). Prefill: measured
  speed-up beside the ideal (FLOP ratio) for :data:`PREFILL_METHODS` (25% of the visual tokens kept) on an anyres
  image (3724 prompt tokens) and a 16-frame video (3161). KV: decode ms/token, KV bytes and ``kv_ratio`` for
  :data:`KV_METHODS` at 16 and 64 frames (3161 / 12569 prompt tokens, 32 new tokens). Random weights give
  near-uniform attention, so score-based methods are timed at a fixed ratio (``zipvl(ratio=0.25)``).
  ``--opt sections=...,vlm-triton`` (or ``sections=all``) adds rows of the kernel-using methods with
  ``MMFAST_KERNEL_IMPL=triton`` (merging, probe scores, KV quantization and packed-KV decode where wired in), and
  ``ar-triton`` the AR rows of GPT-B with the verification kernel; both opt-in until the kernels are verified.
* ``ar-speed``: :func:`mmfast.bench.ar.ar_speed` in bf16 on the zoo's tiny-ar (trained: its steps are real
  acceptances) and random LlamaGen GPT-B / GPT-L (256 tokens, 16384 codes): ``ms_per_step``, ``step_cost``,
  measured ``step_compression`` / ``speedup`` and ``projected_speedup`` = tiny-ar's measured step compression (from
  ``eval/results/ar-quality-jacobi.json``) / step cost, for :data:`AR_METHODS` (``eagle_sd`` on a random model gets
  a random draft head).

Rows of section ``timing`` give each section's measured ``wall_s`` beside :data:`EXPECTED_S`.

``--opt smoke=True`` runs the same code at tiny sizes on the CPU in about 30 s: kernels at tiny shapes through
Triton's interpreter (``TRITON_INTERPRET=1``, set here when Triton is not imported yet; otherwise the kernel rows
record why they were skipped), fp16 and fp32 (bf16 ``tl.dot`` is wrong in the CPU interpreter); the ``tiny``
LLaVA-OneVision (4 LM layers) for the VLM sections; tiny-ar and a one-layer LlamaGen for ``ar-speed``. Options
(``sections``, ``prefill_methods``, ``kv_methods``, ``ar_methods``, ``ar_models``, ``kernel_ops``) trim it further.
``--accelerate`` specs replace :data:`PREFILL_METHODS`.

Expected time on one H200 (790 TFLOP/s bf16 and 4.3 TB/s as measured on these machines; Python / launch overhead
from typical Hugging Face eager decoding, ~25 ms per 7B decode step), about 5 minutes in all:

* kernels ~70 s: ~25 Triton compilations at ~1.5 s, ~60 ``do_bench`` timings at ~0.2 s (each op moves at most a
  few hundred MB: packed attention at 32k tokens reads 2 x 8 heads x 32768 x 128 x 2.2 bits (10% 4-bit, 90% 2-bit) ~ 18 MB + metadata,
  microseconds at 4.3 TB/s, so compilation dominates), inputs drawn on the CPU; the CUDA tests in ``run.sh`` ~40 s.
* vlm ~85 s: LM 6.53 G non-embedding parameters = 13.1 GFLOP per prompt token. Image 3724 tokens -> 48.7 TFLOP + 2.8
  attention + 2.9 tower (5 tiles x 729 tokens x 0.79 GFLOP) ~ 54 TFLOP ~ 0.09 s at 600 TFLOP/s achieved; 16 frames
  ~ 52 TFLOP ~ 0.09 s; 64 frames 165 + 32 attention + 37 tower ~ 234 TFLOP ~ 0.4 s. A decode step reads 14.1 GB of
  weights (3.3 ms at 4.3 TB/s) but Python / launches make it ~25 ms. Prefill section: 8 rows x 2 inputs x 3 repeats
  (+ warm-ups) ~ 50 calls x ~0.4 s (prefill + CPU preprocessing + 8 tokens) ~ 20 s; KV section: 4 rows x 2 inputs x
  3 repeats ~ 26 calls x 1.0-1.6 s (32 tokens; 64-frame preprocessing ~0.4 s) ~ 35 s, plus ZipVL's dequantizing
  decode (~2x launches) ~ 20 s; model init and pipelines ~10 s.
* ar-speed ~50 s: GPT-B one-token steps are launch-bound (~3-5 ms: 12 layers, 2 CFG rows), 256 steps ~ 1 s per
  image; speculative rows ~31 steps of ~10 ms; 25 generations per model (warm-up + 2 repeats x 2 images x 5 rows)
  ~ 11 s for GPT-B, ~22 s for GPT-L (24 layers), ~5 s for tiny-ar, plus LANTERN's / GSD's codebook tables.
* Python start-up, imports and result writing ~30 s. An H100 (3.35 TB/s) adds ~10% (the memory-bound decode).
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from mmfast.bench.harness import BenchResult, median, provenance, row, suite
from mmfast.errors import ConfigError

SECTIONS: tuple[str, ...] = ("kernels", "vlm-prefill", "vlm-kv", "ar-speed")
#: every section (``--opt sections=all``); ``vlm-triton`` / ``ar-triton`` (the kernel-using methods again with
#: ``MMFAST_KERNEL_IMPL=triton``: token merging, probe scores, KV quantization, packed-KV decode, verification) are
#: opt-in until the kernels are verified (then the default dispatch runs them in the sections above)
ALL_SECTIONS: tuple[str, ...] = (*SECTIONS, "vlm-triton", "ar-triton")
KERNEL_OPS: tuple[str, ...] = ("packed_attention", "kv_quant", "token_merge", "spec_verify", "probe_attention")
PREFILL_METHODS: tuple[str, ...] = (
    "pool(factor=2)", "random(keep=0.25)", "turbo(keep=0.25)", "tokenflex(keep=0.25)", "zipvl(ratio=0.25)",
    "fastv(keep=0.25)", "visionzip(keep=0.25)",
)
KV_METHODS: tuple[str, ...] = ("lookm(budget=0.25)", "zipvl(ratio=0.25)", "kv_window(sink=4,recent=64)")
#: methods that run a kernel for ``vlm-triton``: prefill (token_merge, probe_attention), then KV (probe_attention,
#: kv_quant, packed-KV decode attention)
TRITON_PREFILL_METHODS: tuple[str, ...] = ("turbo(keep=0.25)", "fastv(keep=0.25)")
TRITON_KV_METHODS: tuple[str, ...] = ("zipvl(ratio=0.25)", "lookm(budget=0.25)", "kv_window(sink=4,recent=64)")
AR_METHODS: tuple[str, ...] = ("sjd()", "gsd()", "lantern()", "eagle_sd()")
#: ``ar-speed`` models: a zoo name or a LlamaGen preset (random weights)
AR_MODELS: tuple[str, ...] = ("tiny-ar", "GPT-B", "GPT-L")
SMOKE_AR_MODELS: tuple[str, ...] = ("tiny-ar", "tiny")
#: the docstring's estimate per section on one H200, seconds (``timing`` rows put the measured time beside it)
EXPECTED_S: dict[str, float] = {
    "kernels": 70, "vlm-prefill": 30, "vlm-kv": 55, "ar-speed": 50, "vlm-triton": 45, "ar-triton": 15,
}


# --------------------------------------------------------------------------------------------------
# transformers < 5.23 (the GPU image has 5.17)
# --------------------------------------------------------------------------------------------------
def transformers_compat() -> list[str]:
    """Let the VLM adapters run on transformers releases before 5.23 (the GPU machines' image has 5.17); returns
    what was patched ([] on 5.23+, where nothing is needed).

    Before 5.23 LLaVA-OneVision's ``get_video_features`` took the frames as ``pixel_values`` (5.23:
    ``pixel_values_videos``) and left the trailing newline token to ``forward`` (5.23 appends it in
    ``get_video_features``, where the adapter reads it). The
    adapter's ``_encode`` then passes the frames under the old name and appends ``image_newline`` itself, so the
    features are those 5.23 returns (checked on the tiny model: every vlm-speed method gives the same tokens and
    KV bytes under 5.17 with this patch as under 5.23 without it). The proper home of this is
    ``mmfast/models/vlm.py``; it lives here so the GPU suite needs no install.
    """
    import inspect

    from mmfast.models import vlm as V

    if getattr(V.VLMAdapter._encode, "_mmfast_compat", False):
        return ["VLMAdapter._encode: legacy get_video_features(pixel_values=...) + trailing newline"]
    try:
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
    except ImportError:  # pragma: no cover - a transformers without the family
        return []
    params = inspect.signature(LlavaOnevisionModel.get_video_features).parameters
    if "pixel_values_videos" in params or "pixel_values" not in params:
        return []
    original = V.VLMAdapter._encode

    def _encode(self: Any, modality: str, inputs: Any) -> Any:
        fn = getattr(self.model.model, f"get_{modality}_features")
        names = inspect.signature(fn).parameters
        if modality != "video" or "pixel_values_videos" in names or "pixel_values_videos" not in inputs:
            return original(self, modality, inputs)
        kwargs = {k: inputs[k] for k in names if k not in ("kwargs", "pixel_values") and k in inputs}
        out = fn(pixel_values=inputs["pixel_values_videos"], **kwargs, return_dict=True).pooler_output
        frames = inputs["pixel_values_videos"].shape[1]
        per = out.shape[1] // frames
        if getattr(self, "onevision", False) and out.shape[1] % frames == 0 and math.isqrt(per) ** 2 == per:
            newline = self.model.model.image_newline[None, None, :].to(out).expand(out.shape[0], 1, -1)
            out = torch.cat((out, newline), dim=1)
        return out

    _encode._mmfast_compat = True  # type: ignore[attr-defined]
    V.VLMAdapter._encode = _encode
    return ["VLMAdapter._encode: legacy get_video_features(pixel_values=...) + trailing newline"]


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """ms of one call: ``triton.testing.do_bench`` median on CUDA (events, L2 flushed), else a host-clock median."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def host(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return float(median(times))

    return host


def _err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref|, |out - ref| / |ref|) in float64; NaN anywhere gives (inf, inf)."""
    o, r = out.double(), ref.double()
    if not bool(torch.isfinite(o).all()):
        return math.inf, math.inf
    d = (o - r).abs()
    return float(d.max()) if d.numel() else 0.0, float(d.norm() / r.norm().clamp_min(1e-30))


def _kernel_cases(smoke: bool, ops: tuple[str, ...]) -> list[tuple[str, dict[str, Any], torch.dtype]]:
    """(op, shape, dtype) of every kernel check: real sizes, or tiny ones for the interpreter."""
    half = (torch.float16, torch.float32) if smoke else (torch.float16, torch.bfloat16)
    probs = (torch.float32, torch.float16) if smoke else (torch.float32, torch.bfloat16)
    if smoke:
        shapes: dict[str, list[dict[str, Any]]] = {
            "packed_attention": [dict(heads=4, kv_heads=2, length=40, dim=16, tail=3)],
            "kv_quant": [dict(heads=2, length=24, dim=16)],
            "token_merge": [dict(batch=2, tokens=24, dim=16)],
            "spec_verify": [dict(batch=2, window=4, vocab=64)],
            "probe_attention": [dict(heads=4, kv_heads=2, probes=4, length=40, dim=16)],
        }
    else:
        shapes = {
            "packed_attention": [dict(heads=32, kv_heads=8, length=n, dim=128, tail=16) for n in (4096, 32768)],
            "kv_quant": [dict(heads=8, length=16384, dim=128)],
            "token_merge": [dict(batch=2, tokens=576, dim=1024), dict(batch=16, tokens=729, dim=1152)],
            "spec_verify": [dict(batch=16, window=16, vocab=16384)],
            "probe_attention": [dict(heads=32, kv_heads=8, probes=64, length=n, dim=128) for n in (4096, 32768)],
        }
    out = []
    for op in ops:
        if op not in shapes:
            raise ConfigError(f"unknown kernel op {op!r}; ops: {', '.join(KERNEL_OPS)}.")
        for shape in shapes[op]:
            for dt in probs if op == "spec_verify" else half:
                out.append((op, shape, dt))
    return out


def _shape_label(shape: dict[str, Any], dt: torch.dtype) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items()) + f" {str(dt).removeprefix('torch.')}"


def _check_packed_attention(shape: dict[str, Any], dt: torch.dtype, dev: torch.device, timer: Callable) -> list[dict]:
    import torch.nn.functional as F

    from mmfast.kernels.packed_attention import make_case, packed_attention_reference
    from mmfast.kernels.packed_attention.triton import packed_attention_triton

    q, parts = make_case(device=dev, dtype=dt, **shape)
    ref = packed_attention_reference(q, parts).float()
    out = packed_attention_triton(q, parts).float()
    ref32 = packed_attention_reference(q.float(), parts)
    tol = {torch.float16: 5e-3, torch.bfloat16: 2e-2}.get(dt, 1e-5)
    err, rel = _err(out, ref)
    err32, _ = _err(out, ref32)
    ok = bool(torch.allclose(out, ref, atol=tol, rtol=tol) and torch.allclose(out, ref32, atol=2 * tol, rtol=2 * tol))
    nbytes = sum(
        (t.nbytes() if hasattr(t, "nbytes") and callable(t.nbytes) else t.numel() * t.element_size())
        for p in parts for t in (p.k, p.v, p.vscale) if t is not None
    )
    b, h, _, d = q.shape
    length = shape["length"] + shape.get("tail", 16)
    k = torch.randn(b, shape["kv_heads"], length, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    t_torch = timer(lambda: packed_attention_reference(q, parts))
    t_triton = timer(lambda: packed_attention_triton(q, parts))
    t_dense = timer(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    return [dict(max_abs_err=err, rel_err=rel, max_abs_err_vs_fp32=err32, tol=tol, ok=ok, torch_ms=t_torch,
                 triton_ms=t_triton, dense_sdpa_ms=t_dense, kv_mbytes=round(nbytes / 1e6, 2),
                 dense_kv_mbytes=round(2 * k.numel() * k.element_size() / 1e6, 2),
                 triton_gbps=round(nbytes / (t_triton * 1e-3) / 1e9, 1))]


def _check_kv_quant(shape: dict[str, Any], dt: torch.dtype, dev: torch.device, timer: Callable) -> list[dict]:
    from mmfast.kernels.kv_quant.reference import dequantize as dequantize_reference
    from mmfast.kernels.kv_quant.reference import quantize as quantize_reference
    from mmfast.kernels.kv_quant.reference import unpack
    from mmfast.kernels.kv_quant.triton import dequantize_triton, quantize_triton

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, shape["heads"], shape["length"], shape["dim"], generator=g).to(dev, dt)
    x[..., 7] *= 20  # an outlier channel (as real keys have)
    d = shape["dim"]
    rows = []
    for bits in (2, 4):
        for axis in ("channel", "token"):
            a, b = quantize_triton(x, bits, axis), quantize_reference(x, bits, axis)
            meta_same = bool(torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero))
            diff = unpack(a.codes, bits, d).int() - unpack(b.codes, bits, d).int()
            y = (x.float() - b.zero.float()) / b.scale.float()
            tie = ((y - y.floor()) - 0.5).abs() < 1e-4
            codes_ok = bool(diff.abs().max() <= 1) and bool(tie[diff != 0].all())
            got, want = dequantize_triton(b, torch.float32), dequantize_reference(b, torch.float32)
            err, rel = _err(got, want)
            dq_ok = bool(torch.allclose(got, want, atol=1e-4, rtol=1e-5))
            rows.append(dict(variant=f"quantize {bits}-bit {axis}", ok=meta_same and codes_ok, metadata_equal=meta_same,
                             codes_differing=int((diff != 0).sum()),
                             torch_ms=timer(lambda b_=bits, a_=axis: quantize_reference(x, b_, a_)),
                             triton_ms=timer(lambda b_=bits, a_=axis: quantize_triton(x, b_, a_))))
            rows.append(dict(variant=f"dequantize {bits}-bit {axis}", ok=dq_ok, max_abs_err=err, rel_err=rel, tol=1e-4,
                             torch_ms=timer(lambda q_=b: dequantize_reference(q_, dt)),
                             triton_ms=timer(lambda q_=b: dequantize_triton(q_, dt))))
    return rows


def _check_token_merge(shape: dict[str, Any], dt: torch.dtype, dev: torch.device, timer: Callable) -> list[dict]:
    import torch.nn.functional as F

    from mmfast.kernels.token_merge import reference
    from mmfast.kernels.token_merge.triton import bipartite_merge_triton, cosine_match_triton, scatter_mean_triton

    g = torch.Generator().manual_seed(0)
    bsz, t, c = shape["batch"], shape["tokens"], shape["dim"]
    x = torch.randn(bsz, t, c, generator=g).to(dev, dt)
    a, b = x[:, ::2], x[:, 1::2]
    best, idx = cosine_match_triton(a, b)
    ref_best, ref_idx = reference.cosine_match(a, b)
    err, rel = _err(best, ref_best)
    scores = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)
    top2 = scores.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-5
    idx_ok = bool(torch.equal(idx[clear], ref_idx[clear]))
    n = t // 2
    index = torch.randint(0, n, (bsz, t), generator=g).to(dev)
    w = torch.rand(bsz, t, generator=g).to(dev)
    sm = scatter_mean_triton(x, index, n, w)
    sm_ref = reference.scatter_mean(x, index, n, w)
    sm_err = max(_err(u.float(), v.float())[0] for u, v in zip(sm, sm_ref))
    sm_ok = all(bool(torch.allclose(u.float(), v.float(), atol=1e-4, rtol=1e-4)) for u, v in zip(sm, sm_ref))
    size = torch.ones(bsz, t, device=dev)
    anchor = torch.arange(t, device=dev).expand(bsz, -1)
    r = t // 2
    merged = bipartite_merge_triton(x, size, anchor, None, r)
    merged_ref = reference.bipartite_merge(x, size, anchor, None, r)
    same = None
    if bool(clear.all()):
        same = all(torch.equal(getattr(merged, k), getattr(merged_ref, k)) for k in ("anchor", "src", "dst")) and bool(
            torch.allclose(merged.x.float(), merged_ref.x.float(), atol=1e-2, rtol=1e-5))
    return [
        dict(variant="cosine_match", ok=bool(err <= 1e-5 and idx_ok), max_abs_err=err, rel_err=rel, tol=1e-5,
             partners_clear=round(float(clear.float().mean()), 4), partners_equal_where_clear=idx_ok,
             torch_ms=timer(lambda: reference.cosine_match(a, b)), triton_ms=timer(lambda: cosine_match_triton(a, b))),
        dict(variant="scatter_mean", ok=sm_ok, max_abs_err=sm_err, tol=1e-4,
             torch_ms=timer(lambda: reference.scatter_mean(x, index, n, w)),
             triton_ms=timer(lambda: scatter_mean_triton(x, index, n, w))),
        dict(variant=f"bipartite_merge r={r}", ok=same, whole_merge_equal=same,
             torch_ms=timer(lambda: reference.bipartite_merge(x, size, anchor, None, r)),
             triton_ms=timer(lambda: bipartite_merge_triton(x, size, anchor, None, r))),
    ]


def _check_spec_verify(shape: dict[str, Any], dt: torch.dtype, dev: torch.device, timer: Callable) -> list[dict]:
    from mmfast.kernels.spec_verify import make_case, spec_verify_reference
    from mmfast.kernels.spec_verify.triton import spec_verify_triton

    rows = []
    for proposal in (True, False):
        case = make_case(proposal=proposal, device=dev, dtype=dt, seed=3, **shape)
        ok, worst, tokens_diff = True, 0.0, 0
        for greedy in (False, True):
            got, want = spec_verify_triton(**case, greedy=greedy), spec_verify_reference(**case, greedy=greedy)
            err, _ = _err(got.accept_prob, want.accept_prob)
            worst = max(worst, err)
            diff = int((got.token != want.token).sum())
            tokens_diff += diff
            ok = ok and bool(torch.equal(got.accepted, want.accepted)) and bool(
                torch.allclose(got.accept_prob, want.accept_prob, atol=1e-5, rtol=1.3e-6)) and diff <= (0 if greedy else 1)
        rows.append(dict(variant="proposal q" if proposal else "point-mass drafts", ok=ok, max_abs_err=worst, tol=1e-5,
                         tokens_differing=tokens_diff,
                         torch_ms=timer(lambda c=case: spec_verify_reference(**c)),
                         triton_ms=timer(lambda c=case: spec_verify_triton(**c))))
    return rows


def _check_probe_attention(shape: dict[str, Any], dt: torch.dtype, dev: torch.device, timer: Callable) -> list[dict]:
    from mmfast.kernels.probe_attention import probe_attention_reference
    from mmfast.kernels.probe_attention.triton import probe_attention_triton

    g = torch.Generator().manual_seed(0)
    b, length, probes = 1, shape["length"], shape["probes"]
    q = torch.randn(b, shape["heads"], probes, shape["dim"], generator=g).to(dev, dt)
    k = torch.randn(b, shape["kv_heads"], length, shape["dim"], generator=g).to(dev, dt)
    q_pos = torch.arange(length - probes, length, device=dev)
    out = probe_attention_triton(q, k, q_pos)
    ref = probe_attention_reference(q, k, q_pos)
    err, rel = _err(out, ref)
    top = max(1, length // 4)  # the keys a 25% budget keeps (scores summed over heads, as ZipVL ranks them)
    kept = set(out.sum(dim=(0, 1)).topk(top).indices.tolist())
    kept_ref = set(ref.sum(dim=(0, 1)).topk(top).indices.tolist())
    return [dict(ok=bool(rel <= 1e-2), max_abs_err=err, rel_err=rel, tol=1e-2,
                 top25_overlap=round(len(kept & kept_ref) / top, 4),
                 torch_ms=timer(lambda: probe_attention_reference(q, k, q_pos)),
                 triton_ms=timer(lambda: probe_attention_triton(q, k, q_pos)))]


_CHECKS: dict[str, Callable[..., list[dict]]] = {
    "packed_attention": _check_packed_attention,
    "kv_quant": _check_kv_quant,
    "token_merge": _check_token_merge,
    "spec_verify": _check_spec_verify,
    "probe_attention": _check_probe_attention,
}


def _triton_ready(dev: torch.device) -> str | None:
    """None when the Triton kernels can run here, else why not (recorded in the rows)."""
    if dev.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            if "triton" in sys.modules:
                return "on CPU the kernels run in Triton's interpreter: set TRITON_INTERPRET=1 before Triton is imported"
            os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported (below, first time)
    from mmfast.kernels import triton_available

    triton_available.cache_clear()
    return None if triton_available() else "triton is not importable"


def kernel_rows(
    dev: torch.device, smoke: bool, ops: tuple[str, ...] = KERNEL_OPS, skip: str | None = None
) -> list[dict[str, Any]]:
    """Rows of the ``kernels`` section, then one ``kernels-summary`` row per op (``skip``: why the kernels cannot
    run here, from :func:`_triton_ready`)."""
    from mmfast.kernels import GPU_VERIFIED

    where = "cuda" if dev.type == "cuda" else "cpu (triton interpreter)"
    skip = skip or _triton_ready(dev)
    rows: list[dict[str, Any]] = []
    if skip is None:
        timer = _timer(dev)
        for op, shape, dt in _kernel_cases(smoke, ops):
            label = _shape_label(shape, dt)
            try:
                results = _CHECKS[op](shape, dt, dev, timer)
            except Exception as e:  # a kernel that fails to compile or run is a failed case, not a failed suite
                results = [dict(ok=False, error=f"{type(e).__name__}: {e}".strip()[:500])]
            for res in results:
                t_torch, t_triton = res.get("torch_ms"), res.get("triton_ms")
                rows.append(row(op, section="kernels", input=label, dtype=str(dt).removeprefix("torch."), ran_on=where,
                                speedup=(t_torch / t_triton) if t_torch and t_triton else None, **res))
    for op in ops:
        cases = [r for r in rows if r["method"] == op]
        checked = [r for r in cases if r.get("ok") is not None]
        ok = bool(checked) and all(r["ok"] for r in checked)
        rows.append(row(op, section="kernels-summary", ok=ok if skip is None else None, cases=len(cases),
                        failed=[f"{r['input']} {r.get('variant', '')}".strip() for r in checked if not r["ok"]],
                        ran_on=where, gpu_verified_flag=GPU_VERIFIED.get(op),
                        flip=bool(ok and dev.type == "cuda" and not GPU_VERIFIED.get(op)),
                        **({"skipped": skip} if skip else {})))
    return rows


# --------------------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------------------
@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _names(value: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    """An option given as a list, a tuple or a comma-separated string (``;`` separates specs with commas)."""
    if value is None:
        return default
    if isinstance(value, str):
        sep = ";" if ";" in value or "(" in value else ","
        return tuple(v.strip() for v in value.split(sep) if v.strip())
    return tuple(value)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """One table per section; a column with one value in every row of a section is written once under it."""
    head = "# mmfast GPU suite" + (" (smoke: tiny sizes)" if meta.get("smoke") else "")
    versions = meta.get("versions") or {}
    info = [f"{k}: {meta[k]}" for k in ("device", "driver", "cuda", "commit", "date", "wall_s", "partial") if k in meta]
    info += [f"{k} {v}" for k, v in versions.items()]
    parts = [head, "", "; ".join(info), ""]
    order = list(dict.fromkeys(r.get("section") for r in rows))
    for section in [s for s in order if s != "timing"] + [s for s in order if s == "timing"]:
        sub = [{k: v for k, v in r.items() if k not in ("section", "trace")} for r in rows if r.get("section") == section]
        cols = dict.fromkeys(k for r in sub for k in r)
        same = {k: sub[0].get(k) for k in cols if k != "method" and len(sub) > 1
                and all(r.get(k) == sub[0].get(k) for r in sub) and sub[0].get(k) is not None}
        table = BenchResult(str(section), [{k: v for k, v in r.items() if k not in same} for r in sub]).to_markdown()
        parts.append(table + ("\n" + "; ".join(f"{k}: {v}" for k, v in same.items()) + "\n" if same else ""))
    return "\n".join(parts)


def _write(out_dir: str | None, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """``gpu.json`` (the harness schema: suite, rows, meta with provenance) and ``gpu.md`` in ``out_dir``."""
    if not out_dir:
        return
    meta = {**meta, **provenance()}
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "gpu.json").write_text(json.dumps(BenchResult("gpu", rows, meta).to_json(), indent=2, default=str))
    (path / "gpu.md").write_text(markdown(rows, meta))


@suite("gpu", "one-command GPU suite: kernels vs references, vlm-speed at LLaVA-OV-7B shape, ar-speed on tiny-ar / "
              "GPT-B / GPT-L (--opt smoke=True: tiny sizes on the CPU)")
def gpu(
    methods: list[str],
    repeats: int,
    smoke: bool = False,
    sections: Any = None,
    out_dir: str | None = None,
    device: str | None = None,
    dtype: str = "bfloat16",
    size: str | None = None,
    layers: int | None = None,
    prefill_methods: Any = None,
    kv_methods: Any = None,
    ar_methods: Any = None,
    ar_models: Any = None,
    kernel_ops: Any = None,
    images: int | None = None,
    **_: Any,
) -> list[dict[str, Any]]:
    """See the module docstring. ``sections``: a subset of :data:`ALL_SECTIONS` (default :data:`SECTIONS`)."""
    from mmfast.bench.ar import ar_speed
    from mmfast.bench.vlm import REAL_SHAPES, _speed_model, vlm_speed

    smoke = bool(smoke)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda" and not smoke:
        raise ConfigError("the GPU suite needs CUDA: on a CPU run its smoke version (--opt smoke=True).")
    todo = ALL_SECTIONS if sections == "all" else _names(sections, SECTIONS)
    unknown = [s for s in todo if s not in ALL_SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(ALL_SECTIONS)}.")
    triton_skip = _triton_ready(dev) if "kernels" in todo or "vlm-triton" in todo else None  # before any import
    repeats = 1 if smoke else repeats
    size = size or ("tiny" if smoke else "7b")
    vlm_layers = layers if layers is not None else (4 if size == "tiny" else None)  # fastv(k=2) needs > 2
    dtype_vlm = dtype
    compat = transformers_compat()
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    meta: dict[str, Any] = {"suite_options": {"smoke": smoke, "repeats": repeats, "size": size, "dtype": dtype},
                            "smoke": smoke, "partial": True, "sections": list(todo), "sections_done": [],
                            "transformers_compat": compat}
    vlm_model: list[Any] = []  # the 7B-shaped pair, built once for every VLM section

    def model_pair(tmp: str) -> Any:
        if not vlm_model:
            vlm_model.append(_speed_model(size, tmp, dtype=dtype_vlm, device=str(dev), layers=vlm_layers))
        return vlm_model[0]

    vlm_common = dict(size=size, layers=vlm_layers, device=str(dev), dtype=dtype_vlm)
    model_note = (f"random {size}-shaped LLaVA-OneVision" + (f", {vlm_layers} LM layers" if vlm_layers else "")
                  + f", {dtype_vlm}, sdpa, {dev.type}")
    tmpdir = tempfile.TemporaryDirectory()

    def vlm(section: str, specs: tuple[str, ...], **kw: Any) -> list[dict[str, Any]]:
        pair = model_pair(tmpdir.name) if size in REAL_SHAPES else None
        out = vlm_speed(list(specs), repeats, model_pair=pair, **vlm_common, **kw)
        for r in out:
            r.update(section=section, model=model_note, **({"transformers_compat": compat} if compat else {}))
        return out

    def run_section(name: str) -> list[dict[str, Any]]:
        if name == "kernels":
            return kernel_rows(dev, smoke, _names(kernel_ops, KERNEL_OPS), skip=triton_skip)
        if name == "vlm-prefill":
            specs = tuple(methods) or _names(prefill_methods, PREFILL_METHODS)
            return vlm(name, specs, inputs="image,video16", new_tokens=4 if smoke else 8)
        if name == "vlm-kv":
            return vlm(name, _names(kv_methods, KV_METHODS), inputs="video16,video64", long_frames=64,
                       new_tokens=4 if smoke else 32)
        if name == "vlm-triton":
            with _env(MMFAST_KERNEL_IMPL="triton"):  # (the CPU interpreter is slow: smoke keeps 16 frames, 2 tokens)
                out = vlm(name, TRITON_PREFILL_METHODS, inputs="video16", new_tokens=2 if smoke else 8)
                out += vlm(name, TRITON_KV_METHODS, inputs="video16" if smoke else "video64", long_frames=64,
                           new_tokens=2 if smoke else 32)
            for r in out:
                r["kernels"] = "triton (MMFAST_KERNEL_IMPL=triton)"
            return out
        if name in ("ar-speed", "ar-triton"):
            out = []
            models = _names(ar_models, SMOKE_AR_MODELS if smoke else AR_MODELS)
            if name == "ar-triton":  # spec_verify in the speculative loop: one real-size model is enough
                models = models[1:2] or models
            for m in models:
                where = {"model": m} if not (m == "tiny" or m.startswith("GPT-")) else {"preset": m}
                try:
                    with _env(MMFAST_KERNEL_IMPL="triton") if name == "ar-triton" else nullcontext():
                        got = ar_speed(list(_names(ar_methods, AR_METHODS)), min(repeats, 2),
                                       images=images or (1 if smoke else 2), device=str(dev), dtype=dtype, **where)
                except Exception as e:
                    got = [row(m, error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-2000:])]
                for r in got:
                    r.update(section=name, ar_model=m)
                    if name == "ar-triton":
                        r["kernels"] = "triton (MMFAST_KERNEL_IMPL=triton)"
                out += got
                _free()
            return out
        raise AssertionError(name)  # pragma: no cover

    for name in todo:
        t0 = time.perf_counter()
        try:
            got = run_section(name)
        except Exception as e:  # record and go on: the next section may still run
            got = [row(name, section=name, error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-2000:])]
        wall = time.perf_counter() - t0
        rows += got
        rows.append(row(name, section="timing", wall_s=round(wall, 1),
                        expected_s=None if smoke else EXPECTED_S.get(name)))
        meta["sections_done"].append(name)
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        meta["partial"] = len(meta["sections_done"]) < len(todo)
        _write(out_dir, rows, meta)
        if name.startswith("vlm") and not any(s.startswith("vlm") for s in todo[todo.index(name) + 1:]):
            vlm_model.clear()
        _free()
    vlm_model.clear()
    tmpdir.cleanup()
    return rows
