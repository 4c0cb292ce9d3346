"""Accelerator framework: configs, stages, registry, spec strings and composition.

An accelerator is a small ``@dataclass`` config (validated in ``__post_init__``) that is also a context
manager hooking a model adapter, in the manner of kvpress presses::

    with Pool(factor=2)(adapter):
        adapter.generate(...)          # hooks are removed on exit, even on error

Methods act at one of four places (design.md §3); :class:`Stage` orders them. Accelerators are named in
spec strings such as ``"pool(factor=2)+kv_window(sink=4,recent=64)"`` (:func:`parse_spec`) and combined
with :func:`compose`, which orders them by stage and refuses two methods fighting over one stage.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar

from mmfast.errors import ConfigError, IncompatibleAcceleratorError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mmfast.models.cache import KVContext
    from mmfast.models.vlm import VisualTokens


class Stage(IntEnum):
    """Where a method acts, in execution order."""

    VISION = 0  # between the vision tower and the LLM (or inside the ViT)
    PREFILL = 1  # inside decoder layers during prefill
    KV = 2  # on the KV cache after prefill (and every N decode steps)
    DECODE = 3  # replaces the token loop of AR image models


@dataclasses.dataclass
class Accelerator:
    """Base class of every method. Subclasses set ``name`` and ``stages`` and override the stage hooks."""

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[Stage, ...]] = ()
    #: tasks / adapter kinds the method applies to ("vlm" or "argen")
    applies_to: ClassVar[tuple[str, ...]] = ("vlm",)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` on bad parameters. Called from ``__post_init__``."""

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

    @contextmanager
    def __call__(self, adapter: Any) -> Iterator[Accelerator]:
        self.check_compatible(adapter)
        self.attach(adapter)
        try:
            yield self
        finally:
            self.detach(adapter)

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
    """Vision stage: maps the visual tokens of one image / video to fewer tokens."""

    stages = (Stage.VISION,)

    def reduce(self, tokens: VisualTokens) -> VisualTokens:  # pragma: no cover - abstract
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


class DecodeAccelerator(Accelerator):
    """Decode stage: replaces the one-token-per-step loop of AR image generators (:func:`mmfast.decoding.ar_decode`).

    ``decode`` must sample from :meth:`ARGenAdapter.target_probs` (the shared target distribution).
    """

    stages = (Stage.DECODE,)
    applies_to = ("argen",)

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


def available() -> list[str]:
    """Names of all registered accelerators."""
    _ensure_builtins()
    return sorted(REGISTRY)


