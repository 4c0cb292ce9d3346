"""Kernels: ``<op>/reference.py`` (torch, the test oracle), ``<op>/triton.py`` (guarded import) and
``<op>/__init__.py`` (dispatch). docs/kernels.md lists the ops and their status.

Dispatch rule: ``MMFAST_KERNEL_IMPL=triton`` forces the Triton kernel (tests run it on CPU under
``TRITON_INTERPRET=1``), ``MMFAST_KERNEL_IMPL=torch`` forces the reference. Otherwise (``auto``) the Triton kernel
runs only when the tensors are on CUDA, Triton imports **and** the op is marked verified in :data:`GPU_VERIFIED`
(its CUDA test passed on a real GPU); an unverified op stays on torch by default and its kernel is opt-in. CUDA is
never queried at import time.

Every op package also exposes ``benchmark(impl, *, device, dtype, **shape) -> Callable[[], Any]``: synthetic
inputs of the given shape built once, and a closure running one call of the ``"torch"`` or ``"triton"``
implementation on them (for a GPU timing suite: ``triton.testing.do_bench(benchmark("triton", device="cuda"))``).
"""

from __future__ import annotations

import functools
import os

import torch

#: op -> its Triton kernel passed its CUDA test on a real GPU (only then is it the default on CUDA). Flip an entry
#: only after running ``tests/test_kernels_*.py`` on a GPU (the CUDA tests are skipped elsewhere).
GPU_VERIFIED: dict[str, bool] = {
    "probe_attention": False,
    "kv_quant": False,
    "packed_attention": False,
    "token_merge": False,
    "spec_verify": False,
}


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def kernel_impl() -> str:
    """``MMFAST_KERNEL_IMPL``: ``"triton"``, ``"torch"`` or ``"auto"`` (unset / anything else)."""
    impl = os.environ.get("MMFAST_KERNEL_IMPL", "").strip().lower()
    if impl in ("torch", "reference"):
        return "torch"
    return "triton" if impl == "triton" else "auto"


def use_triton(*tensors: torch.Tensor, verified: bool = False) -> bool:
    """Whether to run the Triton kernel on ``tensors`` (see the module docstring); ``verified``: the op's entry in
    :data:`GPU_VERIFIED`."""
    impl = kernel_impl()
    if impl == "torch":
        return False
    if impl == "triton":
        return triton_available()
    return verified and bool(tensors) and all(t.is_cuda for t in tensors) and triton_available()
