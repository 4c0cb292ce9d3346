"""The prefill stage: methods that act inside the LM's decoder layers while the prompt is prefilled.

:meth:`VLMAdapter.generate <mmfast.models.vlm.VLMAdapter.generate>` runs a :class:`PrefillStage` when a
:class:`~mmfast.accel.base.PrefillAccelerator` is attached. The stage puts a forward pre-hook on every decoder
layer; during prefill (the first forward of a request, more than one token) it calls each method's
``on_layer(ctx)`` before the layers the method asked for, with a :class:`PrefillContext`:

* what the layer is about to read: ``ctx.hidden`` (B, L, D), ``ctx.positions`` (L,) the original prompt position
  of each token still present, ``ctx.visual`` (L,) which of them are visual tokens;
* the probe path: ``ctx.attention(rows)`` recomputes this layer's attention for a few query rows with the layer's
  own projections and RoPE (the shared probe kernel), so every layer keeps sdpa / flash attention;
* two actions: ``ctx.keep(idx)`` keeps only these tokens from this layer on (FastV): their hidden states go on,
  every later layer gets the RoPE angles, mask rows and position ids of the kept tokens' *original* positions,
  and the layer's cache holds only their keys / values; ``ctx.route(idx)`` makes this layer's attention run among
  these tokens only (ZipVL's sparse prefill): the others get a zero attention output and go on through the
  residual and the MLP, their keys / values are still cached.

Decoding is untouched: new tokens get their true positions, and for layers that hold fewer prompt entries the
stage cuts an explicit attention mask (eager attention) down to the entries the layer holds; sdpa decodes without
a mask. Each prefill records per layer the tokens it processed, the tokens attention ran among and the probe rows
(``records``), from which benchmarks count FLOPs without knowing the method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmfast.errors import IncompatibleAcceleratorError
from mmfast.kernels.probe_attention import probe_attention
from mmfast.models.attention import layer_cache, project_keys, project_queries, route_attention
from mmfast.types import Span

#: decoder-layer keyword arguments that carry one entry per token (sliced to the kept tokens)
_TOKEN_KWARGS = ("position_embeddings", "attention_mask", "position_ids", "cache_position")


class PrefillContext:
    """One decoder layer's view of the prompt during prefill (see the module docstring)."""

    def __init__(self, stage: PrefillStage, layer: int, hidden: torch.Tensor, pos_emb: Any):
        self.layer = layer
        self.hidden = hidden  # (B, L, D): the residual stream entering the layer
        self.positions = stage.kept  # (L,) original prompt positions
        self.visual = stage.visual[stage.kept]  # (L,) bool
        self.num_prompt = stage.num_prompt  # prompt length before any drop
        self._decoder = stage.adapter.decoder_layers[layer]
        self._pos_emb = pos_emb
        self._attn_input: torch.Tensor | None = None
        self._keep: torch.Tensor | None = None
        self._route: torch.Tensor | None = None
        self.probe_rows = 0

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[1])

    def attn_input(self) -> torch.Tensor:
        """(B, L, D): what the layer's self-attention reads (the residual stream after ``input_layernorm``)."""
        if self._attn_input is None:
            self._attn_input = self._decoder.input_layernorm(self.hidden)
        return self._attn_input

    def queries(self, rows: Any = None) -> torch.Tensor:
        """(B, heads, R, d) this layer's queries (after RoPE) for ``rows`` (indices into the current tokens)."""
        return project_queries(self._decoder.self_attn, self.attn_input(), self._pos_emb, rows)

    def keys(self) -> torch.Tensor:
        """(B, kv_heads, L, d) this layer's keys (after RoPE), as it will cache them."""
        return project_keys(self._decoder.self_attn, self.attn_input(), self._pos_emb)

    def attention(self, rows: torch.Tensor, *, per_head: bool = False, normalize: bool = False) -> torch.Tensor:
        """Column sums of this layer's causal attention over the query ``rows``: (B, kv_heads, L) summed over the
        query heads of each KV group, or (B, heads, L) with ``per_head`` (see :func:`probe_attention`)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.hidden.device)
        self.probe_rows += int(rows.numel())
        return probe_attention(self.queries(rows), self.keys(), rows, per_head=per_head, normalize=normalize)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only the tokens ``idx`` (indices into the current tokens) from this layer on."""
        self._keep = torch.as_tensor(idx, dtype=torch.long, device=self.hidden.device).unique().sort().values

    def route(self, idx: torch.Tensor) -> None:
        """Run this layer's attention among the tokens ``idx`` only (sorted indices into the current tokens)."""
        self._route = torch.as_tensor(idx, dtype=torch.long, device=self.hidden.device).sort().values


