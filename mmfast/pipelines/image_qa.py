"""``image-qa`` and ``image-caption`` pipelines."""

from __future__ import annotations

from typing import Any

from mmfast.media import load_image
from mmfast.pipelines.base import Prepared, VLMPipeline

DEFAULT_CAPTION_PROMPT = "Describe the image."


class ImageQAPipeline(VLMPipeline):
    """``pipe(image=..., question=..., max_new_tokens=32) -> {"answer": str, "stats": {...}}``.

    ``image`` is a path, bytes, PIL image or numpy array; a list of them makes a batch (a list out). Several
    images for one question: pass ``images=[...]``.
    """

    task = "image-qa"
    media_key = "image"

    def prepare(self, kw: dict[str, Any]) -> Prepared:
        kw = dict(kw)
        question = self._question(kw, self.defaults.get("question"))
        if "images" in kw:
            images = [load_image(x) for x in kw.pop("images")]
        else:
            images = [load_image(kw.pop("image", None))]
        self._check_images(images)
        return self._checked(self.adapter.preprocess(question, images=images), kw)


class ImageCaptionPipeline(ImageQAPipeline):
    """``pipe(image=...) -> {"caption": str, "answer": str, "stats": {...}}``; ``prompt=`` overrides the
    instruction (default: the model's ``mmfast_caption_prompt`` config entry, else "Describe the image.")."""

    task = "image-caption"

    def prepare(self, kw: dict[str, Any]) -> Prepared:
        kw = dict(kw)
        prompt = kw.pop("prompt", None) or kw.pop("question", None) or self.defaults.get("prompt")
        prompt = prompt or getattr(self.adapter.config, "mmfast_caption_prompt", None) or DEFAULT_CAPTION_PROMPT
        return super().prepare({**kw, "question": prompt})

    def _finish(self, prepared: Prepared, out: dict[str, Any]) -> dict[str, Any]:
        out = super()._finish(prepared, out)
        return {"caption": out["answer"], **out}
