"""A video stream in a KV cache, chunk by chunk: the engine of the ``streaming-video-qa`` task, on any video family.

:class:`VideoStream` holds one stream: the prompt's prefix is prefilled once; each chunk of frames (one frame, or a
Qwen temporal patch of two) is encoded by the adapter (:meth:`VLMAdapter.stream_encode`), reduced by vision
methods, extended by the stream method (VideoScan's carrier), prefilled on top of the cache, and then the stream
method and streaming KV methods decide what stays. A question prefills the layout tokens that close the video and
the question's text on a *mark* of the cache, decodes with ``generate``, and restores the mark: asking never
changes the stream.

With no method the cache holds exactly what a one-shot ``video-qa`` prompt over the same frames would hold, in the
same order and at the same positions (the prefix, every frame's tokens with the family's separators, the closing
layout tokens, the question), so the answers are the one-shot answers (tested on every video family).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmfast.models.attention import AttentionTap, cache_kwarg, packed_decode
from mmfast.models.cache import CompressedCache, kv_bytes


@dataclass
class StreamLayout:
    """Token ids around the frames of a video prompt (see :meth:`VLMAdapter.stream_layout`)."""

    prefix: list[int]
    between: list[int]
    suffix: list[int]


class StreamCache(CompressedCache):
    """A cache whose position counter (``seen``) may run ahead of the entries it stores (entries dropped), with
    marks to restore after a question."""

    def __init__(self, num_layers: int):
        super().__init__(num_layers, [])

    @property
    def stored(self) -> int:
        return int(self.layers[0].stored_length())

    @property
    def seen(self) -> int:
        return int(self.layers[0].cumulative_length)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep the entries ``idx`` (sorted, same in every layer)."""
        for layer in self.layers:
            idx = idx.to(layer.keys.device)
            layer.keys, layer.values = layer.keys.index_select(-2, idx), layer.values.index_select(-2, idx)

    def set_seen(self, n: int) -> None:
        for layer in self.layers:
            layer.cumulative_length = n

    def mark(self) -> tuple[int, int]:
        return self.stored, self.seen

    def restore(self, mark: tuple[int, int]) -> None:
        stored, seen = mark
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[:, :, :stored], layer.values[:, :, :stored]
            layer.cumulative_length = seen


@dataclass
class FrameContext:
    """What a stream-stage method sees once a chunk is in the cache.

    Attributes:
        frame: index of the chunk's first frame in the stream.
        start, length: cache entries the chunk added (its separator tokens, its visual tokens, what the method
            appended), ``[start, start + length)``.
        inputs: (length, D) the input embeddings of those entries.
        visual: (length,) bool, True for the chunk's visual tokens.
        groups: per cache entry (stored order), the frame it belongs to (-1: prefix).
        cache: the :class:`StreamCache`.
        scratch: the stream's scratch space for the method (kept until ``reset()``).
    """

    frame: int
    start: int
    length: int
    inputs: torch.Tensor
    visual: torch.Tensor
    groups: torch.Tensor
    cache: StreamCache
    scratch: dict[str, Any] = field(default_factory=dict)
    _tap: AttentionTap | None = None
    _positions: Any = None

    def attention(self, row: int) -> torch.Tensor:
        """(stored,) the attention entry ``start + row`` paid to every stored entry, heads and layers averaged
        (recomputed from each layer's input by the probe path)."""
        from mmfast.kernels.probe_attention import probe_attention
        from mmfast.models.attention import project_queries

        if self._tap is None:
            raise RuntimeError("this stream was not prefilled with an attention tap")
        total = None
        for i, layer in enumerate(self.cache.layers):
            module, hidden, pos = self._tap.latest(i)
            q = project_queries(module, hidden, pos, torch.tensor([row], device=hidden.device))
            k_pos = torch.arange(layer.keys.shape[-2], device=hidden.device)
            s = probe_attention(q, layer.keys, torch.tensor([self.start + row], device=hidden.device), k_pos,
                                per_head=True)[0].mean(0)
            total = s if total is None else total + s
        return total / len(self.cache.layers)


