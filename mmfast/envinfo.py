"""``mmfast env``: versions, device, and which kernel implementations can run here."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def env_report() -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {
        "mmfast": _version("mmfast"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu threads (torch)": torch.get_num_threads(),
    }
    for pkg in ("torch", "torchvision", "transformers", "safetensors", "av", "decord", "gradio", "triton", "xformers"):
        report[pkg] = _version(pkg)
    cuda = torch.cuda.is_available()
    report["device"] = f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu"
    report["bf16 on cpu"] = "avx512_bf16" if "avx512_bf16" in _cpu_flags() else "emulated (slow)"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    has_triton = _version("triton") != "not installed"
    report["kernels: torch"] = "available (reference, default on CPU)"
    report["kernels: triton"] = (
        ("available (CUDA)" if cuda else "interpreter (TRITON_INTERPRET=1)" if interp else "installed, needs CUDA or TRITON_INTERPRET=1")
        if has_triton
        else "not installed (pip install 'mmfast[gpu]')"
    )
    report["MMFAST_KERNEL_IMPL"] = os.environ.get("MMFAST_KERNEL_IMPL", "auto")
    from mmfast import zoo

    report["zoo"] = ", ".join(f"{k}{'' if v else ' (missing)'}" for k, v in zoo.available().items())
    return report


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""
