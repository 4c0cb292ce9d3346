"""Peer baselines that prove every hook: ``pool`` and ``random`` (vision stage), ``kv_window`` (kv stage).

* ``pool(factor=2)``: average-pool each visual patch grid by ``factor`` x ``factor`` (keeps 1/factor^2 of the
  tokens; what LLaVA-OneVision / LLaVA-Video do to video frames). Layout tokens (newlines) are kept, one per
  pooled row.
* ``random(keep=0.25)``: keep a seeded uniform-random subset of the visual tokens, in their original order
  (the "random" row of every token-pruning paper, e.g. LightCompress / EffiVLM-Bench).
* ``kv_window(sink=4, recent=64)``: StreamingLLM (Xiao et al., ICLR 2024, "Efficient Streaming Language Models
  with Attention Sinks", arXiv 2309.17453): keep the first ``sink`` entries and the ``recent`` latest ones,
  evicting the middle after prefill and after every decode step. Kept keys keep the RoPE rotation of their
  original positions and new tokens get their true absolute positions (transformers' cache convention), rather
  than StreamingLLM's re-indexing of positions inside the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmfast.accel.base import KVAccelerator, VisionAccelerator, register
from mmfast.errors import ConfigError
from mmfast.types import KVContext, VisualTokens


def _int_param(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}.")


def _keep_layout_rows(tokens: VisualTokens, factor: int) -> torch.Tensor:
    """Indices of layout tokens to keep when rows are pooled by ``factor``: the last newline of each pooled row."""
    c = tokens.coords
    layout = tokens.layout_mask
    trailing = (layout & (c[:, 2] < 0)).nonzero().flatten()
    rows = (layout & (c[:, 2] >= 0)).nonzero().flatten()
    if rows.numel() == 0:
        return trailing
    key = torch.stack([c[rows, 0], c[rows, 1], c[rows, 2] // factor], dim=1)
    _, inv = torch.unique(key, dim=0, return_inverse=True)
    last = torch.full((int(inv.max()) + 1,), -1, dtype=torch.long, device=c.device)
    last = last.scatter_reduce(0, inv, rows, reduce="amax")
    return torch.cat([trailing, last])


@register
@dataclass
class Pool(VisionAccelerator):
    """Average-pool visual patch grids by ``factor`` in each spatial direction."""

    name = "pool"
    factor: int = 2

    def validate(self) -> None:
        _int_param("pool: factor", self.factor, 1)

    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        if self.factor == 1 or len(tokens) == 0:
            return tokens
        f = self.factor
        c, regular = tokens.coords, ~tokens.layout_mask
        reg = regular.nonzero().flatten()
        key = torch.stack([c[reg, 0], c[reg, 1], c[reg, 2] // f, c[reg, 3] // f], dim=1)
        groups, inv = torch.unique(key, dim=0, return_inverse=True)
        n = groups.shape[0]
        w = tokens.sizes[reg].float()
        feats = torch.zeros(n, tokens.features.shape[1], dtype=torch.float32, device=c.device)
        feats.index_add_(0, inv, tokens.features[reg].float() * w[:, None])
        size = torch.zeros(n, device=c.device).index_add_(0, inv, w)
        feats = (feats / size[:, None]).to(tokens.features.dtype)
        source = torch.full((n,), len(tokens), dtype=torch.long, device=c.device)
        source = source.scatter_reduce(0, inv, tokens.source[reg], reduce="amin")
        lay = _keep_layout_rows(tokens, f)
        lay_coords = c[lay].clone()
        lay_coords[:, 2] = torch.where(lay_coords[:, 2] >= 0, lay_coords[:, 2] // f, lay_coords[:, 2])
        out = tokens.with_tokens(
            torch.cat([feats, tokens.features[lay]]),
            torch.cat([groups, lay_coords]),
            torch.cat([source, tokens.source[lay]]),
            torch.cat([size, tokens.sizes[lay]]),
        )
        out.grids = {g: (-(-r // f), -(-k // f)) for g, (r, k) in tokens.grids.items()}
        return out


@register
@dataclass
class RandomKeep(VisionAccelerator):
    """Keep a seeded random fraction ``keep`` of the visual tokens (layout tokens always kept)."""

    name = "random"
    keep: float = 0.25
    seed: int = 0

    def validate(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ConfigError(f"random: keep must be a fraction in (0, 1], got {self.keep!r}.")
        _int_param("random: seed", self.seed, 0)

    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        regular = (~tokens.layout_mask).nonzero().flatten()
        n_keep = max(1, round(self.keep * regular.numel()))
        if n_keep >= regular.numel():
            return tokens
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + tokens.index)
        pick = regular[torch.randperm(regular.numel(), generator=gen)[:n_keep].to(regular.device)]
        return tokens.select(torch.cat([pick, tokens.layout_mask.nonzero().flatten()]))


@register
@dataclass
class KVWindow(KVAccelerator):
    """StreamingLLM attention sinks + recent window, applied after prefill and after every decode step."""

    name = "kv_window"
    role = "evict"
    sink: int = 4
    recent: int = 64

    def validate(self) -> None:
        _int_param("kv_window: sink", self.sink, 0)
        _int_param("kv_window: recent", self.recent, 1)

    def wants_update(self, ctx: KVContext) -> bool:
        return True

    def stream_keep(self, stored: int) -> torch.Tensor | None:
        """In a video stream (``streaming-video-qa``), after each chunk: the stored entries to keep, or None."""
        if stored <= self.sink + self.recent:
            return None
        return torch.cat([torch.arange(self.sink), torch.arange(stored - self.recent, stored)])

    def compress(self, keys: torch.Tensor, values: torch.Tensor, ctx: KVContext) -> tuple[torch.Tensor, torch.Tensor]:
        s = keys.shape[-2]
        if s <= self.sink + self.recent:
            return keys, values
        idx = torch.cat([torch.arange(self.sink), torch.arange(s - self.recent, s)]).to(keys.device)
        ctx.positions = ctx.entry_positions(keys)[..., idx]  # for a quantizer stacked after this eviction
        return keys.index_select(-2, idx), values.index_select(-2, idx)
