"""The leaf module of shared types: what models (adapters) and accel (methods) both speak.

Nothing here imports another mmfast module except :mod:`mmfast.errors`, so ``mmfast.models`` and ``mmfast.accel``
can both import it without an import cycle (a test walks the package's imports).

* :class:`Stage`: the four places a method acts (vision, prefill, kv, decode);
* :class:`VisualTokens`: the visual tokens of one image / video, in the LLM's input space, with grid coordinates
  and anchors (the vision stage's currency);
* :class:`Span`: where one image or frame sits in the prompt;
* :class:`KVContext`: what a KV-stage policy knows when it compresses one layer's cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Protocol

import torch

from mmfast.errors import UnsupportedModelError


class Stage(IntEnum):
    """Where a method acts, in execution order."""

    VISION = 0  # between the vision tower and the LLM (or inside the ViT)
    PREFILL = 1  # inside decoder layers during prefill
    KV = 2  # on the KV cache after prefill (and every N decode steps)
    DECODE = 3  # replaces the token loop of AR image models
    STREAM = 4  # between the frames of a video stream (what each frame adds to the cache, what stays)


@dataclass
class VisualTokens:
    """The visual tokens of one image or one video, in the order the language model reads them.

    Attributes:
        features: (N, D) embeddings in the LLM's input space (after the projector).
        coords: (N, 4) long, per token ``(g, t, y, x)``: sub-grid (e.g. anyres base view 0 / high-res view 1),
            frame / temporal index, row, column. Layout tokens that carry no patch (LLaVA-OneVision's
            newline) have ``x == -1``; a row newline keeps its row ``y``, a trailing newline has ``y == -1``.
        source: (N,) long, index of the original token each token stands in for (its anchor: the token whose
            sequence position and position id it takes). Strictly increasing.
        sizes: (N,) float, how many original tokens each token represents (1 unless merged).
        kind: ``"image"`` or ``"video"``.
        index: which image / video of the prompt this is.
        token_id: the placeholder token id these tokens fill in ``input_ids``.
        n_original: number of tokens before any reduction.
        grids: per sub-grid ``g``: ``(rows, cols)`` of the original layout.
        tower: per-token statistics of the vision tower the adapter was asked for (``"attention"`` (N,),
            ``"keys"`` (N, C); see :class:`mmfast.models.vision.TowerProbe`), aligned with the tokens.
        extra: method-private annotations (e.g. "already merged inside the ViT").
    """

    features: torch.Tensor
    coords: torch.Tensor
    source: torch.Tensor
    sizes: torch.Tensor
    kind: str
    index: int
    token_id: int
    n_original: int
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    tower: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def layout_mask(self) -> torch.Tensor:
        """(N,) bool: True for layout tokens (newlines) that reductions keep as they are."""
        return self.coords[:, 3] < 0

    @property
    def num_frames(self) -> int:
        t = self.coords[:, 1]
        return int(t.max().item()) + 1 if len(t) and t.max() >= 0 else 1

    def select(self, idx: torch.Tensor) -> VisualTokens:
        """Keep the tokens at ``idx`` (any order in; sorted by anchor out)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.features.device)
        idx = idx[torch.argsort(self.source[idx])]
        return replace(
            self,
            features=self.features[idx],
            coords=self.coords[idx],
            source=self.source[idx],
            sizes=self.sizes[idx],
            tower={k: v[idx] for k, v in self.tower.items()},
        )

    def with_tokens(
        self, features: torch.Tensor, coords: torch.Tensor, source: torch.Tensor, sizes: torch.Tensor
    ) -> VisualTokens:
        """A copy holding new tokens, sorted by anchor (tower statistics, which belonged to the old tokens, dropped)."""
        order = torch.argsort(source)
        return replace(
            self, features=features[order], coords=coords[order], source=source[order], sizes=sizes[order], tower={}
        )

    @classmethod
    def from_grid(
        cls,
        features: torch.Tensor,
        blocks: Sequence[tuple[int, int, int, int, bool]],
        *,
        kind: str,
        index: int,
        token_id: int,
    ) -> VisualTokens:
        """Build from a layout given as blocks ``(g, frames, rows, cols, newline_per_row)`` in reading order,
        plus an optional trailing newline block ``(g, 0, 0, 0, True)`` (one token with ``y = x = -1``)."""
        coords = []
        grids: dict[int, tuple[int, int]] = {}
        for g, frames, rows, cols, newline in blocks:
            if frames == 0:  # a single trailing newline token
                coords.append(torch.tensor([[g, -1, -1, -1]]))
                continue
            grids[g] = (rows, cols)
            t, y, x = torch.meshgrid(
                torch.arange(frames), torch.arange(rows), torch.arange(cols + (1 if newline else 0)), indexing="ij"
            )
            x = torch.where(x == cols, torch.full_like(x, -1), x) if newline else x
            c = torch.stack([torch.full_like(t, g), t, y, x], dim=-1).reshape(-1, 4)
            coords.append(c)
        coords_t = torch.cat(coords).to(features.device)
        n = features.shape[0]
        if coords_t.shape[0] != n:
            raise UnsupportedModelError(
                f"Could not infer the layout of {n} visual tokens (expected {coords_t.shape[0]} from the config)."
            )
        return cls(
            features=features,
            coords=coords_t,
            source=torch.arange(n, device=features.device),
            sizes=torch.ones(n, device=features.device),
            kind=kind,
            index=index,
            token_id=token_id,
            n_original=n,
            grids=grids,
        )


@dataclass
class Span:
    """Where one image, or one frame of a video, sits in the (possibly reduced) prompt: ``[start, end)``."""

    kind: str  # "image" | "frame" | "video"
    item: int  # index of the image / video in the prompt
    start: int
    end: int
    frame: int | None = None

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class KVContext:
    """What a KV policy knows when it is called for one layer."""

    layer_idx: int
    phase: str  # "prefill" (the first update of this layer) or "decode"
    seen: int  # tokens seen by this layer so far, including this update
    new: int  # tokens added by this update
    prompt_len: int = 0  # length of the prompt (first update)
    spans: list[Span] = field(default_factory=list)  # visual-token spans in the prompt
    shared: dict[str, Any] = field(default_factory=dict)  # per-request scratch space shared by all layers
    #: (B, kv_heads, S_all, D): every entry this update's attention reads (dequantized segments, tail, new tokens)
    keys_all: torch.Tensor | None = None
    #: (B, kv_heads, S) original positions of the entries handed to the current policy, or None when they are
    #: contiguous (the newest S positions). A policy that drops or reorders entries sets it for the next one.
    positions: torch.Tensor | None = None

    def entry_positions(self, keys: torch.Tensor) -> torch.Tensor:
        """(B, kv_heads, S) original positions of ``keys`` (the entries handed to the current policy)."""
        if self.positions is not None:
            return self.positions
        b, h, s = keys.shape[:3]
        return torch.arange(self.seen - s, self.seen, device=keys.device).expand(b, h, s)


class KVPolicy(Protocol):
    """What a KV cache needs of a KV-stage method (:class:`mmfast.accel.base.KVAccelerator` implements it)."""

    role: str  # "evict" | "quantize": evictions run first

    def wants_update(self, ctx: KVContext) -> bool: ...

    def compress(self, keys: torch.Tensor, values: torch.Tensor, ctx: KVContext) -> tuple[torch.Tensor, torch.Tensor]: ...

    def quantize(self, keys: torch.Tensor, values: torch.Tensor, ctx: KVContext) -> tuple[list[Any], torch.Tensor, torch.Tensor]: ...
