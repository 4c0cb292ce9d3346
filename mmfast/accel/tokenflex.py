"""TokenFLEX: a flexible visual-token projector (Hu et al., "TokenFLEX: Unified VLM Training for Flexible Visual
Tokens Inference", arXiv 2504.03154; no public code, implemented from the paper) and its training-free cousin.

* ``tokenflex(keep=0.25)`` / ``tokenflex(tokens=64)``: the TokenFLEX projector of a model *trained for it*
  (``mmfast zoo train tiny-vlm-flex``). Each crop's ViT patch grid (s x s) is average-pooled to n x n
  (``AdaptiveAvgPool2d``), passed through the SwiGLU feature-weighting layer y = W_down(SiLU(W_gate x) * W_up x)
  and then through the model's own LM projection (its ``multi_modal_projector``), and laid out like the model's
  own features (anyres base view + unpadded tiles with row newlines; video frames + trailing newline). Training
  samples n per sample (see :data:`mmfast.train.tiny_vlm_flex`), so one model serves every count. ``tokens`` is
  the count per crop (n = round(sqrt(tokens))); ``keep`` the fraction of every grid (n = round(s * sqrt(keep)));
  video frames are pooled to the same fraction of the model's native video grid.
* ``adaptive_pool(keep=0.25)`` / ``adaptive_pool(tokens=64)``: the same pooling applied, training-free, to the
  projector outputs of any checkpoint (any family). This is NOT TokenFLEX: there is no trained feature
  weighting and the LLM never saw pooled tokens.

Storage: a TokenFLEX model is a normal Hugging Face checkpoint (loadable with ``from_pretrained``, whose plain
path is the model at the full token count) plus ``tokenflex.safetensors`` beside it holding the SwiGLU weights
(``gate.weight``, ``up.weight``, ``down.weight``; metadata: widths and the trained counts). The accelerator
loads that file from the model's directory (``model.name_or_path``) or from ``weights=``.

Departures from the paper: (1) the feature weighting is residual, x + W_down(SiLU(W_gate x) * W_up x), with
W_down initialised to zero, so training from an existing checkpoint starts at plain pooling (a CPU-hour budget
cannot re-learn the projector from scratch); (2) at the native count (n = s) the checkpoint's own projector
path runs unchanged (no pooling, no feature weighting), so ``keep=1.0`` is token-identical to the baseline and
the full-count samples during training train that path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.accel.base import VisionAccelerator, register
from mmfast.errors import ConfigError, IncompatibleAcceleratorError, UnsupportedModelError
from mmfast.types import VisualTokens

WEIGHTS_NAME = "tokenflex.safetensors"


def _check_amount(name: str, keep: Any, tokens: Any) -> None:
    if keep is not None and tokens is not None:
        raise ConfigError(f"{name}: give either keep= (fraction of tokens) or tokens= (tokens per crop), not both.")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1):
        raise ConfigError(f"{name}: keep must be a fraction in (0, 1], got {keep!r}.")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ConfigError(f"{name}: tokens must be an integer >= 1, got {tokens!r}.")


def side_fraction(keep: float | None, tokens: int | None, crop_side: int) -> float:
    """Fraction of each grid side kept: sqrt(keep), or sqrt(tokens) / crop_side."""
    if tokens is not None:
        return min(1.0, math.sqrt(tokens) / crop_side)
    return math.sqrt(keep if keep is not None else 0.25)


def pooled(n: int, frac: float) -> int:
    """Side of a grid of side ``n`` pooled to fraction ``frac``."""
    return max(1, min(n, round(n * frac)))


def _windows(size: int, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaptiveAvgPool windows [start, end) along one axis."""
    i = torch.arange(out)
    return (i * size) // out, ((i + 1) * size + out - 1) // out


