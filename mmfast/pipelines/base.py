"""Shared machinery of the VLM pipelines: input normalisation, batching with a progress bar, stats."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from tqdm.auto import tqdm

from mmfast.accel.spec import Composed
from mmfast.errors import InvalidInputError
from mmfast.models.vlm import VLMAdapter


class VLMPipeline:
    """Base of ``image-qa``, ``image-caption`` and ``video-qa``.

    Call with keyword inputs for one example (returns a dict) or with a list of dicts / a list in one of the
    keyword inputs for many (returns a list, with a tqdm bar). Generation kwargs (``max_new_tokens``,
    ``min_new_tokens``, ``do_sample``, ...) go to ``model.generate``; decoding is greedy by default.
    ``answer_from_kv=True`` makes KV methods compress the prompt's cache before the generation prompt is fed, so
    even the first answer token is read from the compressed cache (how the quality benchmarks score KV methods).
    """

    task: ClassVar[str] = ""
    media_key: ClassVar[str] = "image"

    def __init__(self, adapter: VLMAdapter, accelerate: Composed, model_name: str = "", **defaults: Any):
        self.adapter = adapter
        self.accelerate = accelerate
        self.model_name = model_name
        self.defaults = defaults
        self._progress: dict[str, Any] = {}

    # diffusers-style progress bar control
    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self._progress = kwargs

    @property
    def model(self) -> Any:
        return self.adapter.model

    @property
    def processor(self) -> Any:
        return self.adapter.processor

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, model={self.model_name!r}, accelerate={self.accelerate.spec()!r})"

    def _is_batch(self, inputs: Any, kw: dict[str, Any]) -> bool:
        raise NotImplementedError

    def __call__(self, inputs: Any = None, **kwargs: Any) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(inputs, dict):
            return self._one({**inputs, **kwargs})
        if inputs is not None and isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
            records = list(inputs)
            if not all(isinstance(r, dict) for r in records):
                raise InvalidInputError(
                    f"{self.task}: pass keyword inputs, or a list of dicts such as "
                    f"[{{'{self.media_key}': ..., 'question': ...}}]."
                )
            return self._many([{**r, **kwargs} for r in records])
        if inputs is not None:
            kwargs.setdefault(self.media_key, inputs)
        batch = self._split_batch(kwargs)
        return self._many(batch) if batch is not None else self._one(kwargs)

    def _split_batch(self, kw: dict[str, Any]) -> list[dict[str, Any]] | None:
        """If the media / question arguments are lists of examples, split them into one dict per example."""
        media = kw.get(self.media_key)
        question = kw.get("question")
        n = None
        if self._is_media_list(media):
            n = len(media)
        if isinstance(question, (list, tuple)):
            if n is not None and len(question) != n:
                raise InvalidInputError(f"Got {n} {self.media_key}s but {len(question)} questions.")
            n = len(question)
        if n is None:
            return None
        out = []
        for i in range(n):
            item = dict(kw)
            if self._is_media_list(media):
                item[self.media_key] = media[i]
            if isinstance(question, (list, tuple)):
                item["question"] = question[i]
            out.append(item)
        return out

    def _is_media_list(self, media: Any) -> bool:
        return isinstance(media, (list, tuple))

    def _many(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        cfg = {"desc": self.task, "disable": len(records) < 2, **self._progress}
        return [self._one(r) for r in tqdm(records, **cfg)]

    def _one(self, kw: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _answer(self, inputs: Any, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        with self.accelerate(self.adapter):
            result = self.adapter.generate(inputs, **gen_kwargs)
        stats = {"method": self.accelerate.spec(), **result.stats, **self.accelerate.extra_stats()}
        return {"answer": result.text, "stats": stats}

    @staticmethod
    def _question(kw: dict[str, Any], default: str | None = None) -> str:
        q = kw.pop("question", None)
        if q is None:
            q = default
        if not isinstance(q, str) or not q.strip():
            raise InvalidInputError("A non-empty question string is required (question='...').")
        return q