def get(name: str) -> type[Accelerator]:
    _ensure_builtins()
    key = name.strip().lower().replace("-", "_")
    if key not in REGISTRY:
        raise ConfigError(f"Unknown accelerator {name!r}. Valid names: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[key]


def _ensure_builtins() -> None:
    import mmfast.accel  # noqa: F401  (imports every method module, which registers it)


# -------------------------------------------------------------------------------------------------
# spec strings
# -------------------------------------------------------------------------------------------------
_TERM = re.compile(r"^\s*([A-Za-z_][\w\-]*)\s*(?:\((.*)\))?\s*$", re.S)


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses / brackets / quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0 and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _literal(node: ast.expr, term: str) -> Any:
    if isinstance(node, ast.Name):  # bare words are strings: merge=weighted
        return {"True": True, "False": False, "None": None}.get(node.id, node.id)
    try:
        return ast.literal_eval(node)
    except ValueError as e:
        raise ConfigError(f"Cannot parse a parameter value in {term!r}: use numbers, strings or tuples.") from e


def build(name: str, **params: Any) -> Accelerator:
    """Instantiate a registered accelerator, turning bad parameters into :class:`ConfigError`."""
    cls = get(name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ConfigError(
            f"{cls.name}: unknown parameter(s) {', '.join(unknown)}. "
            f"Valid parameters: {', '.join(sorted(fields)) or '(none)'}."
        )
    try:
        return cls(**params)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.name}: {e}") from e


def parse_spec(spec: str) -> list[Accelerator]:
    """Parse ``"name(k=v,...)+name2"`` into accelerator instances (in the written order)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("Empty accelerate spec. Example: 'pool(factor=2)+kv_window(sink=4,recent=64)'.")
    out = []
    for term in _split_top(spec, "+"):
        m = _TERM.match(term)
        if not m:
            raise ConfigError(f"Cannot parse {term.strip()!r}: expected name or name(key=value,...).")
        name, args = m.group(1), (m.group(2) or "").strip()
        params: dict[str, Any] = {}
        if args:
            try:
                call = ast.parse(f"f({args})", mode="eval").body
            except SyntaxError as e:
                raise ConfigError(f"Cannot parse the parameters of {term.strip()!r}: {e.msg}.") from e
            assert isinstance(call, ast.Call)
            if call.args:
                raise ConfigError(f"{term.strip()!r}: parameters must be named, e.g. {name}(key=value).")
            for kw in call.keywords:
                if kw.arg is None:
                    raise ConfigError(f"{term.strip()!r}: '**' is not allowed in a spec.")
                params[kw.arg] = _literal(kw.value, term.strip())
        out.append(build(name, **params))
    return out


# -------------------------------------------------------------------------------------------------
# composition
# -------------------------------------------------------------------------------------------------
class Composed:
    """Several accelerators applied together, ordered by stage. Also a context manager over an adapter."""

    def __init__(self, accelerators: Sequence[Accelerator]):
        self.accelerators = list(accelerators)

    def __iter__(self) -> Iterator[Accelerator]:
        return iter(self.accelerators)

    def __len__(self) -> int:
        return len(self.accelerators)

    @contextmanager
    def __call__(self, adapter: Any) -> Iterator[Composed]:
        with ExitStack() as stack:
            for acc in self.accelerators:
                stack.enter_context(acc(adapter))
            yield self

    def spec(self) -> str:
        return "+".join(a.spec() for a in self.accelerators) or "baseline"

    def __str__(self) -> str:
        return self.spec()

    def __repr__(self) -> str:
        return f"Composed({self.spec()!r})"


def compose(accelerators: Iterable[Accelerator]) -> Composed:
    """Order by stage (vision → prefill → kv → decode; KV eviction before quantization) and check conflicts."""
    accs = list(accelerators)
    for acc in accs:
        if not isinstance(acc, Accelerator):
            raise ConfigError(f"Not an accelerator: {acc!r}")

    def key(a: Accelerator) -> tuple[int, int]:
        role = 0 if getattr(a, "role", "evict") == "evict" else 1
        return (min(a.stages) if a.stages else 99, role)

    accs.sort(key=key)
    claimed: dict[Any, Accelerator] = {}
    for acc in accs:
        for stage in acc.stages:
            slot: Any = (stage, getattr(acc, "role", "evict")) if stage == Stage.KV else stage
            if slot in claimed:
                other = claimed[slot]
                what = f"the {stage.name.lower()} stage" + (f" ({slot[1]})" if stage == Stage.KV else "")
                raise IncompatibleAcceleratorError(
                    f"{other.spec()} and {acc.spec()} both act on {what}; use at most one of them "
                    "(KV methods can stack one eviction with one quantization)."
                )
            claimed[slot] = acc
    return Composed(accs)


def resolve(accelerate: Any) -> Composed:
    """Turn ``None`` / a spec string / an accelerator / a list of them into a :class:`Composed`."""
    if accelerate is None or (isinstance(accelerate, str) and accelerate.strip().lower() in ("", "none", "baseline")):
        return Composed([])
    if isinstance(accelerate, Composed):
        return accelerate
    if isinstance(accelerate, str):
        return compose(parse_spec(accelerate))
    if isinstance(accelerate, Accelerator):
        return compose([accelerate])
    if isinstance(accelerate, (list, tuple)):
        accs: list[Accelerator] = []
        for item in accelerate:
            accs.extend(resolve(item).accelerators)
        return compose(accs)
    raise ConfigError(
        f"accelerate must be None, a spec string, an Accelerator or a list of them, not {type(accelerate).__name__}."
    )
