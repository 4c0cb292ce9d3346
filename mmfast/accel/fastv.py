"""FastV: drop the visual tokens the prompt stops looking at after an early LM layer.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", ECCV 2024, arXiv 2403.06764 (code: pkunlp-icler/FastV).

The first ``k`` decoder layers read the whole prompt. The attention of layer ``k`` (1-based; index ``k - 1``)
from the last prompt token, averaged over heads, ranks the visual tokens,

    a_j = mean_h softmax(q_last^h K^h^T / sqrt(d))_j          for visual tokens j,

and only the top ``round(keep * #visual)`` of them go on (with every text token) into layers ``k`` and later, at
their original positions (their RoPE angles do not change). Pruning happens once, at prefill; decoding reads
the pruned cache of those layers. Defaults ``k=2`` as the paper; ``keep=0.25`` is mmfast's canonical operating
point (the paper's default drops R = 50%, i.e. ``keep=0.5``).

Departures from the reference: the score comes from the shared probe path (``ctx.attention`` recomputes the one
query row of layer ``k - 1`` from its input, so every layer keeps sdpa / flash attention; the reference makes
layer ``k - 1`` eager and reads its attention weights); visual tokens are the adapter's spans (every image /
frame of the prompt, layout newlines included) instead of a hard-coded start index and length of 576; the kept
count is rounded (the reference truncates ``int(n * (1 - R))``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmfast.accel.base import PrefillAccelerator, register
from mmfast.errors import ConfigError, IncompatibleAcceleratorError


@register
@dataclass
class FastV(PrefillAccelerator):
    """FastV: after LM layer ``k``, keep the ``keep`` fraction of visual tokens the last prompt token attends to."""

    name = "fastv"
    k: int = 2
    keep: float = 0.25

    def validate(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"fastv: k must be an integer >= 1 (layers that see every token), got {self.k!r}.")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ConfigError(f"fastv: keep must be a fraction in (0, 1], got {self.keep!r}.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._scores: torch.Tensor | None = None
        self._kept: int | None = None

    def check_compatible(self, adapter: Any) -> None:
        super().check_compatible(adapter)
        if self.k >= adapter.num_layers:
            raise IncompatibleAcceleratorError(
                f"fastv(k={self.k}) keeps every token for the first {self.k} decoder layers and prunes after; "
                f"{type(adapter.model).__name__} has {adapter.num_layers} decoder layers: use k < {adapter.num_layers}."
            )

    def layers(self, num_layers: int) -> tuple[int, ...]:
        return () if self.keep >= 1 else (self.k - 1, self.k)  # score in layer k - 1, prune before layer k

    def on_layer(self, ctx: Any) -> None:
        if ctx.layer == self.k - 1:  # score: the last prompt token's attention, heads averaged (batch size 1)
            last = torch.tensor([ctx.num_tokens - 1])
            self._scores = ctx.attention(last, per_head=True)[0].mean(0)
            return
        visual = ctx.visual.nonzero().flatten()
        n_keep = max(1, round(self.keep * visual.numel())) if visual.numel() else 0
        top = visual[self._scores[visual].topk(n_keep).indices] if n_keep else visual
        ctx.keep(torch.cat([(~ctx.visual).nonzero().flatten(), top]))
        self._kept = int(n_keep)

    def extra_stats(self) -> dict[str, Any]:
        """``visual_tokens_late``: visual tokens the layers from ``k`` on read (the vision stage's count is the
        prompt's)."""
        return {} if self._kept is None else {"visual_tokens_late": self._kept}
