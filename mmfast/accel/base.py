"""Accelerator base classes: one per stage, and the registry that names them.

An accelerator is a small ``@dataclass`` config (validated in ``__post_init__``) that is also a context
manager hooking a model adapter, in the manner of kvpress presses::

    with Pool(factor=2)(adapter):
        adapter.generate(...)          # hooks are removed on exit, even on error

Methods act at one of four places (:class:`~mmfast.types.Stage`, docs/architecture.md): the vision stage maps
:class:`~mmfast.types.VisualTokens` to fewer tokens, the prefill stage acts inside the LM's decoder layers (the
adapter calls it with a :class:`~mmfast.models.prefill.PrefillContext`), the KV stage compresses the cache, the
decode stage replaces the token loop of AR image generators. A method talks to the adapter's API only; what it
needs beyond the basics it names in ``requires`` (adapter capabilities such as ``"tower_features"``), and what it
measures beyond the common stats it returns from :meth:`Accelerator.extra_stats`. Spec strings, composition and
the name lookup are in :mod:`mmfast.accel.spec`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

from mmfast.errors import IncompatibleAcceleratorError
from mmfast.types import KVContext, Stage, VisualTokens

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "REGISTRY",
    "Accelerator",
    "DecodeAccelerator",
    "KVAccelerator",
    "PrefillAccelerator",
    "Stage",
    "StreamAccelerator",
    "VisionAccelerator",
    "register",
]


@dataclasses.dataclass
class Accelerator:
    """Base class of every method. Subclasses set ``name`` and ``stages`` and override the stage hooks."""

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[Stage, ...]] = ()
    #: adapter kinds the method applies to ("vlm" or "argen")
    applies_to: ClassVar[tuple[str, ...]] = ("vlm",)
    #: adapter capabilities the method needs (``adapter.capabilities``), e.g. ``("tower_features",)``
    requires: ClassVar[tuple[str, ...]] = ()
    #: the zoo checkpoint trained for this method, when it needs weights of its own (quality benchmarks use it)
    zoo_model: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~mmfast.errors.ConfigError` on bad parameters. Called from ``__post_init__``."""

    # -- hooking -------------------------------------------------------------------------------
    def attach(self, adapter: Any) -> None:
        """Install hooks on ``adapter``. The default registers the method on the adapter's stage lists."""
        adapter.add_accelerator(self)

    def detach(self, adapter: Any) -> None:
        adapter.remove_accelerator(self)

    def check_compatible(self, adapter: Any) -> None:
        """Raise :class:`IncompatibleAcceleratorError` when this method cannot act on ``adapter``."""
        kind = getattr(adapter, "kind", "vlm")
        if kind not in self.applies_to:
            raise IncompatibleAcceleratorError(
                f"{self.spec()} applies to {', '.join(self.applies_to)} models, not to a {kind} model."
            )
        have = getattr(adapter, "capabilities", frozenset())
        missing = [c for c in self.requires if c not in have]
        if missing:
            model = type(getattr(adapter, "model", adapter)).__name__
            raise IncompatibleAcceleratorError(
                f"{self.name} needs {', '.join(missing)} from the model adapter, which {model} does not offer "
                f"(it offers: {', '.join(sorted(have)) or 'nothing beyond the basics'})."
            )

    @contextmanager
    def __call__(self, adapter: Any) -> Iterator[Accelerator]:
        self.check_compatible(adapter)
        self.attach(adapter)
        try:
            yield self
        finally:
            self.detach(adapter)

    # -- measuring -----------------------------------------------------------------------------
    def extra_stats(self) -> dict[str, Any]:
        """Method-specific figures of the last call (e.g. ZipVL's important ratio), merged into the pipeline's
        ``stats`` and into benchmark rows. Numbers only (averaged over calls by the quality benchmarks)."""
        return {}

    @classmethod
    def prepare_random_model(cls, model_dir: Any) -> None:
        """Give a random-initialised (speed-benchmark) checkpoint in ``model_dir`` the extra weights this method
        loads, random too: speed does not depend on the weights. Default: nothing."""

    # -- description ---------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The canonical spec string with every parameter, e.g. ``pool(factor=2)``."""
        args = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in self.params().items()]
        return f"{self.name}({','.join(args)})" if args else self.name

    def __str__(self) -> str:
        return self.spec()


class VisionAccelerator(Accelerator):
    """Vision stage: maps the visual tokens of one image / video to fewer tokens.

    ``encode(adapter, inputs)`` (optional) may produce the items itself (merging inside the ViT, its own
    projector); ``None`` leaves the adapter's default encoding. ``positions`` says how the reduced prompt is
    numbered: ``"compact"`` (0..L'-1, what a shorter prompt would get) or ``"original"`` (kept tokens keep their
    positions); M-RoPE families keep the original 3-D positions of visual tokens either way.
    """

    stages = (Stage.VISION,)
    positions: ClassVar[str] = "compact"

    def encode(self, adapter: Any, inputs: Any) -> list[VisualTokens] | None:
        return None

    def reduce(self, tokens: VisualTokens) -> VisualTokens:  # pragma: no cover - abstract
        raise NotImplementedError


