"""The probe path and attention routing: what score-based prefill / KV methods need from decoder layers.

Every supported family (Llama / Qwen2 / Qwen2-VL text stacks in transformers 5) has the same attention shape:
``self_attn(hidden_states, position_embeddings=(cos, sin), ...)`` → ``q/k/v_proj`` → RoPE with those cos/sin
(for Qwen2-VL's M-RoPE the 3-D sections are already folded into cos/sin) → ``past_key_values.update`` →
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``. So, without touching any other layer's sdpa:

* :func:`project_queries` / :func:`project_keys` recompute q / k for chosen rows from a ``self_attn`` input with
  the module's own projections (and ``q_norm`` / ``k_norm`` when present) and its module's RoPE function;
* :class:`AttentionTap` keeps the latest ``self_attn`` input of every layer (forward pre-hooks), so a KV policy
  running inside ``cache.update`` can recompute that layer's queries;
* :func:`route_attention` points the language model at a registered attention function that hands each call to
  a per-module handler (e.g. ZipVL's sparse prefill) and otherwise falls through to the original implementation;
* :func:`packed_decode` lets decode steps over a :class:`~mmfast.models.cache.CompressedCache` run the
  ``packed_attention`` kernel on the cache's packed parts (no dequantized copy): a pre-hook tells the cache layer
  that this call's attention function is the routed one, the layer returns a
  :class:`~mmfast.models.cache.PackedStep`, and the routed function hands it to the kernel glue
  (:mod:`mmfast.kernels.packed_attention.hf`), or reads its dequantized view for a call the kernel does not cover
  (masks beyond causal, sliding windows, soft-capping, sinks).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmfast.kernels import GPU_VERIFIED, kernel_impl
from mmfast.kernels.packed_attention.hf import packed_decode_attention
from mmfast.models.cache import PackedStep


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rope(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the family's RoPE (its module's ``apply_rotary_pos_emb``) to x (B, heads, R, D); cos/sin (B, R, D)."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if fn is not None:
        return fn(x, x, cos, sin)[0]
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def _project(
    attn: nn.Module, proj: str, norm: str, hidden: torch.Tensor, pos_emb: tuple[torch.Tensor, torch.Tensor], rows: Any
) -> torch.Tensor:
    if rows is not None:
        hidden = hidden[:, rows]
    cos, sin = pos_emb
    if rows is not None:
        cos, sin = cos[:, rows], sin[:, rows]
    b, r = hidden.shape[:2]
    x = getattr(attn, proj)(hidden).view(b, r, -1, attn.head_dim)
    if hasattr(attn, norm):  # Qwen3-style per-head norm before RoPE
        x = getattr(attn, norm)(x)
    return _rope(attn, x.transpose(1, 2), cos, sin)


def project_queries(
    attn: nn.Module, hidden: torch.Tensor, pos_emb: tuple[torch.Tensor, torch.Tensor], rows: Any = None
) -> torch.Tensor:
    """Queries (B, heads, R, D) after RoPE for ``rows`` (index / slice, default all) of a ``self_attn`` input."""
    return _project(attn, "q_proj", "q_norm", hidden, pos_emb, rows)


def project_keys(
    attn: nn.Module, hidden: torch.Tensor, pos_emb: tuple[torch.Tensor, torch.Tensor], rows: Any = None
) -> torch.Tensor:
    """Keys (B, kv_heads, R, D) after RoPE, exactly as the layer writes them to the cache."""
    return _project(attn, "k_proj", "k_norm", hidden, pos_emb, rows)


def cache_kwarg(model: nn.Module) -> str:
    """The keyword a model's ``forward`` / ``generate`` take the KV cache by: ``cache`` from transformers 5.25 on
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return _cache_kwarg(type(model))


@functools.cache
def _cache_kwarg(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache of a model / ``generate`` output (``cache`` from transformers 5.25 on, ``past_key_values``
    before), or None."""
    cache = getattr(output, "cache", None)
    return getattr(output, "past_key_values", None) if cache is None else cache


def layer_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache handed to a decoder layer / attention module (``past_key_values``, or ``cache`` in the newest
    transformers 5.x), or None."""
    cache = kwargs.get("past_key_values")
    return kwargs.get("cache") if cache is None else cache


def attn_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any, Any]:
    """(hidden_states, position_embeddings, cache) of a ``self_attn`` call (pre-hook arguments)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    pos = kwargs.get("position_embeddings")
    if pos is None and len(args) > 1:
        pos = args[1]
    return hidden, pos, layer_cache(kwargs)


def self_attns(adapter: Any) -> list[nn.Module]:
    """The ``self_attn`` module of every decoder layer of the adapter's language model."""
    return [layer.self_attn for layer in adapter.decoder_layers]