# ----------------------------------------------------------------------------------------------------------
# adaptive pooling of VisualTokens (training-free)
# ----------------------------------------------------------------------------------------------------------
def adaptive_pool_tokens(tokens: VisualTokens, frac: float) -> VisualTokens:
    """Average-pool every (sub-grid, frame) patch grid of ``tokens`` to ``frac`` of its sides (size-weighted).

    A pooled token anchors at the first token of its window; per pooled row the newline of the window's last
    original row is kept, trailing newlines are kept.
    """
    c, layout = tokens.coords, tokens.layout_mask
    reg = (~layout).nonzero().flatten()
    if reg.numel() == 0 or frac >= 1:
        return tokens
    dev = tokens.features.device
    feats, coords, source, sizes = [], [], [], []
    keys = torch.unique(c[reg][:, :2], dim=0)
    for g, t in keys.tolist():
        idx = reg[(c[reg, 0] == g) & (c[reg, 1] == t)]
        y, x = c[idx, 2], c[idx, 3]
        rows, cols = int(y.max()) + 1, int(x.max()) + 1
        if rows * cols != idx.numel():
            raise UnsupportedModelError("adaptive pooling needs full patch grids (apply it before other reductions).")
        nr, nc = pooled(rows, frac), pooled(cols, frac)
        w = tokens.sizes[idx].float()
        grid = torch.zeros(rows, cols, tokens.features.shape[1] + 1, device=dev)
        grid[y, x] = torch.cat([tokens.features[idx].float() * w[:, None], w[:, None]], 1)
        src_grid = torch.zeros(rows, cols, dtype=torch.long, device=dev)
        src_grid[y, x] = tokens.source[idx]
        p = F.adaptive_avg_pool2d(grid.permute(2, 0, 1), (nr, nc)).permute(1, 2, 0).reshape(nr * nc, -1)
        ys, ye = _windows(rows, nr)
        xs, xe = _windows(cols, nc)
        area = ((ye - ys)[:, None] * (xe - xs)[None, :]).flatten().to(dev)
        feats.append(p[:, :-1] / p[:, -1:])
        sizes.append(p[:, -1] * area)
        gy, gx = torch.meshgrid(torch.arange(nr), torch.arange(nc), indexing="ij")
        coords.append(torch.stack([torch.full_like(gy, g), torch.full_like(gy, t), gy, gx], -1).reshape(-1, 4))
        source.append(src_grid[ys[:, None].expand(nr, nc).flatten(), xs[None, :].expand(nr, nc).flatten()])
        # newlines of this grid: per pooled row, the one closing the original row before the next window starts
        # (anchors stay increasing even when adaptive windows overlap)
        nl = layout.nonzero().flatten()
        nl = nl[(c[nl, 0] == g) & (c[nl, 1] == t) & (c[nl, 2] >= 0)]
        if nl.numel():
            by_row = {int(c[i, 2]): int(i) for i in nl}
            for i in range(nr):
                last = (i + 1) * rows // nr - 1
                if last in by_row:
                    j = by_row[last]
                    feats.append(tokens.features[j : j + 1].float())
                    sizes.append(tokens.sizes[j : j + 1].float())
                    coords.append(torch.tensor([[g, t, i, -1]]))
                    source.append(tokens.source[j : j + 1])
    trailing = (layout & (c[:, 2] < 0)).nonzero().flatten()
    out = tokens.with_tokens(
        torch.cat(feats + [tokens.features[trailing].float()]).to(tokens.features.dtype),
        torch.cat(coords + [c[trailing].cpu()]).to(c.device),
        torch.cat(source + [tokens.source[trailing]]),
        torch.cat(sizes + [tokens.sizes[trailing].float()]).to(tokens.sizes.dtype),
    )
    out.grids = {g: (pooled(r, frac), pooled(k, frac)) for g, (r, k) in tokens.grids.items()}
    return out


@register
@dataclass
class AdaptivePool(VisionAccelerator):
    """Training-free adaptive average pooling of every patch grid (NOT TokenFLEX: no trained projector)."""

    name = "adaptive_pool"
    keep: float | None = None
    tokens: int | None = None

    def validate(self) -> None:
        _check_amount("adaptive_pool", self.keep, self.tokens)
        if self.keep is None and self.tokens is None:
            self.keep = 0.25

    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        side = max([max(r, k) for r, k in tokens.grids.values()] or [1])
        return adaptive_pool_tokens(tokens, side_fraction(self.keep, self.tokens, side))