@dataclass
class VideoStream:
    """One video stream of an adapter (see the module docstring)."""

    adapter: Any
    vision_methods: Sequence[Any] = ()
    stream_method: Any = None
    kv_methods: Sequence[Any] = ()
    cache: StreamCache | None = None
    layout: StreamLayout | None = None
    frames: int = 0  # frames in the cache
    chunks: int = 0
    groups: list[int] = field(default_factory=list)  # per stored entry: its frame (-1: prefix)
    trailer: torch.Tensor | None = None  # the layout tokens that close the video (from the last chunk's encoding)
    position_state: dict[str, Any] = field(default_factory=dict)  # the adapter's bookkeeping (M-RoPE)
    pending: int = 0  # positions handed out since the last forward
    scratch: dict[str, Any] = field(default_factory=dict)  # the stream method's per-stream state
    last_item: Any = None

    @property
    def next_position(self) -> int:
        """The 1-D position of the next entry: the cache's counter plus what is about to be prefilled."""
        return (0 if self.cache is None else self.cache.seen) + self.pending

    @property
    def compact(self) -> bool:
        return getattr(self.stream_method, "positions", "absolute") == "compact"

    # ---- prefill -------------------------------------------------------------------------------------------
    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor) -> None:
        lm = self.adapter.language_model
        lm(inputs_embeds=embeds[None].to(self.adapter.model.dtype), position_ids=positions, use_cache=True,
           **{cache_kwarg(lm): self.cache})
        self.pending = 0

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.long, device=self.adapter.device)
        return self.adapter.model.get_input_embeddings()(t)

    def start(self) -> None:
        ad = self.adapter
        self.layout = ad.stream_layout()
        self.cache = StreamCache(ad.num_layers)
        n = len(self.layout.prefix)
        self._forward(self._embed_ids(self.layout.prefix), ad.stream_positions(self, "text", n))
        self.groups = [-1] * n

    @torch.inference_mode()
    def add(self, frames: Sequence[Any]) -> None:
        """Prefill one chunk of frames (``adapter.stream_chunk`` of them)."""
        ad = self.adapter
        if self.cache is None:
            self.start()
        item, self.trailer = ad.stream_encode(frames)
        for m in self.vision_methods:
            item = m.reduce(item)
        self.last_item = item
        sep = self._embed_ids(self.layout.between) if self.frames and self.layout.between else None
        feats = item.features
        if self.stream_method is not None:
            feats = self.stream_method.frame_input(feats, self.frames)
        parts, pos = [], []
        if sep is not None:
            parts.append(sep)
            pos.append(ad.stream_positions(self, "text", len(sep)))
        parts.append(item.features)
        pos.append(ad.stream_positions(self, "frame", len(item), item))
        if feats.shape[0] > len(item):  # what the stream method appended (VideoScan's carrier)
            parts.append(feats[len(item) :])
            pos.append(ad.stream_positions(self, "carrier", feats.shape[0] - len(item)))
        embeds = torch.cat(parts)
        start, length = self.cache.stored, embeds.shape[0]
        visual = torch.zeros(length, dtype=torch.bool)
        visual[0 if sep is None else len(sep) : (0 if sep is None else len(sep)) + len(item)] = True
        want_tap = self.stream_method is not None and getattr(self.stream_method, "needs_attention", False)
        tap = AttentionTap(ad) if want_tap else None
        try:
            self._forward(embeds, torch.cat(pos, dim=-1))
            self.groups += [self.frames] * length
            keep = None
            if self.stream_method is not None:
                ctx = FrameContext(self.frames, start, length, embeds, visual, torch.tensor(self.groups), self.cache,
                                   self.scratch, tap)
                keep = self.stream_method.after_frame(ctx)
        finally:
            if tap is not None:
                tap.remove()
        if keep is not None:
            self._keep(keep)
        for m in self.kv_methods:  # streaming KV methods (kv_window): evict over the whole stream
            idx = m.stream_keep(self.cache.stored)
            if idx is not None:
                self._keep(idx)
        if self.compact:
            self.cache.set_seen(self.cache.stored)
        self.frames += len(frames)
        self.chunks += 1

    def _keep(self, idx: torch.Tensor) -> None:
        idx = torch.as_tensor(idx, dtype=torch.long).unique().sort().values
        if idx.numel() == self.cache.stored:
            return
        self.cache.keep(idx)
        self.groups = [self.groups[i] for i in idx.tolist()]

    # ---- questions -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def answer(self, question: str, **gen_kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Answer from the cache; the cache is restored afterwards. Returns (new token ids, timing stats)."""
        import time

        ad = self.adapter
        t0 = time.perf_counter()
        mark, saved = self.cache.mark(), dict(self.position_state)
        try:
            suffix = ad.stream_layout(question).suffix
            parts, pos = [], []
            if self.trailer is not None and self.trailer.shape[0]:
                parts.append(self.trailer)
                pos.append(ad.stream_positions(self, "trailer", self.trailer.shape[0]))
            text = self._embed_ids(suffix)
            parts.append(text)
            pos.append(ad.stream_positions(self, "question", len(suffix)))
            tail = torch.cat(parts)
            positions = torch.cat(pos, dim=-1)
            self._forward(tail[:-1], positions[..., :-1])  # all but the last token: generate feeds that one
            seen = self.cache.seen
            ad.stream_answer_position(self, positions[..., -1:])
            ids = torch.zeros(1, seen + 1, dtype=torch.long, device=ad.device)
            ids[0, -1] = suffix[-1]
            kwargs = {"do_sample": False, "max_new_tokens": 32, "pad_token_id": ad._pad_id(), **gen_kwargs}
            prefill_end = time.perf_counter()
            undo_packed = packed_decode(ad)  # decode steps attend over the stored rows in the kernel when selected
            try:
                out = ad.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                                        **{cache_kwarg(ad.model): self.cache}, **kwargs, return_dict_in_generate=True)
            finally:
                undo_packed()
            new = out.sequences[0, seen + 1 :]
        finally:
            self.cache.restore(mark)
            self.position_state, self.pending = saved, 0
        t_end = time.perf_counter()
        n_new = int(new.numel())
        stats = {
            "question_tokens": int(tail.shape[0]),
            "prefill_ms": (prefill_end - t0) * 1e3,
            "decode_ms": (t_end - prefill_end) * 1e3,
            "new_tokens": n_new,
        }
        stats["decode_ms_per_token"] = stats["decode_ms"] / max(n_new - 1, 1)
        return new, stats

    # ---- state ------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        stored = 0 if self.cache is None else self.cache.stored
        prefix = sum(1 for g in self.groups if g < 0)
        return {
            "frames_seen": self.frames,
            "tokens_held": stored,
            "frame_tokens_held": stored - prefix,
            "kv_bytes": kv_bytes(self.cache),
            "next_position": self.next_position,
        }
