"""Batch workers: :class:`JobSpec` (what to build, plain values a Ray actor can receive) and :class:`Worker`
(builds the pipeline once, turns items into records; a bad item becomes an error record, never an exception).
Both engines (local and Ray) run the same worker, so records do not depend on the engine."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfast.batch.inputs import Item
from mmfast.errors import InvalidInputError, MMFastError

logger = logging.getLogger(__name__)

#: the pipeline task behind each batch task (qa picks video-qa for video items)
PIPELINE_TASKS = {"caption": "image-caption", "qa": "image-qa", "generate": "class-to-image"}


@dataclass
class JobSpec:
    """What a worker needs to build its pipeline and answer items (plain values: sent to Ray actors as is).

    ``gen_kwargs``: VLM generation kwargs (``max_new_tokens``, ...), or for ``generate`` the sampling arguments
    (``guidance_scale``, ``temperature``, ``top_k``, ``top_p``). ``images_dir``: where ``generate`` writes PNGs;
    ``answer_root``: the folder image paths in records are relative to.
    """

    task: str
    model: str | None = None
    accelerate: str | None = None
    question: str | None = None
    prompt: str | None = None
    batch_size: int = 1
    num_frames: int | None = None
    fps: float | None = None
    seed: int = 0
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    images_dir: str | None = None
    answer_root: str | None = None


def item_seed(base: int, item_id: str) -> int:
    """The seed of a ``generate`` item without its own: a hash of (job seed, id), so an image depends only on its
    id, never on the order, the chunking or where a previous run stopped."""
    return int.from_bytes(hashlib.sha256(f"{base}:{item_id}".encode()).digest()[:4], "big")


def image_name(item_id: str) -> str:
    """File name of a generated image: the id made file-safe, plus a hash so different ids never collide."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id).strip("._")[:80] or "item"
    return f"{safe}-{hashlib.sha1(item_id.encode()).hexdigest()[:8]}.png"


class Worker:
    """Builds the job's pipeline(s) once and turns items into records.

    ``process(items)`` never raises for a bad item: media that cannot be read, a missing question or a condition
    the model rejects becomes ``status="error"`` with the typed error (``error.type`` / ``error.message``). Other
    exceptions (not :class:`~mmfast.errors.MMFastError`) also become error records, logged with their traceback.
    """

    def __init__(self, spec: JobSpec):
        import mmfast

        self.spec = spec
        task = PIPELINE_TASKS[spec.task]
        self.pipe = mmfast.pipeline(task, model=spec.model, accelerate=spec.accelerate, device=spec.device,
                                    dtype=spec.dtype)
        self.video_pipe = None
        if spec.task == "qa" and self.pipe.adapter.supports_video:
            self.video_pipe = mmfast.pipeline("video-qa", model=(self.pipe.model, self.pipe.processor),
                                              accelerate=spec.accelerate)
        self.model_name = self.pipe.model_name
        self.method = self.pipe.accelerate.spec()
        self.kv_per_token = 0 if spec.task == "generate" else _kv_bytes_per_token(self.pipe.adapter)

    # ---- records --------------------------------------------------------------------------------
    def _record(self, item: Item, question: str | None, **fields: Any) -> dict[str, Any]:
        return {"id": item.id, "task": self.spec.task, "source": item.source, "status": "ok", "answer": None,
                "question": question, "error": None, "model": self.model_name, "accelerate": self.method,
                "stats": {}, **fields}

    def _error(self, item: Item, question: str | None, exc: BaseException) -> dict[str, Any]:
        if not isinstance(exc, MMFastError):
            logger.warning("%s: unexpected %s\n%s", item.id, type(exc).__name__,
                           "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return self._record(item, question, status="error",
                            error={"type": type(exc).__name__, "message": str(exc)})

    def _ok(self, item: Item, question: str | None, out: dict[str, Any]) -> dict[str, Any]:
        stats = dict(out["stats"])
        if self.spec.accelerate and self.kv_per_token and "prompt_tokens" in stats:
            base_tokens = stats["prompt_tokens"] + stats.get("visual_tokens_in", 0) - stats.get("visual_tokens_kept", 0)
            stats["kv_bytes_baseline"] = base_tokens * self.kv_per_token
        return self._record(item, question, answer=out["answer"], stats=stats)

    # ---- processing -----------------------------------------------------------------------------
    def process(self, items: Sequence[Item]) -> list[dict[str, Any]]:
        """One record per item, in order."""
        if self.spec.task == "generate":
            return [self._generate(it) for it in items]
        records: dict[int, dict[str, Any]] = {}
        groups: dict[str, list[tuple[int, Any]]] = {"image": [], "video": []}
        questions: dict[int, str | None] = {}
        for i, it in enumerate(items):
            question = it.question or (self.spec.question if self.spec.task == "qa" else self.spec.prompt)
            questions[i] = question
            try:
                pipe, kw = self._inputs(it, question)
                groups["video" if pipe is self.video_pipe else "image"].append((i, pipe.prepare(kw)))
            except Exception as e:  # noqa: BLE001 - a bad item is a record, not a crash
                records[i] = self._error(it, question, e)
        for kind, group in groups.items():
            if not group:
                continue
            pipe = self.video_pipe if kind == "video" else self.pipe
            try:
                outs = pipe.run_prepared([p for _, p in group], batch_size=self.spec.batch_size)
            except Exception:  # noqa: BLE001 - isolate the failing item: redo the group one at a time
                outs = None
            for n, (i, prepared) in enumerate(group):
                try:
                    out = outs[n] if outs is not None else pipe.run_prepared([prepared])[0]
                    records[i] = self._ok(items[i], questions[i], out)
                except Exception as e:  # noqa: BLE001
                    records[i] = self._error(items[i], questions[i], e)
        return [records[i] for i in range(len(items))]

    def _inputs(self, item: Item, question: str | None) -> tuple[Any, dict[str, Any]]:
        media = item.media if item.media is not None else item.source
        kw: dict[str, Any] = dict(self.spec.gen_kwargs)
        if item.kind == "video":
            if self.video_pipe is None:
                what = "captioning takes images" if self.spec.task == "caption" else f"{self.model_name} takes no videos"
                raise InvalidInputError(f"{item.source!r} is a video; {what}.")
            if self.spec.fps is not None:
                kw["fps"] = self.spec.fps
            elif self.spec.num_frames is not None:
                kw["num_frames"] = self.spec.num_frames
            return self.video_pipe, {**kw, "video": media, "question": question}
        if self.spec.task == "caption":
            return self.pipe, {**kw, "image": media, "prompt": question}
        return self.pipe, {**kw, "image": media, "question": question}

    def _generate(self, item: Item) -> dict[str, Any]:
        import torch

        try:
            seed = item.seed if item.seed is not None else item_seed(self.spec.seed, item.id)
            res = self.pipe([item.condition], generator=torch.Generator().manual_seed(seed), progress=False,
                            **self.spec.gen_kwargs)
            folder = Path(self.spec.images_dir or ".")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / image_name(item.id)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            res.images[0].save(tmp, format="PNG")
            os.replace(tmp, path)  # a record never points at a half-written image
            answer = os.path.relpath(path, self.spec.answer_root or ".")
            stats = {**res.stats, "seed": seed}
            return self._record(item, None, answer=answer, stats=stats)
        except Exception as e:  # noqa: BLE001
            return self._error(item, None, e)


def _kv_bytes_per_token(adapter: Any) -> int:
    """Bytes one prompt token takes in the unaccelerated KV cache (keys + values of every layer)."""
    import torch

    cfg = adapter.text_config
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
    dtype = next(adapter.model.parameters()).dtype
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
