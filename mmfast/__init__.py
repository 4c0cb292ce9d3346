"""mmfast: fast multimodal models without changing what they answer or draw.

    >>> import mmfast
    >>> qa = mmfast.pipeline("image-qa", accelerate="pool(factor=2)")
    >>> qa(image="scene.png", question="What color is the star?")["answer"]

Heavy imports (torch, transformers) happen on first use of ``pipeline`` / ``accel``, so ``import mmfast``
and ``mmfast.media`` stay cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmfast import errors

__version__ = "0.1.0"

__all__ = ["TASKS", "__version__", "accel", "batch", "errors", "pipeline"]


def __getattr__(name: str) -> Any:
    if name in ("pipeline", "TASKS"):
        return getattr(importlib.import_module("mmfast.api"), name)
    if name in ("accel", "batch"):
        return importlib.import_module(f"mmfast.{name}")
    raise AttributeError(f"module 'mmfast' has no attribute {name!r}")
