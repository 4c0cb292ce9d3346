"""Pipeline output dataclasses (diffusers style: attributes, or a tuple with ``return_dict=False``)."""

from __future__ import annotations

from dataclasses import astuple, dataclass, field
from typing import Any

import torch
from PIL import Image


@dataclass
class ImageGenOutput:
    """Output of ``class-to-image`` / ``text-to-image``.

    Attributes:
        images: one PIL image per generated sample (empty with ``output_type="tokens"``).
        tokens: (B, N) image token ids in raster order.
        stats: ``steps`` (model forwards incl. the prefill), ``tokens``, ``step_compression`` (tokens / steps),
            ``wall_ms`` (decode, without the VQ decode), ``decode_image_ms`` and ``method``.
    """

    images: list[Image.Image]
    tokens: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)

    def to_tuple(self) -> tuple[Any, ...]:
        return astuple(self)

    def __getitem__(self, i: int) -> Any:
        return self.to_tuple()[i]
