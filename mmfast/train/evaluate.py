"""Held-out accuracy of a VLM pipeline on mmfast's synthetic image and video questions (tiny-vlm's yardstick).

Everything goes through the real pipeline path (``pipe(image=..., question=...)`` / ``pipe(video=...)``: chat
template, processor, the pipeline's accelerators, greedy ``generate``), so the numbers are what a user of
``mmfast.pipeline(...)`` gets, with or without an ``accelerate=`` method. Answers are exact matches after
``.strip()``. Samples come from :mod:`mmfast.train.data` (held-out photos and seeds, objects off the patch grid).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mmfast.errors import ConfigError
from mmfast.pipelines.base import VLMPipeline
from mmfast.pipelines.image_qa import ImageQAPipeline
from mmfast.pipelines.video_qa import VideoQAPipeline
from mmfast.train import data as D

__all__ = ["evaluate_vlm", "format_report"]


def _pipes(pipe: VLMPipeline) -> tuple[ImageQAPipeline, VideoQAPipeline | None]:
    """An image-qa and a video-qa pipeline sharing ``pipe``'s model, processor and accelerators."""
    img = pipe if type(pipe) is ImageQAPipeline else ImageQAPipeline(pipe.adapter, pipe.accelerate, pipe.model_name)
    if type(pipe) is VideoQAPipeline:
        vid: VideoQAPipeline | None = pipe
    elif pipe.adapter.supports_video:
        vid = VideoQAPipeline(pipe.adapter, pipe.accelerate, pipe.model_name)
    else:
        vid = None
    return img, vid


def _control(control: str | None, pixels: np.ndarray, other: Callable[[], np.ndarray]) -> np.ndarray:
    if control == "blank":
        return np.full_like(pixels, 128)
    if control == "shuffled":
        return other()
    return pixels


def _score(hits: dict[str, list[bool]]) -> dict[str, float]:
    out = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    allv = [x for v in hits.values() for x in v]
    out["overall"] = sum(allv) / len(allv) if allv else float("nan")
    return out