class PrefillStage:
    """Calls prefill-stage methods inside the decoder layers of one adapter (a context manager per request).

    ``shared`` (the KV cache's shared dict when a KV method is stacked) receives ``"prefill_positions"`` (per layer
    whose prompt tokens were dropped, the original positions of the entries it caches) and ``"prefill_length"``, so
    the KV stage keeps working in original positions.
    """

    def __init__(self, adapter: Any, methods: Sequence[Any], spans: list[Span], shared: dict[str, Any] | None = None):
        self.adapter = adapter
        self.methods = list(methods)
        self.spans = spans
        self.shared = shared if shared is not None else {}
        n = adapter.num_layers
        self.by_layer: dict[int, list[Any]] = {}
        for m in self.methods:
            for i in m.layers(n):
                if not 0 <= i < n:
                    raise IncompatibleAcceleratorError(f"{m.spec()} asks for decoder layer {i}; the model has {n}.")
                self.by_layer.setdefault(i, []).append(m)
        self.active = False
        self.records: list[dict[str, int]] = []
        self.routes: dict[int, torch.Tensor | None] = {}
        self.layer_positions: dict[int, torch.Tensor] = {}
        self.kept = torch.zeros(0, dtype=torch.long)
        self.visual = torch.zeros(0, dtype=torch.bool)
        self.num_prompt = 0
        self._handles: list[Any] = []
        self._undo: Any = None

    def __enter__(self) -> PrefillStage:
        self._handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(self.adapter.decoder_layers)
        ]
        if any(getattr(m, "routes_attention", False) for m in self.methods):
            self._undo = route_attention(self.adapter, self._attention)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._undo is not None:
            self._undo()
            self._undo = None

    # ---- the hook ------------------------------------------------------------------------------------
    def _start(self, hidden: torch.Tensor) -> None:
        n = hidden.shape[1]
        self.num_prompt = n
        self.kept = torch.arange(n, device=hidden.device)
        self.visual = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        for span in self.spans:
            self.visual[span.start : span.end] = True
        self.records, self.routes, self.layer_positions = [], {}, {}
        self.shared["prefill_positions"], self.shared["prefill_length"] = self.layer_positions, n

    def _hook(self, i: int) -> Any:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                cache = layer_cache(kwargs)
                past = cache.get_seq_length() if cache is not None else 0
                self.active = past == 0 and hidden.shape[1] > 1
                if self.active:
                    self._start(hidden)
            if not self.active:
                return self._decode_step(i, args, kwargs)
            full = kwargs
            if self.kept.numel() < self.num_prompt:  # the model hands every layer full-length RoPE / mask
                kwargs = _slice(full, self.kept, self.num_prompt)
            ctx = PrefillContext(self, i, hidden, kwargs.get("position_embeddings"))
            for method in self.by_layer.get(i, ()):
                method.on_layer(ctx)
            if ctx._keep is not None and ctx._keep.numel() < hidden.shape[1]:
                if ctx._route is not None:
                    raise IncompatibleAcceleratorError("A prefill method cannot both keep and route in one layer.")
                hidden = hidden[:, ctx._keep]
                self.kept = self.kept[ctx._keep]
                kwargs = _slice(full, self.kept, self.num_prompt)
            self.routes[i] = ctx._route
            if self.kept.numel() < self.num_prompt:
                self.layer_positions[i] = self.kept
            n_i = int(hidden.shape[1])
            attended = n_i if ctx._route is None else min(n_i, int(ctx._route.numel()))
            self.records.append({"layer": i, "tokens": n_i, "attended": attended, "probe_rows": ctx.probe_rows})
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _decode_step(self, i: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Cut an explicit attention mask to the prompt entries this layer holds (eager attention)."""
        pos = self.layer_positions.get(i)
        mask = kwargs.get("attention_mask")
        if pos is None or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            return None
        idx = torch.cat([pos.to(mask.device), torch.arange(self.num_prompt, mask.shape[-1], device=mask.device)])
        return args, {**kwargs, "attention_mask": mask[..., idx]}

    # ---- routed attention (ctx.route) -------------------------------------------------------------------
    def _attention(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
        fallback: Any, **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        """Attention among the routed tokens only; the others get a zero output."""
        keep = self.routes.get(module.layer_idx)
        n = query.shape[2]
        if keep is None or n == 1 or key.shape[2] != n or keep.numel() >= n:
            return fallback(module, query, key, value, mask, **kwargs)
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = mask[:, :, keep][:, :, :, keep]
        out_t, _ = fallback(module, query[:, :, keep], key[:, :, keep], value[:, :, keep], mask, **kwargs)
        out = out_t.new_zeros(out_t.shape[0], n, *out_t.shape[2:])
        out[:, keep] = out_t
        return out, None


def _slice(kwargs: dict[str, Any], idx: torch.Tensor, n: int) -> dict[str, Any]:
    """Decoder-layer kwargs cut to the tokens ``idx`` of an ``n``-token prefill."""
    out = dict(kwargs)
    for key in _TOKEN_KWARGS:
        v = kwargs.get(key)
        if v is None:
            continue
        if key == "position_embeddings":  # (cos, sin), each (..., n, d)
            out[key] = tuple(t.index_select(-2, idx.to(t.device)) for t in v)
        elif key == "attention_mask" and isinstance(v, torch.Tensor) and v.dim() == 4:  # (B, 1, n, n)
            out[key] = v[:, :, idx][:, :, :, idx]
        elif isinstance(v, torch.Tensor) and v.shape[-1] == n:  # position ids / cache positions
            out[key] = v.index_select(-1, idx.to(v.device))
    return out
