"""Spec strings, the name lookup and composition of accelerators.

Accelerators are named in spec strings such as ``"pool(factor=2)+kv_window(sink=4,recent=64)"``
(:func:`parse_spec`) and combined with :func:`compose`, which orders them by stage (vision -> prefill -> kv ->
decode; KV eviction before quantization) and refuses two methods fighting over one stage. The registry is filled
by the method modules that :mod:`mmfast.accel` imports before this one.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from mmfast.accel.base import REGISTRY, Accelerator
from mmfast.errors import ConfigError, IncompatibleAcceleratorError
from mmfast.types import Stage


def available() -> list[str]:
    """Names of all registered accelerators."""
    return sorted(REGISTRY)


def get(name: str) -> type[Accelerator]:
    """The registered accelerator class called ``name`` (case- and dash-insensitive)."""
    key = name.strip().lower().replace("-", "_")
    if key not in REGISTRY:
        raise ConfigError(f"Unknown accelerator {name!r}. Valid names: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[key]


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

    def extra_stats(self) -> dict[str, Any]:
        """Every method's :meth:`~mmfast.accel.base.Accelerator.extra_stats` of the last call, merged."""
        out: dict[str, Any] = {}
        for acc in self.accelerators:
            out.update(acc.extra_stats())
        return out

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