# ----------------------------------------------------------------------------------------------------------
# the TokenFLEX projector
# ----------------------------------------------------------------------------------------------------------
class FlexProjector(nn.Module):
    """SwiGLU feature weighting on pooled ViT features (vision width ``dim``), residual (see module docstring).

    (..., dim) -> (..., dim); the model's own ``multi_modal_projector`` follows.
    """

    def __init__(self, dim: int, hidden: int, counts: tuple[int, ...] = ()):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.down.weight)  # start at plain pooling
        self.counts = tuple(counts)  # pooled sides n seen in training (metadata)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.gate(x)) * self.up(x))

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / WEIGHTS_NAME
        meta = {"dim": str(self.gate.in_features), "hidden": str(self.gate.out_features), "counts": json.dumps(self.counts)}
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FlexProjector:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        flex = cls(int(meta["dim"]), int(meta["hidden"]), tuple(json.loads(meta.get("counts", "[]"))))
        flex.load_state_dict(state)
        return flex.eval()


def pool_grid(h: torch.Tensor, n: int) -> torch.Tensor:
    """(crops, s*s, D) -> (crops, n, n, D) adaptive average pooling of each crop's square grid."""
    c, t, d = h.shape
    s = math.isqrt(t)
    g = h.transpose(1, 2).reshape(c, d, s, s)
    return F.adaptive_avg_pool2d(g, (n, n)).permute(0, 2, 3, 1)


def flex_items(adapter: Any, flex: FlexProjector, inputs: Any, frac: float) -> list[VisualTokens]:
    """TokenFLEX visual tokens of one prompt (differentiable: used by inference and by training): per crop / frame
    the tower grid pooled to ``frac`` of the native side, feature weighting, the model's projector, the family's
    layout."""
    items: list[VisualTokens] = []
    for modality in ("image", "video"):
        feats = adapter.tower_features(inputs, modality)
        if feats is None:
            continue
        n = pooled(adapter.native_side(modality), frac)
        items.extend(adapter.grid_items(inputs, modality, adapter.project(flex(pool_grid(feats, n)))))
    for it in items:
        it.source = it.source.to(adapter.device)
    return items


@register
@dataclass
class TokenFlex(VisionAccelerator):
    """TokenFLEX flexible projector of a TokenFLEX-trained checkpoint; ``keep`` or ``tokens`` (per crop)."""

    name = "tokenflex"
    requires = ("tower_features",)
    zoo_model = "tiny-vlm-flex"
    keep: float | None = None
    tokens: int | None = None
    weights: str | None = None

    def validate(self) -> None:
        _check_amount("tokenflex", self.keep, self.tokens)
        if self.keep is None and self.tokens is None:
            self.keep = 0.25

    @classmethod
    def prepare_random_model(cls, model_dir: Any) -> None:
        vision = json.loads((Path(model_dir) / "config.json").read_text())["vision_config"]
        FlexProjector(vision["hidden_size"], 2 * vision["hidden_size"]).save(model_dir)

    def _path(self, adapter: Any) -> Path:
        if self.weights:
            return Path(self.weights)
        return Path(str(getattr(adapter.model, "name_or_path", "") or ".")) / WEIGHTS_NAME

    def check_compatible(self, adapter: Any) -> None:
        if "tower_features" not in getattr(adapter, "capabilities", ()):
            raise IncompatibleAcceleratorError(
                f"tokenflex pools the ViT grid before a LLaVA-style projector; {type(adapter.model).__name__} does "
                "not expose one (adapter capability 'tower_features'). Use adaptive_pool(keep=...) instead."
            )
        super().check_compatible(adapter)
        if not self._path(adapter).is_file():
            raise IncompatibleAcceleratorError(
                f"tokenflex needs a TokenFLEX-trained checkpoint ({WEIGHTS_NAME} beside the model, e.g. zoo model "
                f"'tiny-vlm-flex', or weights=PATH); none at {self._path(adapter)}. For other checkpoints use the "
                "training-free adaptive_pool(keep=...)."
            )

    def projector(self, adapter: Any) -> FlexProjector:
        path = self._path(adapter)
        cache = adapter.__dict__.setdefault("_tokenflex", {})
        if str(path) not in cache:
            cache[str(path)] = FlexProjector.load(path).to(adapter.device, adapter.model.dtype)
        return cache[str(path)]

    def encode(self, adapter: Any, inputs: Any) -> list[VisualTokens] | None:
        s = adapter.native_side("image")
        frac = side_fraction(self.keep, self.tokens, s)
        if pooled(s, frac) >= s:
            return None  # native count: the checkpoint's own projector path
        return flex_items(adapter, self.projector(adapter), inputs, frac)

    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        return tokens
