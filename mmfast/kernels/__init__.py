"""Kernels: ``<op>/reference.py`` (torch, the test oracle), ``<op>/triton.py`` (guarded import) and
``<op>/__init__.py`` (dispatch).

Dispatch rule (docs/architecture.md, Kernels): Triton when the tensors are on CUDA and Triton imports, or when
``MMFAST_KERNEL_IMPL=triton`` (tests run it on CPU under ``TRITON_INTERPRET=1``); torch otherwise
(``MMFAST_KERNEL_IMPL=torch`` forces it). CUDA is never queried at import time.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether to run the Triton kernel on ``tensors`` (see the module docstring)."""
    impl = os.environ.get("MMFAST_KERNEL_IMPL", "").strip().lower()
    if impl in ("torch", "reference"):
        return False
    if impl == "triton":
        return triton_available()
    return bool(tensors) and all(t.is_cuda for t in tensors) and triton_available()