def evaluate_vlm(
    pipe: VLMPipeline,
    split: str = "heldout",
    n_images: int = 1000,
    n_clips: int = 500,
    seed: int = 0,
    num_frames: int = 16,
    hold: int = 1,
    max_new_tokens: int = 4,
    progress: bool = True,
    qtypes: Sequence[str] | None = None,
    control: str | None = None,
    answer_from_kv: bool = True,
) -> dict[str, Any]:
    """Exact-match accuracy per question type on ``n_images`` images and ``n_clips`` clips of ``(split, seed)``.

    Args:
        pipe: an ``image-qa`` / ``video-qa`` / ``image-caption`` pipeline; the other modality is evaluated with a
            pipeline sharing its model and accelerators (videos are skipped for image-only models).
        split, seed: the data stream (:func:`mmfast.train.data.image_dataset`); ``"heldout"`` for reported numbers.
        num_frames: frames per clip (8-32), all passed to the model (the pipeline samples ``num_frames`` of them).
        hold: show each frame ``hold`` times in a row: a long video of ``num_frames * hold`` frames with the same
            events and answers (the temporal redundancy of a long recording at a high frame rate).
        max_new_tokens: answers are one or two words + end of turn.
        qtypes: restrict to these question types (default: all).
        control: a sanity control that hides the right image: ``"blank"`` (mid-grey images / clips) or
            ``"shuffled"`` (each question is asked about the next sample's image / clip). A model that reads the
            image then falls to about the majority baseline.
        answer_from_kv: with a KV method attached, compress the prompt's cache *before* the chat template's
            generation prompt is fed, so the answer (one or two words) is read from the compressed cache; otherwise
            the first answer token comes from the full-precision prefill and KV compression could not change it.

    Returns:
        ``{"image": {qtype: acc, ..., "overall": acc}, "video": {...}, "majority": {"image": {...}, "video":
        {...}}, "n": {"image": questions, "video": questions}, "by_objects": {"image": {"3": [acc, questions],
        ...}, "video": {...}}, "seconds": wall time}`` (``by_objects``: accuracy by the number of objects in the
        scene / clip); a modality with no samples is left out.
    """
    if n_images < 0 or n_clips < 0:
        raise ConfigError(f"n_images and n_clips must be >= 0, got {n_images}, {n_clips}")
    if not isinstance(hold, int) or hold < 1:
        raise ConfigError(f"hold must be an integer >= 1, got {hold!r}")
    if control not in (None, "blank", "shuffled"):
        raise ConfigError(f"control must be None, 'blank' or 'shuffled', got {control!r}")
    img_pipe, vid_pipe = _pipes(pipe)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"majority": {}, "n": {}, "by_objects": {}}
    gen = {"max_new_tokens": max_new_tokens, "answer_from_kv": answer_from_kv}

    def keep(qa: D.QA) -> bool:
        return qtypes is None or qa.qtype in qtypes

    if n_images:
        hits: dict[str, list[bool]] = {}
        by_n: dict[int, list[bool]] = {}
        qas: list[D.QA] = []
        for i in tqdm(range(n_images), desc="image-qa eval", disable=not progress):
            s = D.image_sample(split, seed, i)
            image = _control(control, s.image, lambda i=i: D.image_sample(split, seed, i + 1).image)
            for qa in filter(keep, s.questions):
                out = img_pipe(image=image, question=qa.question, **gen)
                ok = out["answer"].strip() == qa.answer
                hits.setdefault(qa.qtype, []).append(ok)
                by_n.setdefault(len(s.scene.objects), []).append(ok)
                qas.append(qa)
        res["image"] = _score(hits)
        res["by_objects"]["image"] = _by_count(by_n)
        res["majority"]["image"] = D.majority_baseline(qas)
        res["n"]["image"] = len(qas)
    if n_clips and vid_pipe is not None:
        hits, by_n, qas = {}, {}, []
        for i in tqdm(range(n_clips), desc="video-qa eval", disable=not progress):
            c = D.clip_sample(split, seed, i, num_frames=num_frames)
            frames = _control(control, c.frames,
                              lambda i=i: D.clip_sample(split, seed, i + 1, num_frames=num_frames).frames)
            if hold > 1:
                frames = np.repeat(np.asarray(frames), hold, axis=0)
            for qa in filter(keep, c.questions):
                out = vid_pipe(video=frames, question=qa.question, num_frames=num_frames * hold, **gen)
                ok = out["answer"].strip() == qa.answer
                hits.setdefault(qa.qtype, []).append(ok)
                by_n.setdefault(len(c.clip.tracks), []).append(ok)
                qas.append(qa)
        res["video"] = _score(hits)
        res["by_objects"]["video"] = _by_count(by_n)
        res["majority"]["video"] = D.majority_baseline(qas)
        res["n"]["video"] = len(qas)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def _by_count(hits: dict[int, list[bool]]) -> dict[str, list[float]]:
    """``{"n_objects": [accuracy, questions]}``, sorted by object count."""
    return {str(k): [sum(v) / len(v), len(v)] for k, v in sorted(hits.items())}


def format_report(res: dict[str, Any], title: str = "") -> str:
    """A plain-text table: accuracy and majority baseline per question type, for images and videos."""
    lines = [title] if title else []
    for mod in ("image", "video"):
        if mod not in res:
            continue
        maj = res.get("majority", {}).get(mod, {})
        n = res.get("n", {}).get(mod, "?")
        lines.append(f"{mod} QA ({n} questions)")
        lines.append(f"  {'type':10s} {'accuracy':>9s} {'majority':>9s}")
        for qt, acc in res[mod].items():
            m = maj.get(qt, float("nan"))
            lines.append(f"  {qt:10s} {acc:9.3f} {m:9.3f}")
        by_n = res.get("by_objects", {}).get(mod)
        if by_n:  # binding: one object is easy, several need each attribute tied to the right object
            lines.append("  by number of objects: " + ", ".join(f"{k}: {a:.2f} ({q})" for k, (a, q) in by_n.items()))
    return "\n".join(lines)
