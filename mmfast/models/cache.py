"""A transformers-5 KV cache that KV-stage accelerators can compress inside ``generate``.

Each decoder layer gets a :class:`CompressedLayer` (a ``DynamicLayer``). After the layer's update the
registered policies (:class:`~mmfast.accel.base.KVAccelerator`) may evict or merge entries. Two numbers
keep positions right after entries are dropped:

* ``get_seq_length()`` returns the number of tokens *seen* (``cumulative_length``), so ``generate`` keeps
  giving new tokens their true absolute positions (cached keys already carry their RoPE rotation);
* ``get_mask_sizes()`` reports the *stored* length plus the query, with the stored entries placed just
  before the query, so every stored entry stays visible and the causal order inside a chunk is kept.

Batch size 1 is the supported case for eviction (with left padding, evicted rows would shift the padding mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

if TYPE_CHECKING:  # pragma: no cover
    from mmfast.accel.base import KVAccelerator
    from mmfast.models.vlm import Span


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


class CompressedLayer(DynamicLayer):
    """A dynamic cache layer whose stored entries can be evicted / merged by policies."""

    def __init__(self, layer_idx: int, policies: list[KVAccelerator], shared: dict[str, Any]):
        super().__init__()
        self.layer_idx = layer_idx
        self.policies = policies
        self.shared = shared
        self.cumulative_length = 0
        self.prompt_len = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self.cumulative_length == 0
        self.cumulative_length += key_states.shape[-2]
        if first:
            self.prompt_len = key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = keys, values
        if self.policies:
            ctx = KVContext(
                layer_idx=self.layer_idx,
                phase="prefill" if first else "decode",
                seen=self.cumulative_length,
                new=key_states.shape[-2],
                prompt_len=self.prompt_len,
                spans=self.shared.get("spans", []),
                shared=self.shared,
            )
            for policy in self.policies:
                if policy.wants_update(ctx):
                    self.keys, self.values = policy.compress(self.keys, self.values, ctx)
        # This step attends over everything it had before compressing; compression affects later steps.
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.cumulative_length - stored

    def stored_length(self) -> int:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("A compressed KV cache cannot be cropped (entries were evicted).")

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.prompt_len = 0

    def nbytes(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return tensor_bytes(self.keys) + tensor_bytes(self.values)


class CompressedCache(DynamicCache):
    """``DynamicCache`` made of :class:`CompressedLayer` s sharing one list of policies."""

    def __init__(self, num_layers: int, policies: list[KVAccelerator], shared: dict[str, Any] | None = None):
        self.shared: dict[str, Any] = shared if shared is not None else {}
        Cache.__init__(self, layers=[CompressedLayer(i, policies, self.shared) for i in range(num_layers)])


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def kv_bytes(cache: Any) -> int:
    """Real bytes held by a transformers cache (keys + values + any quantization metadata)."""
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
        else:
            total += tensor_bytes(getattr(layer, "keys", None)) + tensor_bytes(getattr(layer, "values", None))
    return total


def stored_tokens(cache: Any) -> int:
    """Entries stored in the first layer (what the cache holds, not what it has seen)."""
    layers = getattr(cache, "layers", [])
    if not layers or getattr(layers[0], "keys", None) is None or layers[0].keys.numel() == 0:
        return 0
    return int(layers[0].keys.shape[-2])