class AttentionTap:
    """Forward pre-hooks keeping the latest ``(hidden_states, position_embeddings)`` given to each ``self_attn``.

    The references live until the next forward of that layer (no copies). ``latest(i)`` is what layer ``i`` is
    processing right now when read from inside its ``cache.update``. With ``history=n`` the tap also keeps the
    inputs of the decoding steps since the last prefill, enough of them to cover the last ``n`` tokens
    (``history[i]``: oldest first), for policies that score recent tokens by their own queries (ZipVL).
    """

    def __init__(self, adapter: Any, history: int = 0):
        self.inputs: dict[int, tuple[torch.Tensor, Any]] = {}
        self.history_tokens = history
        self.history: dict[int, list[tuple[torch.Tensor, Any]]] = {}
        self.modules = self_attns(adapter)
        self._handles = [
            m.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(self.modules)
        ]

    def _hook(self, idx: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden, pos, cache = attn_input(args, kwargs)
            self.inputs[idx] = (hidden, pos)
            if not self.history_tokens:
                return
            past = cache.get_seq_length(idx) if cache is not None else 0
            if past == 0 and hidden.shape[1] > 1:  # prefill of a new request
                self.history[idx] = []
                return
            buf = self.history.setdefault(idx, [])
            buf.append((hidden, pos))
            while sum(h.shape[1] for h, _ in buf) - buf[0][0].shape[1] >= self.history_tokens:
                buf.pop(0)

        return hook

    def latest(self, idx: int) -> tuple[nn.Module, torch.Tensor, Any]:
        """(self_attn module, hidden_states (B, L, hidden), (cos, sin)) of layer ``idx``'s current call."""
        hidden, pos = self.inputs[idx]
        return self.modules[idx], hidden, pos

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.inputs.clear()
        self.history.clear()


# --------------------------------------------------------------------------------------------------
# attention routing
# --------------------------------------------------------------------------------------------------
_PREFIX = "mmfast_routed_"
#: handler(module, query, key, value, attention_mask, fallback, **kwargs) -> (attn_output (B, L, H, D), weights)
Handler = Callable[..., tuple[torch.Tensor, Any]]


def _fallback(module: nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    orig = module.config._attn_implementation.removeprefix(_PREFIX)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(orig, eager)


def _routed_attention(
    module: nn.Module, query: torch.Tensor, key: Any, value: Any, attention_mask: Any, **kwargs: Any
):
    if isinstance(key, PackedStep):  # a decode step over a compressed cache (packed_decode)
        out = packed_decode_attention(module, query, key.parts(), attention_mask, **kwargs)
        if out is not None:
            return out
        key, value = key.dense(query.dtype)
    fallback = _fallback(module)
    handler = getattr(module, "_mmfast_attention", None)
    if handler is None:
        return fallback(module, query, key, value, attention_mask, **kwargs)
    return handler(module, query, key, value, attention_mask, fallback, **kwargs)


def _register(orig: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _PREFIX + orig
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _routed_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[orig])  # same masks as before
    return name


def _route_configs(adapter: Any) -> Callable[[], None]:
    """Point the language model's configs at the routed attention function; returns the undo function (a no-op
    when they already are: routing is shared by :func:`route_attention` and :func:`packed_decode`)."""
    configs = {id(c): c for c in [adapter.language_model.config, *(m.config for m in self_attns(adapter))]}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    if any(v and v.startswith(_PREFIX) for v in saved.values()):
        return lambda: None
    for k, c in configs.items():
        c._attn_implementation = _register(saved[k] or "sdpa")

    def undo() -> None:
        for k, c in configs.items():
            c._attn_implementation = saved[k]

    return undo


def route_attention(adapter: Any, handler: Handler) -> Callable[[], None]:
    """Send every attention call of the adapter's language model to ``handler``; returns the undo function.

    ``handler`` receives the original implementation as ``fallback`` and must return what it returns.
    """
    modules = self_attns(adapter)
    if any(hasattr(m, "_mmfast_attention") for m in modules):
        from mmfast.errors import IncompatibleAcceleratorError

        raise IncompatibleAcceleratorError("Another method already routes this model's attention (one at a time).")
    unroute = _route_configs(adapter)
    for m in modules:
        m._mmfast_attention = handler

    def undo() -> None:
        for m in modules:
            if hasattr(m, "_mmfast_attention"):
                del m._mmfast_attention
        unroute()

    return undo


def _mark_packed(module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Pre-hook: tell the cache layer of this call that its attention function reads a packed step."""
    layers = getattr(layer_cache(kwargs), "layers", None) or []
    layer = layers[module.layer_idx] if module.layer_idx < len(layers) else None
    if hasattr(layer, "packed_call") and (module.config._attn_implementation or "").startswith(_PREFIX):
        layer.packed_call = True


def packed_decode(adapter: Any) -> Callable[[], None]:
    """Let decode steps of the adapter's language model over a compressed cache attend over its packed parts with
    the ``packed_attention`` kernel (when the kernel is selected: ``MMFAST_KERNEL_IMPL=triton``, or CUDA once
    ``GPU_VERIFIED["packed_attention"]``; a no-op when it cannot be); returns the undo function. Anything else runs
    as before: other caches, prefill, calls the kernel does not cover (see :mod:`mmfast.kernels.packed_attention.hf`).

    Covers the families whose attention calls ``past_key_values.update`` then the registered attention function
    with ``module.layer_idx`` (every supported family: Llama / Qwen2 / Qwen2-VL text stacks); routing stacks with
    :func:`route_attention` (ZipVL's sparse prefill) in either order.
    """
    impl = kernel_impl()
    if impl == "torch" or (impl == "auto" and not GPU_VERIFIED["packed_attention"]):
        return lambda: None  # the kernel cannot be selected: nothing to route
    unroute = _route_configs(adapter)
    handles = [m.register_forward_pre_hook(_mark_packed, with_kwargs=True) for m in self_attns(adapter)]

    def undo() -> None:
        for h in handles:
            h.remove()
        unroute()

    return undo