class PrefillAccelerator(Accelerator):
    """Prefill stage: acts inside the LM's decoder layers while the prompt is prefilled.

    The adapter calls :meth:`on_layer` before each layer listed by :meth:`layers`, with a
    :class:`~mmfast.models.prefill.PrefillContext`: that layer's input, the original positions and visual mask of
    the tokens still present, the probe path for a few queries' attention (``ctx.attention(rows)``), and the two
    actions: ``ctx.keep(idx)`` (only these tokens from this layer on) and ``ctx.route(idx)`` (this layer's
    attention among these tokens only).
    """

    stages = (Stage.PREFILL,)
    #: whether the method calls ``ctx.route`` (the adapter then routes the LM's attention through the stage)
    routes_attention: ClassVar[bool] = False

    def layers(self, num_layers: int) -> Sequence[int]:  # pragma: no cover - abstract
        """Decoder layers (0-based) whose prefill this method acts on."""
        raise NotImplementedError

    def on_layer(self, ctx: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class KVAccelerator(Accelerator):
    """KV stage: compresses one layer's cache after prefill and (optionally) during decoding.

    ``role`` orders KV methods when several are stacked: eviction first, then quantization.
    """

    stages = (Stage.KV,)
    role: ClassVar[str] = "evict"  # "evict" | "quantize"

    def compress(
        self, keys: torch.Tensor, values: torch.Tensor, ctx: KVContext
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """Return the keys / values to keep, shapes (B, kv_heads, S', head_dim) with S' <= S."""
        raise NotImplementedError

    def quantize(
        self, keys: torch.Tensor, values: torch.Tensor, ctx: KVContext
    ) -> tuple[list[Any], torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """``role = "quantize"`` methods are called here instead of :meth:`compress`, with the full-precision tail
        (B, kv_heads, S, head_dim) of the layer: return ``(segments, keys_left, values_left)`` where ``segments`` are
        :class:`~mmfast.models.cache.KVSegment` s now holding some of those entries (dequantized on read)."""
        raise NotImplementedError

    def wants_update(self, ctx: KVContext) -> bool:
        """Whether to call :meth:`compress` after this update (default: after prefill only)."""
        return ctx.phase == "prefill"


class StreamAccelerator(Accelerator):
    """Stream stage: decides, frame by frame of a video stream (the ``streaming-video-qa`` task), what a frame adds to
    the prompt and what of it stays in the KV cache.

    The session calls :meth:`frame_input` with the frame's visual tokens before prefilling them and
    :meth:`after_frame` once they are in the cache; ``positions`` says how the stream numbers what comes next:
    ``"compact"`` (the next token takes the number of entries the cache holds, as VideoScan's reference) or
    ``"absolute"`` (the number of tokens seen).
    """

    stages = (Stage.STREAM,)
    positions: ClassVar[str] = "absolute"

    def frame_input(self, feats: torch.Tensor, frame: int) -> torch.Tensor:
        """(n, D) visual tokens of frame ``frame`` -> (n', D) what the stream prefills for it."""
        return feats

    def after_frame(self, ctx: Any) -> torch.Tensor | None:
        """Indices of the cache entries to keep after the frame (``ctx``: :class:`~mmfast.models.stream.FrameContext`),
        or None to keep every entry."""
        return None


class DecodeAccelerator(Accelerator):
    """Decode stage: replaces the one-token-per-step loop of AR image generators (:func:`mmfast.decoding.ar_decode`).

    ``decode`` must sample from :meth:`ARGenAdapter.target_probs` (the shared target distribution).
    """

    stages = (Stage.DECODE,)
    applies_to = ("argen",)
    #: the generation order the decoder works in: "raster" (next token) or "scales" (VAR's next scale)
    order: ClassVar[str] = "raster"

    def check_compatible(self, adapter: Any) -> None:
        super().check_compatible(adapter)
        have = getattr(adapter, "order", "raster")
        if have != self.order:
            what = {"raster": "token by token in raster order", "scales": "scale by scale (next-scale prediction)"}
            raise IncompatibleAcceleratorError(
                f"{self.name} decodes {what.get(self.order, self.order)}, but {type(adapter).__name__} "
                f"generates {what.get(have, have)}" + (": use code(...)" if have == "scales" else "") + "."
            )

    def decode(
        self, adapter: Any, conditions: list[Any], sampling: Any, generator: Any, callback: Any = None, progress: Any = True
    ) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


# -------------------------------------------------------------------------------------------------
# registry
# -------------------------------------------------------------------------------------------------
REGISTRY: dict[str, type[Accelerator]] = {}


def register(cls: type[Accelerator]) -> type[Accelerator]:
    """Class decorator: make ``cls`` available by ``cls.name`` in spec strings."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls
