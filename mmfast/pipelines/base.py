"""Shared machinery of the VLM pipelines: input normalisation, batching with a progress bar, stats."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tqdm.auto import tqdm

from mmfast.accel.spec import Composed
from mmfast.errors import InvalidInputError
from mmfast.models.vlm import VLMAdapter

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One example ready for the model: processor outputs (batch size 1), its generation kwargs, and stats the
    pipeline adds to the answer's (e.g. the sampled frames of a video)."""

    inputs: Any
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def check_generation_kwargs(kw: dict[str, Any]) -> None:
    """Typed errors for token-count arguments ``generate`` would reject with a bare ``ValueError``."""
    for key in ("max_new_tokens", "min_new_tokens"):
        v = kw.get(key)
        if v is None:
            continue
        lo = 1 if key == "max_new_tokens" else 0
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InvalidInputError(f"{key} must be an integer >= {lo}, got {v!r}.")
    if isinstance(kw.get("max_new_tokens"), int) and (kw.get("min_new_tokens") or 0) > kw["max_new_tokens"]:
        raise InvalidInputError(f"min_new_tokens ({kw['min_new_tokens']}) exceeds max_new_tokens ({kw['max_new_tokens']}).")


def check_question(q: Any) -> str:
    """The question as a non-empty ``str`` that encodes to UTF-8 (lone surrogates, e.g. from undecodable command-line
    bytes, would fail inside the tokenizer). Control characters are passed to the tokenizer unchanged."""
    if isinstance(q, (bytes, bytearray)):
        try:
            q = bytes(q).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInputError(f"The question bytes are not UTF-8 ({e.reason} at byte {e.start}); decode them "
                                    "to a str first.") from e
    if not isinstance(q, str) or not q.strip():
        raise InvalidInputError("A non-empty question string is required (question='...').")
    try:
        q.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"The question holds characters that are not valid UTF-8 (position {e.start}); "
                                "pass text decoded as UTF-8.") from e
    return q


def check_context(adapter: VLMAdapter, prompt_tokens: int, max_new_tokens: int | None, what: str = "the prompt") -> None:
    """Typed error when ``prompt_tokens + max_new_tokens`` exceeds the model's context (checked on the prompt as the
    processor built it, before any visual-token reduction: reduced tokens keep their original positions)."""
    ctx = adapter.context_length
    need = prompt_tokens + (max_new_tokens or 32)
    if ctx is not None and need > ctx:
        raise InvalidInputError(
            f"{what} is {prompt_tokens} tokens and up to {max_new_tokens or 32} new tokens were asked for: {need} > the "
            f"model's context of {ctx} tokens. Shorten the question, use fewer video frames (num_frames=...) or a "
            "smaller image, or lower max_new_tokens.")


