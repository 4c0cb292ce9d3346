"""``mmfast.pipeline(task, model=..., accelerate=...)``: task → pipeline, model resolution, accelerate specs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mmfast import zoo
from mmfast.accel.spec import resolve
from mmfast.errors import ConfigError, IncompatibleAcceleratorError, UnsupportedModelError
from mmfast.models.registry import ARGEN_ADAPTERS, adapter_for, load_class
from mmfast.pipelines.base import VLMPipeline
from mmfast.pipelines.image_gen import ImageGenPipeline, TextToImagePipeline
from mmfast.pipelines.image_qa import ImageCaptionPipeline, ImageQAPipeline
from mmfast.pipelines.streaming import StreamingVideoQAPipeline
from mmfast.pipelines.video_qa import VideoQAPipeline
from mmfast.types import Stage

TASKS: dict[str, type[Any]] = {
    "image-qa": ImageQAPipeline,
    "image-caption": ImageCaptionPipeline,
    "video-qa": VideoQAPipeline,
    "streaming-video-qa": StreamingVideoQAPipeline,
    "class-to-image": ImageGenPipeline,
    "text-to-image": TextToImagePipeline,
}
GEN_TASKS = ("class-to-image", "text-to-image")

#: the embedded default model of each task (works offline)
DEFAULT_MODELS: dict[str, str] = {
    "image-qa": "tiny-vlm",
    "image-caption": "tiny-vlm",
    "video-qa": "tiny-vlm",
    "streaming-video-qa": "tiny-vlm",
    "class-to-image": "tiny-ar",
    "text-to-image": "tiny-ar",
}

def _dtype(dtype: Any) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
        value = getattr(torch, name.get(dtype, dtype), None)
        if isinstance(value, torch.dtype):
            return value
    raise ConfigError(f"Unknown dtype {dtype!r}: use float32, bfloat16, float16 or 'auto'.")


def _device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"Unknown device {device!r}.") from e


def load_vlm(model: Any, device: Any = None, dtype: Any = None) -> tuple[Any, Any, str]:
    """Resolve ``model`` (zoo name | local directory | HF id | ``(model, processor)``) to (model, processor, name)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if isinstance(model, (tuple, list)) and len(model) == 2:
        m, p = model
        name = getattr(m.config, "_name_or_path", "") or type(m).__name__
        dt = _dtype(dtype)
        if device is not None or isinstance(dt, torch.dtype):
            m = m.to(device=_device(device) if device is not None else m.device, dtype=dt if isinstance(dt, torch.dtype) else None)
        return m.eval(), p, name
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError("model must be a zoo name, a local directory, a Hugging Face id or a (model, processor) pair.")
    name = str(model)
    path: str | Path = zoo.zoo_path(name) if zoo.is_zoo_name(name) else name
    dev = _device(device)
    try:
        m = AutoModelForImageTextToText.from_pretrained(path, dtype=_dtype(dtype) or torch.float32)
        p = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        hint = "" if Path(name).exists() else (
            f" It is not a zoo model ({', '.join(zoo.MODELS)}) nor a local directory, and loading it as a hub id "
            "failed (no network here? set HF_HUB_OFFLINE=1 and use a local copy)."
        )
        raise UnsupportedModelError(f"Could not load {name!r}: {e}.{hint}") from e
    return m.to(dev).eval(), p, name


def _argen_kind(path: str | Path) -> str:
    """``llamagen`` (mmfast's own format), or the transformers ``model_type`` of a checkpoint."""
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        import json

        data = json.loads(cfg.read_text())
        return str(data.get("architecture") or data.get("model_type") or "")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path)).model_type
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"Could not load {str(path)!r}: {e}") from e


def load_argen(model: Any, device: Any = None, dtype: Any = None) -> tuple[Any, str]:
    """Resolve ``model`` (zoo name | directory | HF id | ready adapter) to an ARGenAdapter."""
    from mmfast.models.argen import ARGenAdapter

    if isinstance(model, ARGenAdapter):
        return model, type(model).__name__
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError("model must be a zoo name, a directory, a Hugging Face id or an ARGenAdapter.")
    name = str(model)
    path: str | Path = zoo.zoo_path(name) if zoo.is_zoo_name(name) else name
    kind = _argen_kind(path)
    if kind not in ARGEN_ADAPTERS:
        raise UnsupportedModelError(
            f"{name!r} is a {kind or 'unknown'} model; image generation supports {', '.join(ARGEN_ADAPTERS)}."
        )
    adapter_cls = load_class(ARGEN_ADAPTERS[kind])
    return adapter_cls.from_pretrained(path, device=_device(device), dtype=_dtype(dtype)), name


def pipeline(
    task: str,
    model: Any = None,
    accelerate: Any = None,
    device: Any = None,
    dtype: Any = None,
    **kwargs: Any,
) -> VLMPipeline:
    """Build a pipeline.

    Args:
        task: ``"image-qa"``, ``"image-caption"``, ``"video-qa"``, ``"class-to-image"`` or ``"text-to-image"``.
        model: zoo name (default: the task's embedded model), local directory, HF id, or ``(model, processor)``.
        accelerate: ``None``, a spec string such as ``"pool(factor=2)+kv_window(sink=4,recent=64)"``, an
            accelerator object, or a list of them.
        device: e.g. ``"cpu"`` / ``"cuda"``; default CUDA when available.
        dtype: model dtype (``"float32"`` default on load, ``"bfloat16"``...).
        **kwargs: pipeline defaults, e.g. ``question=`` or ``num_frames=``.
    """
    if task not in TASKS:
        raise ConfigError(f"Unknown task {task!r}. Tasks: {', '.join(TASKS)}.")
    acc = resolve(accelerate)
    if task in GEN_TASKS:
        gen_adapter, name = load_argen(model if model is not None else DEFAULT_MODELS[task], device=device, dtype=dtype)
        for a in acc:
            a.check_compatible(gen_adapter)
        return TASKS[task](gen_adapter, acc, model_name=name, **kwargs)
    if task != "streaming-video-qa":
        for a in acc:
            if Stage.STREAM in getattr(a, "stages", ()):
                raise IncompatibleAcceleratorError(
                    f"{a.spec()} acts on a video stream: use it with pipeline('streaming-video-qa', ...), not {task!r}.")
    m, p, name = load_vlm(model if model is not None else DEFAULT_MODELS[task], device=device, dtype=dtype)
    adapter = adapter_for(m, p)
    for a in acc:
        a.check_compatible(adapter)
    if task in ("video-qa", "streaming-video-qa") and not adapter.supports_video:
        raise UnsupportedModelError(f"{name} ({type(m).__name__}) does not take videos.")
    return TASKS[task](adapter, acc, model_name=name, **kwargs)
