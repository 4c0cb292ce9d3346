"""Speculative verification over a window (SJD / speculative sampling; LANTERN and GSD through relaxed inputs).

:func:`spec_verify` dispatches (docs/kernels.md): :mod:`.reference` (torch, the oracle) or :mod:`.triton` (one
launch per step). ``MMFAST_KERNEL_IMPL=triton`` opts in; CUDA default once ``GPU_VERIFIED["spec_verify"]`` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmfast.kernels import GPU_VERIFIED, use_triton
from mmfast.kernels.spec_verify.reference import Verdict, acceptance, inverse_cdf
from mmfast.kernels.spec_verify.reference import spec_verify as spec_verify_reference

__all__ = ["Verdict", "acceptance", "benchmark", "inverse_cdf", "spec_verify", "spec_verify_reference"]


def spec_verify(
    p: torch.Tensor,
    x: torch.Tensor,
    u_accept: torch.Tensor,
    u_sample: torch.Tensor,
    q: torch.Tensor | None = None,
    px: torch.Tensor | None = None,
    qx: torch.Tensor | None = None,
    greedy: bool = False,
) -> Verdict:
    """Accepted drafts, the residual / bonus draw and the acceptance probabilities (see :mod:`.reference`)."""
    if use_triton(p, verified=GPU_VERIFIED["spec_verify"]):
        from mmfast.kernels.spec_verify.triton import spec_verify_triton

        return spec_verify_triton(p, x, u_accept, u_sample, q, px, qx, greedy)
    return spec_verify_reference(p, x, u_accept, u_sample, q, px, qx, greedy)


def make_case(
    *,
    batch: int = 4,
    window: int = 16,
    vocab: int = 16384,
    proposal: bool = True,
    bonus: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Inputs of one verify step: K = ``window`` - 1 drafts drawn from softmax proposals (or point masses, ``q``
    None, with drafts from a nearby distribution when not ``proposal``), targets close to them with K (+ 1 bonus)
    rows, uniforms."""
    g = torch.Generator().manual_seed(seed)
    k = window - 1
    z = torch.randn(batch, k + 1, vocab, generator=g) * 3  # shared logits: targets and proposals roughly agree
    p = torch.softmax(z[:, : k + int(bonus)] + 0.5 * torch.randn(batch, k + int(bonus), vocab, generator=g), -1)
    q = torch.softmax(z[:, :k] + 0.5 * torch.randn(batch, k, vocab, generator=g), -1) if proposal else None
    src = q if q is not None else torch.softmax(z[:, :k], -1)
    x = torch.multinomial(src.reshape(-1, vocab), 1, generator=g).view(batch, k)
    out = {
        "p": p,
        "x": x,
        "u_accept": torch.rand(batch, k, generator=g),
        "u_sample": torch.rand(batch, generator=g),
        "q": q,
    }
    return {
        n: None if t is None else (t.to(device, dtype) if t.is_floating_point() else t.to(device))
        for n, t in out.items()
    }


def benchmark(
    impl: str, *, device: str | torch.device = "cuda", dtype: torch.dtype = torch.float32, **shape: Any
) -> Callable[[], Any]:
    """A closure running one ``impl`` ("torch" | "triton") verify step on a :func:`make_case` window."""
    case = make_case(device=device, dtype=dtype, **shape)
    if impl == "triton":
        from mmfast.kernels.spec_verify.triton import spec_verify_triton

        return lambda: spec_verify_triton(**case)
    return lambda: spec_verify_reference(**case)