class VLMPipeline:
    """Base of ``image-qa``, ``image-caption`` and ``video-qa``.

    Call with keyword inputs for one example (returns a dict) or with a list of dicts / a list in one of the
    keyword inputs for many (returns a list, with a tqdm bar). Generation kwargs (``max_new_tokens``,
    ``min_new_tokens``, ``do_sample``, ...) go to ``model.generate``; decoding is greedy by default.
    ``answer_from_kv=True`` makes KV methods compress the prompt's cache before the generation prompt is fed, so
    even the first answer token is read from the compressed cache (how the quality benchmarks score KV methods).

    ``batch_size=N`` (with a list of examples) answers N prompts per ``generate`` call, left-padded; greedy answers
    equal ``batch_size=1``'s. Accelerators that act inside the decoder or the KV cache (prefill / KV methods) run
    one prompt at a time instead, and a log line says so.
    """

    task: ClassVar[str] = ""
    media_key: ClassVar[str] = "image"

    def __init__(self, adapter: VLMAdapter, accelerate: Composed, model_name: str = "", **defaults: Any):
        self.adapter = adapter
        self.accelerate = accelerate
        self.model_name = model_name
        self.defaults = defaults
        self._progress: dict[str, Any] = {}
        self._told: set[str] = set()  # reasons already logged for answering one prompt at a time

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
        check_generation_kwargs({**self.defaults, **kwargs})
        batch_size = kwargs.pop("batch_size", self.defaults.get("batch_size", 1))
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(inputs, dict):
            return self._one({**inputs, **kwargs})
        if inputs is not None and isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
            records = list(inputs)
            if not all(isinstance(r, dict) for r in records):
                raise InvalidInputError(
                    f"{self.task}: pass keyword inputs, or a list of dicts such as "
                    f"[{{'{self.media_key}': ..., 'question': ...}}]."
                )
            return self._many([{**r, **kwargs} for r in records], batch_size)
        if inputs is not None:
            kwargs.setdefault(self.media_key, inputs)
        batch = self._split_batch(kwargs)
        return self._many(batch, batch_size) if batch is not None else self._one(kwargs)

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

    def _many(self, records: Sequence[dict[str, Any]], size: int = 1) -> list[dict[str, Any]]:
        cfg = {"desc": self.task, "disable": len(records) < 2, "unit": "ex", **self._progress}
        outs: list[dict[str, Any]] = []
        with tqdm(total=len(records), **cfg) as bar:
            for start in range(0, len(records), size):
                chunk = [self.prepare(r) for r in records[start : start + size]]
                outs.extend(self.run_prepared(chunk, batch_size=size))
                bar.update(len(chunk))
        return outs

    def _one(self, kw: dict[str, Any]) -> dict[str, Any]:
        return self.run_prepared([self.prepare(kw)])[0]

    def prepare(self, kw: dict[str, Any]) -> Prepared:
        """Load and check one example's media and question (:class:`~mmfast.errors.InvalidInputError` when they
        are bad) and run the processor; the model is not called yet."""
        raise NotImplementedError

    def _finish(self, prepared: Prepared, out: dict[str, Any]) -> dict[str, Any]:
        out["stats"].update(prepared.stats)
        # an empty answer is a real outcome (the model ended at once), flagged so callers need not guess
        out["stats"]["empty_answer"] = not out["answer"].strip()
        return out

    def _checked(self, inputs: Any, kw: dict[str, Any], stats: dict[str, Any] | None = None) -> Prepared:
        """A :class:`Prepared` after the context check on the processor's ``input_ids``."""
        ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if ids is not None:
            check_context(self.adapter, int(ids.shape[-1]), kw.get("max_new_tokens", self.defaults.get("max_new_tokens")))
        return Prepared(inputs, kw, stats or {})

    def _check_images(self, images: Sequence[Any]) -> None:
        """Typed error for an image smaller than one patch of the vision tower (the model would see nothing)."""
        side = self.adapter.min_image_side
        for im in images:
            w, h = im.size
            if min(w, h) < side:
                raise InvalidInputError(
                    f"The image is {w}x{h} pixels, smaller than one {side}x{side} patch of this model's vision "
                    f"tower: there is nothing to see. Pass an image at least {side} pixels on each side.")

    def run_prepared(self, prepared: Sequence[Prepared], batch_size: int = 1) -> list[dict[str, Any]]:
        """Answer prepared examples, ``batch_size`` prompts per ``generate`` call where the attached methods allow
        it (consecutive examples with the same generation kwargs); outputs in input order."""
        outs: list[dict[str, Any]] = []
        start = 0
        while start < len(prepared):
            kwargs = prepared[start].gen_kwargs
            end = start + 1
            if batch_size > 1 and self._can_batch(kwargs):
                while end < len(prepared) and end - start < batch_size and prepared[end].gen_kwargs == kwargs:
                    end += 1
            group = prepared[start:end]
            if len(group) == 1:
                outs.append(self._answer(group[0].inputs, dict(kwargs)))
            else:
                outs.extend(self._answer_batch([p.inputs for p in group], dict(kwargs)))
            start = end
        return [self._finish(p, o) for p, o in zip(prepared, outs)]

    def _can_batch(self, gen_kwargs: dict[str, Any]) -> bool:
        with self.accelerate(self.adapter):
            reason = self.adapter.batch_blocker(gen_kwargs)
        if reason is not None and reason not in self._told:
            self._told.add(reason)
            logger.warning("%s: answering one prompt at a time (%s).", self.task, reason)
        return reason is None

    def _answer(self, inputs: Any, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        with self.accelerate(self.adapter):
            result = self.adapter.generate(inputs, **gen_kwargs)
        stats = {"method": self.accelerate.spec(), **result.stats, **self.accelerate.extra_stats()}
        return {"answer": result.text, "stats": stats}

    def _answer_batch(self, inputs: list[Any], gen_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        with self.accelerate(self.adapter):
            results = self.adapter.generate_batch(inputs, **gen_kwargs)
            extra = self.accelerate.extra_stats()
        return [{"answer": r.text, "stats": {"method": self.accelerate.spec(), **r.stats, **extra}} for r in results]

    @staticmethod
    def _question(kw: dict[str, Any], default: str | None = None) -> str:
        q = kw.pop("question", None)
        return check_question(default if q is None else q)
