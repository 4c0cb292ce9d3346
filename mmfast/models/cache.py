"""A transformers-5 KV cache that KV-stage accelerators can compress inside ``generate``.

Each decoder layer gets a :class:`CompressedLayer` (a ``DynamicLayer``). After the layer's update the
registered policies (:class:`~mmfast.accel.base.KVAccelerator`, the :class:`~mmfast.types.KVPolicy` protocol) may evict or merge entries. Two numbers
keep positions right after entries are dropped:

* ``get_seq_length()`` returns the number of tokens *seen* (``cumulative_length``), so ``generate`` keeps
  giving new tokens their true absolute positions (cached keys already carry their RoPE rotation);
* ``get_mask_sizes()`` reports the *stored* length plus the query, with the stored entries placed just
  before the query, so every stored entry stays visible and the causal order inside a chunk is kept.

Stored entries may be *evicted* (dropped, per head if a policy keeps different entries per head: same count per
head keeps the tensor shape), *merged* (a kept entry replaced by a combination of itself and evicted ones), or
*quantized*: a ``role = "quantize"`` policy moves full-precision entries into :class:`KVSegment` s (packed
2/4/8-bit codes, channel-wise keys, token-wise values), which are dequantized on every read. The layer then holds
``segments`` (oldest first) plus a full-precision tail (``keys`` / ``values``: entries not quantized yet, e.g. the
tokens decoded since the last re-compression). :meth:`CompressedLayer.nbytes` counts the bytes really held: codes,
scales, zero-points, masks and the full-precision tail.

Packed decode (:func:`mmfast.models.attention.packed_decode`): when the language model's attention is routed
through mmfast and the ``packed_attention`` kernel is selected (``mmfast.kernels.use_triton``), a decode step (at
most :data:`PACKED_MAX_QUERIES` new tokens) skips the dequantized copy: ``update`` returns a :class:`PackedStep`
(the segments' packed codes and the float tail as kernel parts) in place of both key and value states, and the
routed attention function runs the kernel on it (or, for a call the kernel does not cover, reads
:meth:`PackedStep.dense`). A policy that acts on that step still gets the dequantized view.

Batch size 1 is the supported case for eviction (with left padding, evicted rows would shift the padding mask).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from mmfast.kernels import GPU_VERIFIED, use_triton
from mmfast.kernels.kv_quant import QTensor, dequantize, meta_dtype, quantize
from mmfast.kernels.packed_attention import KVPart, segment_parts
from mmfast.types import KVContext, KVPolicy

#: decode steps with at most this many new tokens may attend over the packed parts (prefill never does)
PACKED_MAX_QUERIES = 16


class KVSegment:
    """Entries stored outside the full-precision tail; :meth:`dequantize` rebuilds them on every read."""

    length: int

    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def nbytes(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


class MixedPrecisionKV(KVSegment):
    """Keys / values (B, kv_heads, S, D) stored at ``bits[0]`` where ``high`` is True and ``bits[1]`` elsewhere.

    Keys: channel-wise asymmetric quantization (one range per (head, channel) over that precision's entries).
    Values: ZipCache's channel-separable token-wise scheme: divide by ``c = sqrt(max_t |v|)`` per (head, channel)
    to flatten outlier channels, then quantize token-wise with one range per token over all its kv heads x D
    channels (as ZipCache's ``true_tokenwise_quantize``: the channel normalisation is what makes one range per
    token work, and it costs 4 bytes of range per token instead of 4 per (token, head)); multiply back on read.
    Rows kept flat under a per-head mask use one range per (token, head). ``16`` bits keeps entries as they are.

    Layout: when every head has the same number of ``high`` entries (one token set per layer, as ZipVL's), the
    entries are regrouped into a dense high block followed by a dense low block (attention does not depend on the
    order of cached entries: all are visible and carry their RoPE), so reading is two dequantizations and a concat.
    Otherwise (after a per-head eviction) each precision keeps its rows flat and the mask ``high`` is stored
    (1 byte per entry) to scatter them back.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, high: torch.Tensor, bits: tuple[int, int]):
        self.shape = tuple(keys.shape)
        self.length = keys.shape[-2]
        high = high.expand(keys.shape[:3]).to(torch.bool)
        counts = high.sum(dim=-1)
        self.high: torch.Tensor | None = None
        self.vscale: torch.Tensor | None = None
        self.parts: list[tuple[int, torch.Tensor | None, Any, Any]] = []  # (bits, row mask or None if dense, k, v)
        if bool((counts == counts.flatten()[0]).all()):
            n_high = int(counts.flatten()[0])
            if 0 < n_high < self.length:  # regroup: high entries first, each group in its original order
                order = torch.argsort((~high).to(torch.int8), dim=-1, stable=True)[..., None].expand(keys.shape)
                keys, values = keys.gather(2, order), values.gather(2, order)
            blocks = [(bits[0], 0, n_high), (bits[1], n_high, self.length)]
            for b, lo, hi in blocks:
                if hi > lo:
                    self._add(b, None, keys[:, :, lo:hi], values[:, :, lo:hi], values)
        else:
            self.high = high.contiguous()
            for b, mask in ((bits[0], high), (bits[1], ~high)):
                self._add(b, mask, keys, values, values)

    def _add(
        self, bits: int, sel: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor, all_values: torch.Tensor
    ) -> None:
        if bits >= 16:
            k = keys if sel is None else keys[sel]
            v = values if sel is None else values[sel]
            self.parts.append((bits, sel, k.contiguous(), v.contiguous()))
            return
        if self.vscale is None:
            c = all_values.float().abs().amax(dim=-2, keepdim=True).sqrt_().clamp_min_(1e-4)
            self.vscale = c.to(meta_dtype(values.dtype))
        k = quantize(keys, bits, "channel", sel)
        v = values.float() / self.vscale.float()
        if sel is None:  # ZipCache's token-wise range spans the whole row (kv_heads x D) of a token
            v = _join_heads(v)
        v = quantize(v, bits, "token", sel, meta=meta_dtype(values.dtype))
        self.parts.append((bits, sel, k, v))

    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.high is None:  # dense blocks
            rows = [self._rows(part, dtype) for part in self.parts]
            if len(rows) == 1:
                return rows[0]
            return torch.cat([k for k, _ in rows], dim=-2), torch.cat([v for _, v in rows], dim=-2)
        keys = torch.empty(self.shape, dtype=dtype, device=self.high.device)
        values = torch.empty_like(keys)
        for part in self.parts:
            keys[part[1]], values[part[1]] = self._rows(part, dtype)
        return keys, values

    def _rows(self, part: tuple[int, Any, Any, Any], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized keys / values of one precision: (B, kv_heads, S, D) if dense, else (M, D) rows of its mask."""
        bits, sel, k, v = part
        if bits >= 16:
            return k.to(dtype), v.to(dtype)
        vs = self.vscale.float()
        if sel is not None:
            vs = vs.expand(self.shape)[sel]
        vals = dequantize(v, torch.float32, sel)
        if sel is None:
            vals = _split_heads(vals, self.shape[1])
        return dequantize(k, dtype, sel), (vals * vs).to(dtype)

    def nbytes(self) -> int:
        total = tensor_bytes(self.high) + tensor_bytes(self.vscale)
        for _, _, k, v in self.parts:
            total += k.nbytes() if isinstance(k, QTensor) else tensor_bytes(k)
            total += v.nbytes() if isinstance(v, QTensor) else tensor_bytes(v)
        return total


def _join_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, 1, S, H * D): one row per token across its heads."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, 1, s, h * d)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`_join_heads`."""
    b, _, s, hd = x.shape
    return x.reshape(b, s, heads, hd // heads).transpose(1, 2)


def read_entries(
    segments: list[KVSegment], keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every stored entry in full precision: the segments dequantized (oldest first), then the float tail."""
    if not segments:
        return keys, values
    parts = [seg.dequantize(dtype) for seg in segments]
    return torch.cat([*(k for k, _ in parts), keys], dim=-2), torch.cat([*(v for _, v in parts), values], dim=-2)


class PackedStep:
    """The entries one decode step attends over, handed to the attention function without a dequantized copy:
    the quantized segments (read as kernel parts) and the float tail whose last entries are the new tokens.

    :meth:`CompressedLayer.update` returns it in place of both key and value states; the routed attention function
    (:func:`mmfast.models.attention.packed_decode`) recognises it. It holds references taken before the policies
    of that step ran (segments are never modified in place), as the step attends over what it had before
    compressing."""

    def __init__(self, segments: list[KVSegment], keys: torch.Tensor, values: torch.Tensor):
        self.segments, self.keys, self.values = list(segments), keys, values

    def parts(self) -> list[KVPart]:
        """Kernel parts: one per precision of every segment, then the tail (causal: it ends with the queries)."""
        out = [part for seg in self.segments for part in segment_parts(seg)]
        return [*out, KVPart(self.keys, self.values, causal=True)]

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantized (B, kv_heads, S, D) keys and values ``update`` returns without the packed path."""
        return read_entries(self.segments, self.keys, self.values, dtype)


class CompressedLayer(DynamicLayer):
    """A dynamic cache layer whose stored entries can be evicted, merged or quantized by policies."""

    is_croppable = False  # evicted entries cannot be restored (assisted generation refuses such caches up front)

    def __init__(self, layer_idx: int, policies: list[KVPolicy], shared: dict[str, Any]):
        super().__init__()
        self.layer_idx = layer_idx
        self.policies = policies
        self.shared = shared
        self.cumulative_length = 0
        self.prompt_len = 0
        self.segments: list[KVSegment] = []  # quantized entries (oldest first), before the full-precision tail
        #: set by the routed attention's pre-hook (``packed_decode``) when this call's attention function reads a
        #: :class:`PackedStep`; the next update consumes it
        self.packed_call = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self.cumulative_length == 0
        self.cumulative_length += key_states.shape[-2]
        positions = None
        if first:
            self.prompt_len = key_states.shape[-2]
            # a prefill-stage method dropped prompt tokens before this layer: its entries keep their original
            # positions, and the layer has seen the whole prompt (kv_stage positions and counts stay absolute)
            kept = self.shared.get("prefill_positions", {}).get(self.layer_idx)
            if kept is not None and kept.numel() == key_states.shape[-2]:
                self.cumulative_length = self.prompt_len = int(self.shared["prefill_length"])
                positions = kept.to(key_states.device).expand(*key_states.shape[:2], -1)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        step = self._packed_step(key_states, first)
        keys = values = None
        if step is None:  # dequantize on read; attention order of entries does not matter (all are visible)
            keys, values = read_entries(self.segments, self.keys, self.values, key_states.dtype)
        if self.policies:
            ctx = KVContext(
                layer_idx=self.layer_idx,
                phase="prefill" if first else "decode",
                seen=self.cumulative_length,
                new=key_states.shape[-2],
                prompt_len=self.prompt_len,
                spans=self.shared.get("spans", []),
                shared=self.shared,
                keys_all=keys,
                positions=positions,
            )
            for policy in self.policies:
                if not policy.wants_update(ctx):
                    continue
                if keys is None:  # a packed step skipped the dequantized view, and a policy reads it
                    keys, values = step.dense(key_states.dtype)
                    ctx.keys_all = keys
                if getattr(policy, "role", "evict") == "quantize":
                    segments, self.keys, self.values = policy.quantize(self.keys, self.values, ctx)
                    self.segments.extend(segments)
                    continue
                if self.segments:  # eviction acts on every stored entry: hand it the dequantized view
                    self.keys, self.values, self.segments = keys, values, []
                    ctx.positions = None
                self.keys, self.values = policy.compress(self.keys, self.values, ctx)
        # This step attends over everything it had before compressing; compression affects later steps.
        if step is not None:
            return step, step
        return keys, values

    def _packed_step(self, key_states: torch.Tensor, first: bool) -> PackedStep | None:
        """The packed view of this update's entries, when its attention reads one and the kernel is selected."""
        packed, self.packed_call = self.packed_call, False
        if not packed or first or key_states.shape[-2] > PACKED_MAX_QUERIES:
            return None
        if not all(isinstance(seg, MixedPrecisionKV) for seg in self.segments):
            return None
        if not use_triton(key_states, verified=GPU_VERIFIED["packed_attention"]):
            return None
        return PackedStep(self.segments, self.keys, self.values)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.cumulative_length - stored

    def stored_length(self) -> int:
        """Entries held: quantized segments plus the full-precision tail."""
        if not self.is_initialized or self.keys is None:
            return 0
        tail = self.keys.shape[-2] if self.keys.dim() == 4 else 0  # before the first update: a 1-D empty tensor
        return sum(seg.length for seg in self.segments) + tail

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("A compressed KV cache cannot be cropped (entries were evicted).")

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.prompt_len = 0
        self.segments = []
        self.packed_call = False

    def nbytes(self) -> int:
        """Bytes really held: the full-precision tail plus every segment's codes, scales, zero-points and masks."""
        if not self.is_initialized or self.keys is None:
            return 0
        return tensor_bytes(self.keys) + tensor_bytes(self.values) + sum(seg.nbytes() for seg in self.segments)


class CompressedCache(DynamicCache):
    """``DynamicCache`` made of :class:`CompressedLayer` s sharing one list of policies (evictions run before
    quantizations, whatever order the methods were attached in)."""

    def __init__(self, num_layers: int, policies: list[KVPolicy], shared: dict[str, Any] | None = None):
        self.shared: dict[str, Any] = shared if shared is not None else {}
        policies = sorted(policies, key=lambda p: getattr(p, "role", "evict") == "quantize")
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
    if layers and hasattr(layers[0], "stored_length"):
        return int(layers[0].stored_length())
    if not layers or getattr(layers[0], "keys", None) is None or layers[0].keys.numel() == 0:
        return 0
    return int(layers[0].keys.shape[-2])
