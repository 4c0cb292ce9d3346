"""``class-to-image`` and ``text-to-image`` pipelines over an :class:`~mmfast.models.argen.ARGenAdapter`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from mmfast.accel.spec import Composed
from mmfast.decoding import DecodeResult, ar_decode, scale_decode
from mmfast.errors import InvalidInputError
from mmfast.models.argen import ARGenAdapter, Sampling
from mmfast.pipelines.outputs import ImageGenOutput
from mmfast.types import Stage


class ImageGenPipeline:
    """``gen(labels=[3, 7] | prompt="digit 7", seed=0, guidance_scale=..., temperature=1.0, top_k=0, top_p=1.0)``.

    Returns :class:`ImageGenOutput` (or a tuple with ``return_dict=False``). ``num_images_per_condition``
    repeats each condition; ``callback_on_step_end(pipe, step, None, {"tokens": tokens_so_far})`` runs after every
    decoding step (set ``pipe._interrupt = True`` to stop early); ``output_type="tokens"`` skips the VQ decode.
    Unset sampling arguments take the model's recommended values.
    """

    task: ClassVar[str] = "class-to-image"
    condition_key: ClassVar[str] = "labels"

    def __init__(self, adapter: ARGenAdapter, accelerate: Composed, model_name: str = "", **defaults: Any):
        self.adapter = adapter
        self.accelerate = accelerate
        self.model_name = model_name
        self.defaults = defaults
        self._progress: dict[str, Any] = {}
        self._interrupt = False

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self._progress = kwargs

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, model={self.model_name!r}, accelerate={self.accelerate.spec()!r})"

    def _sampling(self, **given: Any) -> Sampling:
        rec = dict(getattr(self.adapter, "recommended", {}) or {})
        rec.update({k: v for k, v in self.defaults.items() if k in ("guidance_scale", "temperature", "top_k", "top_p")})
        rec.update({k: v for k, v in given.items() if v is not None})
        return Sampling(**{k: rec[k] for k in ("guidance_scale", "temperature", "top_k", "top_p") if k in rec})

    def __call__(
        self,
        conditions: Any = None,
        *,
        labels: Any = None,
        prompt: Any = None,
        num_images_per_condition: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        progress: bool = True,
        return_dict: bool = True,
    ) -> ImageGenOutput | tuple[Any, ...]:
        given = conditions if conditions is not None else (labels if labels is not None else prompt)
        conds = self.adapter.parse_conditions(given)
        if not isinstance(num_images_per_condition, int) or num_images_per_condition < 1:
            raise InvalidInputError("num_images_per_condition must be a positive integer.")
        conds = [c for c in conds for _ in range(num_images_per_condition)]
        if output_type not in ("pil", "tokens"):
            raise InvalidInputError("output_type must be 'pil' or 'tokens'.")
        sampling = self._sampling(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InvalidInputError(f"seed must be an integer >= 0, got {seed!r}.")
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        self._interrupt = False

        def on_step(step: int, tokens: torch.Tensor) -> bool:
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, None, {"tokens": tokens})
            return not self._interrupt

        decoder = next((a for a in self.accelerate if Stage.DECODE in a.stages), None)
        progress_cfg: Any = {**({"disable": not progress}), **self._progress}
        size = len(conds) if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidInputError("batch_size must be a positive integer.")
        chunks, stats = [], {"steps": 0.0, "wall_ms": 0.0}
        with self.accelerate(self.adapter):
            for start in range(0, len(conds), size):  # speculative decoders commit min-over-rows: small batches go further
                part = conds[start : start + size]
                if decoder is None:
                    loop = scale_decode if getattr(self.adapter, "order", "raster") == "scales" else ar_decode
                    res = loop(self.adapter, part, sampling, generator, callback=on_step, progress=progress_cfg)
                else:
                    res = decoder.decode(self.adapter, part, sampling, generator, callback=on_step, progress=progress_cfg)
                chunks.append(res.tokens)
                stats["steps"] += res.steps * len(part) / len(conds)  # mean forwards per image
                stats["wall_ms"] += res.stats["wall_ms"]
                stats.update({k: v for k, v in res.stats.items() if k not in ("steps", "wall_ms")})
                if self._interrupt:
                    break
        res = DecodeResult(tokens=torch.cat(chunks), steps=round(stats["steps"]), stats=stats)
        stats = {"method": self.accelerate.spec(), "batch_size": size, **res.stats}
        stats["step_compression"] = stats["tokens"] / max(stats["steps"], 1)
        images = []
        if output_type == "pil":
            t0 = time.perf_counter()
            images = self.adapter.decode(res.tokens)
            stats["decode_image_ms"] = (time.perf_counter() - t0) * 1e3
        out = ImageGenOutput(images=images, tokens=res.tokens, stats=stats)
        return out if return_dict else out.to_tuple()


class TextToImagePipeline(ImageGenPipeline):
    """``gen(prompt="digit 7" | [...], seed=0, ...)``: text-conditional generation (prompts parsed by the adapter)."""

    task = "text-to-image"
    condition_key = "prompt"


def image_grid(images: list[Any], cols: int, scale: int = 1, pad: int = 2) -> Any:
    """Tile PIL images (same size) into one image, column-major per condition when ``cols`` = #conditions."""
    from PIL import Image

    if not images:
        raise InvalidInputError("No images to tile.")
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img.resize((w, h), Image.NEAREST), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
