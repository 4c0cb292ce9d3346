"""VLMAdapter: the one place that knows how a Hugging Face VLM family is put together.

Accelerators never touch a model directly; they talk to an adapter, which gives them

* **vision stage**: the visual tokens of each image / video as the language model would read them
  (:class:`VisualTokens`: features plus their grid coordinates), computed by the model's *own*
  ``get_image_features`` / ``get_video_features`` exactly as ``generate`` calls them;
* **prefill stage**: the decoder layers (:attr:`VLMAdapter.decoder_layers`) to hook;
* **kv stage**: a :class:`~mmfast.models.cache.CompressedCache` built for the language model;
* metadata: :class:`Span` s giving where every image / frame sits in the prompt. Nothing hard-codes token
  counts or offsets: they are read off the processor outputs and the feature shapes.

Generation always goes through :meth:`VLMAdapter.generate`: encode → vision methods → rebuild the prompt
(placeholder runs resized, embeddings scattered, family position ids) → ``model.generate(inputs_embeds=...)``.
With no method attached the rebuilt prompt is the one the model would build itself, so the answer is
token-identical to plain ``model.generate`` (tested on every family).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from transformers import BatchFeature, PreTrainedModel

from mmfast.errors import IncompatibleAcceleratorError, InvalidInputError, UnsupportedModelError
from mmfast.models.cache import CompressedCache, kv_bytes, stored_tokens

# --------------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------------


@dataclass
class VisualTokens:
    """The visual tokens of one image or one video, in the order the language model reads them.

    Attributes:
        features: (N, D) embeddings in the LLM's input space (after the projector).
        coords: (N, 4) long, per token ``(g, t, y, x)``: sub-grid (e.g. anyres base view 0 / high-res view 1),
            frame / temporal index, row, column. Layout tokens that carry no patch (LLaVA-OneVision's
            newline) have ``x == -1``; a row newline keeps its row ``y``, a trailing newline has ``y == -1``.
        source: (N,) long, index of the original token each token stands in for (its anchor: the token whose
            sequence position and position id it takes). Strictly increasing.
        sizes: (N,) float, how many original tokens each token represents (1 unless merged).
        kind: ``"image"`` or ``"video"``.
        index: which image / video of the prompt this is.
        token_id: the placeholder token id these tokens fill in ``input_ids``.
        n_original: number of tokens before any reduction.
        grids: per sub-grid ``g``: ``(rows, cols)`` of the original layout.
    """

    features: torch.Tensor
    coords: torch.Tensor
    source: torch.Tensor
    sizes: torch.Tensor
    kind: str
    index: int
    token_id: int
    n_original: int
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def layout_mask(self) -> torch.Tensor:
        """(N,) bool: True for layout tokens (newlines) that reductions keep as they are."""
        return self.coords[:, 3] < 0

    @property
    def num_frames(self) -> int:
        t = self.coords[:, 1]
        return int(t.max().item()) + 1 if len(t) and t.max() >= 0 else 1

    def select(self, idx: torch.Tensor) -> VisualTokens:
        """Keep the tokens at ``idx`` (any order in; sorted by anchor out)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.features.device)
        idx = idx[torch.argsort(self.source[idx])]
        return replace(
            self,
            features=self.features[idx],
            coords=self.coords[idx],
            source=self.source[idx],
            sizes=self.sizes[idx],
        )

    def with_tokens(
        self, features: torch.Tensor, coords: torch.Tensor, source: torch.Tensor, sizes: torch.Tensor
    ) -> VisualTokens:
        """A copy holding new tokens, sorted by anchor."""
        order = torch.argsort(source)
        return replace(self, features=features[order], coords=coords[order], source=source[order], sizes=sizes[order])

    @classmethod
    def from_grid(
        cls,
        features: torch.Tensor,
        blocks: Sequence[tuple[int, int, int, int, bool]],
        *,
        kind: str,
        index: int,
        token_id: int,
    ) -> VisualTokens:
        """Build from a layout given as blocks ``(g, frames, rows, cols, newline_per_row)`` in reading order,
        plus an optional trailing newline block ``(g, 0, 0, 0, True)`` (one token with ``y = x = -1``)."""
        coords = []
        grids: dict[int, tuple[int, int]] = {}
        for g, frames, rows, cols, newline in blocks:
            if frames == 0:  # a single trailing newline token
                coords.append(torch.tensor([[g, -1, -1, -1]]))
                continue
            grids[g] = (rows, cols)
            t, y, x = torch.meshgrid(
                torch.arange(frames), torch.arange(rows), torch.arange(cols + (1 if newline else 0)), indexing="ij"
            )
            x = torch.where(x == cols, torch.full_like(x, -1), x) if newline else x
            c = torch.stack([torch.full_like(t, g), t, y, x], dim=-1).reshape(-1, 4)
            coords.append(c)
        coords_t = torch.cat(coords).to(features.device)
        n = features.shape[0]
        if coords_t.shape[0] != n:
            raise UnsupportedModelError(
                f"Could not infer the layout of {n} visual tokens (expected {coords_t.shape[0]} from the config)."
            )
        return cls(
            features=features,
            coords=coords_t,
            source=torch.arange(n, device=features.device),
            sizes=torch.ones(n, device=features.device),
            kind=kind,
            index=index,
            token_id=token_id,
            n_original=n,
            grids=grids,
        )


@dataclass
class Span:
    """Where one image, or one frame of a video, sits in the (possibly reduced) prompt: ``[start, end)``."""

    kind: str  # "image" | "frame" | "video"
    item: int  # index of the image / video in the prompt
    start: int
    end: int
    frame: int | None = None

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class GenerationResult:
    """What :meth:`VLMAdapter.generate` returns."""

    new_tokens: torch.Tensor  # (new,) generated ids
    text: str
    stats: dict[str, Any]
    spans: list[Span]


# --------------------------------------------------------------------------------------------------
# the adapter
# --------------------------------------------------------------------------------------------------


class VLMAdapter:
    """Family-agnostic part of the adapter. Subclasses implement :meth:`_items` (and prompt quirks)."""

    kind: ClassVar[str] = "vlm"
    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    supports_video: ClassVar[bool] = True
    #: how reduced prompts get position ids: "compact" renumbers 0..L'-1 (what a shorter prompt would get);
    #: "original" keeps each kept token's original position (FastV-style). M-RoPE families keep the original
    #: 3-D positions of kept visual tokens either way.
    position_policy: str = "compact"

    def __init__(self, model: PreTrainedModel, processor: Any):
        self.model = model
        self.processor = processor
        self.config = model.config
        self.text_config = model.config.get_text_config(decoder=True)
        self.vision_methods: list[Any] = []
        self.prefill_methods: list[Any] = []
        self.kv_methods: list[Any] = []
        self._last_spans: list[Span] = []
        self._gen_prompt_len: int | None = None

    # ---- accelerator registration --------------------------------------------------------------
    def add_accelerator(self, acc: Any) -> None:
        from mmfast.accel.base import Stage

        for stage in acc.stages:
            if stage == Stage.VISION:
                self.vision_methods.append(acc)
            elif stage == Stage.PREFILL:
                self.prefill_methods.append(acc)
            elif stage == Stage.KV:
                self.kv_methods.append(acc)
            else:
                raise IncompatibleAcceleratorError(f"{acc.spec()} acts on the decode loop of AR image models.")

    def remove_accelerator(self, acc: Any) -> None:
        for lst in (self.vision_methods, self.prefill_methods, self.kv_methods):
            while acc in lst:
                lst.remove(acc)

    # ---- model structure ------------------------------------------------------------------------
    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def token_id(self, kind: str) -> int:
        """The placeholder token id of ``"image"`` or ``"video"`` inputs."""
        attr = "image_token_id" if kind == "image" else "video_token_id"
        for src in (self.config, self.processor):
            tid = getattr(src, attr, None)
            if tid is None and src is self.config:
                tid = getattr(src, attr.replace("_id", "_index"), None)
            if tid is not None:
                return int(tid)
        raise UnsupportedModelError(f"{type(self.model).__name__} has no {kind} placeholder token.")

    # ---- prompts ---------------------------------------------------------------------------------
    def build_prompt(self, question: str, kind: str, n_visual: int = 1) -> str:
        """The chat-templated prompt (as transformers' image-text-to-text pipeline builds it)."""
        content: list[dict[str, Any]] = [{"type": kind} for _ in range(n_visual)]
        content.append({"type": "text", "text": question})
        messages = [{"role": "user", "content": content}]
        template = getattr(self.processor, "chat_template", None)
        if template:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.fallback_prompt(question, kind, n_visual)

    def fallback_prompt(self, question: str, kind: str, n_visual: int) -> str:
        token = getattr(self.processor, f"{kind}_token", f"<{kind}>")
        return f"USER: {token * n_visual}\n{question} ASSISTANT:"

    def preprocess(
        self, question: str, images: Sequence[Any] | None = None, video: Any | None = None
    ) -> BatchFeature:
        """Processor outputs for one prompt with ``images`` (PIL list) or one ``video`` ((T,H,W,3) uint8)."""
        if video is not None:
            if not self.supports_video:
                raise UnsupportedModelError(f"{type(self.model).__name__} has no video input.")
            prompt = self.build_prompt(question, "video")
            inputs = self.processor(text=[prompt], videos=[video], return_tensors="pt", **self.video_kwargs())
        else:
            prompt = self.build_prompt(question, "image", len(images or []))
            inputs = self.processor(text=[prompt], images=list(images or []), return_tensors="pt")
        return inputs.to(self.device)

    def video_kwargs(self) -> dict[str, Any]:
        """Extra processor kwargs for videos (frames are sampled by mmfast.media, not by the processor)."""
        return {"do_sample_frames": False}

    # ---- encoding -------------------------------------------------------------------------------
    def _encode(self, modality: str, inputs: BatchFeature) -> Any:
        """Call the model's own ``get_{modality}_features`` with the kwargs ``generate`` would pass."""
        fn = getattr(self.model.model, f"get_{modality}_features")
        params = inspect.signature(fn).parameters
        kwargs = {k: inputs[k] for k in params if k != "kwargs" and k in inputs}
        return fn(**kwargs, return_dict=True).pooler_output

    def visual_tokens(self, inputs: BatchFeature) -> list[VisualTokens]:
        """Visual tokens of every image, then every video, of a single prompt (batch size 1)."""
        raise NotImplementedError

    def encode(self, inputs: BatchFeature) -> list[VisualTokens]:
        """:meth:`visual_tokens`, unless an attached vision method encodes itself: a method with an
        ``encode(adapter, inputs)`` hook (merging inside the ViT, its own projector) may return the items, or
        None to leave the default path (its ``reduce`` still runs afterwards)."""
        for method in self.vision_methods:
            hook = getattr(method, "encode", None)
            if hook is not None:
                items = hook(self, inputs)
                if items is not None:
                    return items
        return self.visual_tokens(inputs)

    # ---- prompt rebuilding -----------------------------------------------------------------------
    def original_position_ids(self, inputs: BatchFeature) -> torch.Tensor | None:
        """Position ids ``generate`` would use for the full prompt, or None when they are just 0..L-1."""
        return None

    def build_inputs(self, inputs: BatchFeature, items: list[VisualTokens]) -> tuple[dict[str, Any], list[Span]]:
        """Rebuild the prompt around (possibly reduced) visual tokens.

        Returns ``generate`` kwargs (``input_ids``, ``attention_mask``, ``inputs_embeds`` and, when the family
        needs them, ``position_ids`` / ``mm_token_type_ids``) and the visual spans of the new prompt.
        """
        ids = inputs["input_ids"]
        if ids.shape[0] != 1:
            raise InvalidInputError("build_inputs handles one prompt at a time (batch size 1).")
        ids = ids[0]
        keep = torch.ones_like(ids, dtype=torch.bool)
        anchors: list[torch.Tensor] = []  # original sequence positions of each item's kept tokens
        used: dict[int, int] = {}
        for item in items:
            positions = (ids == item.token_id).nonzero().flatten()
            start = used.get(item.token_id, 0)
            mine = positions[start : start + item.n_original]
            if mine.numel() != item.n_original:
                raise UnsupportedModelError(
                    f"The prompt has {positions.numel()} placeholder tokens for {item.kind}s, fewer than the "
                    f"{start + item.n_original} visual tokens the model produced."
                )
            used[item.token_id] = start + item.n_original
            src = item.source.to(mine.device)
            if src.numel() > 1 and bool((src.diff() <= 0).any()):
                raise UnsupportedModelError("Reduced visual tokens must have distinct, sorted anchors.")
            keep[mine] = False
            keep[mine[src]] = True
            anchors.append(mine[src])
        kept_pos = keep.nonzero().flatten()
        new_ids = ids[kept_pos][None]
        embeds = self.model.get_input_embeddings()(new_ids)
        # map original positions → new positions to scatter the features
        new_index = torch.full_like(ids, -1)
        new_index[kept_pos] = torch.arange(kept_pos.numel(), device=ids.device)
        spans: list[Span] = []
        for item, anchor in zip(items, anchors):
            where = new_index[anchor]
            embeds[0, where] = item.features.to(embeds.dtype)
            spans.extend(self._spans(item, where))
        out: dict[str, Any] = {
            "input_ids": new_ids,
            "attention_mask": torch.ones_like(new_ids),
            "inputs_embeds": embeds,
        }
        if "mm_token_type_ids" in inputs:
            out["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, kept_pos]
        pos = self.original_position_ids(inputs)
        if pos is not None:
            out["position_ids"] = self.reduce_position_ids(pos, kept_pos)
        elif self.position_policy == "original" and kept_pos.numel() != ids.numel():
            out["position_ids"] = kept_pos[None].clone()
        return out, spans

    def reduce_position_ids(self, pos: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return pos[..., kept]

    @staticmethod
    def _spans(item: VisualTokens, where: torch.Tensor) -> list[Span]:
        if where.numel() == 0:
            return []
        if item.kind == "image":
            return [Span("image", item.index, int(where.min()), int(where.max()) + 1)]
        spans = []
        t = item.coords[:, 1]
        for f in sorted(set(t.tolist()) - {-1}):
            w = where[t == f]
            spans.append(Span("frame", item.index, int(w.min()), int(w.max()) + 1, frame=int(f)))
        return spans

    # ---- generation -----------------------------------------------------------------------------
    def make_cache(self, spans: list[Span]) -> Any | None:
        if not self.kv_methods:
            return None
        return CompressedCache(self.num_layers, list(self.kv_methods), shared={"spans": spans})

    def generation_prompt_length(self) -> int:
        """Tokens the chat template's generation prompt adds (e.g. ``<|im_start|>assistant\n``); 1 without one."""
        if self._gen_prompt_len is None:
            n = 1
            template = getattr(self.processor, "chat_template", None)
            if template:
                msgs = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
                with_gp, without = (
                    self.tokenizer(self.processor.apply_chat_template(msgs, add_generation_prompt=g, tokenize=False),
                                   add_special_tokens=False)["input_ids"]
                    for g in (True, False)
                )
                if len(with_gp) > len(without) and with_gp[: len(without)] == without:
                    n = len(with_gp) - len(without)
            self._gen_prompt_len = n
        return self._gen_prompt_len

    @torch.inference_mode()
    def generate(self, inputs: BatchFeature, **gen_kwargs: Any) -> GenerationResult:
        """Answer one preprocessed prompt with the attached methods; greedy unless ``do_sample=True``.

        ``answer_from_kv=True`` (with a KV method attached): prefill the prompt without the chat template's
        generation prompt, let the KV methods compress that cache, then feed the generation prompt and decode, so
        even the first answer token reads the compressed cache (otherwise it comes from the full-precision prefill
        and a one-word answer never sees the compression). ``prefill_ms`` then times the first chunk.
        """
        t0 = time.perf_counter()
        answer_from_kv = bool(gen_kwargs.pop("answer_from_kv", False))
        items = self.encode(inputs)
        n_in = sum(it.n_original for it in items)
        for method in self.vision_methods:
            items = [method.reduce(it) for it in items]
        gen_inputs, spans = self.build_inputs(inputs, items)
        self._last_spans = spans
        cache = self.make_cache(spans)
        if cache is not None:
            gen_inputs["past_key_values"] = cache

        marks: dict[str, Any] = {}

        def on_forward(_module: Any, _args: Any, output: Any) -> None:
            if "prefill_end" not in marks:
                marks["prefill_end"] = time.perf_counter()
                pkv = getattr(output, "past_key_values", None)
                marks["kv_prefill"] = kv_bytes(pkv)
                marks["kv_tokens_prefill"] = stored_tokens(pkv)

        kwargs = {"do_sample": False, "max_new_tokens": 32}
        kwargs.update(gen_kwargs)
        kwargs.setdefault("pad_token_id", self._pad_id())
        handle = self.model.register_forward_hook(on_forward)
        try:
            if answer_from_kv and cache is not None:
                self._prefill_head(gen_inputs, self.generation_prompt_length())
            out = self.model.generate(**gen_inputs, **kwargs, return_dict_in_generate=True)
        finally:
            handle.remove()
        t_end = time.perf_counter()
        prompt_len = gen_inputs["input_ids"].shape[1]
        new = out.sequences[0, prompt_len:]
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        prefill_end = marks.get("prefill_end", t_end)
        n_new = int(new.numel())
        stats = {
            "visual_tokens_in": n_in,
            "visual_tokens_kept": sum(len(it) for it in items),
            "prompt_tokens": int(prompt_len),
            "vision_crops": self.vision_crops(inputs),
            "kv_bytes": int(marks.get("kv_prefill", 0)),
            "kv_bytes_end": int(kv_bytes(out.past_key_values)),
            "kv_tokens": int(marks.get("kv_tokens_prefill", 0)),
            "kv_tokens_end": int(stored_tokens(out.past_key_values)),
            "prefill_ms": (prefill_end - t0) * 1e3,
            "decode_ms": (t_end - prefill_end) * 1e3,
            "new_tokens": n_new,
        }
        stats["decode_ms_per_token"] = stats["decode_ms"] / max(n_new - 1, 1)
        return GenerationResult(new_tokens=new, text=text, stats=stats, spans=spans)

    def _prefill_head(self, gen_inputs: dict[str, Any], tail: int) -> None:
        """Run the prompt minus its last ``tail`` tokens into ``gen_inputs["past_key_values"]`` (the KV methods
        compress it), then all but the last prompt token one at a time; ``generate`` continues from that cache
        with the last one. One token per forward because an eviction policy may keep a different number of
        entries per layer, which a multi-token causal mask (built from layer 0's length) cannot describe."""
        total = gen_inputs["input_ids"].shape[1]
        cache = gen_inputs["past_key_values"]
        start = total - tail
        if start < 1:
            return
        for lo, hi in [(0, start), *((t, t + 1) for t in range(start, total - 1))]:
            chunk = {k: gen_inputs[k][:, lo:hi] for k in ("inputs_embeds", "mm_token_type_ids") if k in gen_inputs}
            chunk["attention_mask"] = gen_inputs["attention_mask"][:, :hi]
            if "position_ids" in gen_inputs:
                chunk["position_ids"] = gen_inputs["position_ids"][..., lo:hi]
            self.model(**chunk, past_key_values=cache, use_cache=True)

    @staticmethod
    def vision_crops(inputs: BatchFeature) -> int:
        """How many images / tiles / frames the vision tower encodes for this prompt (for FLOP counts)."""
        n = 0
        pv = inputs.get("pixel_values")
        if pv is not None and pv.ndim in (4, 5):
            n += pv.shape[0] if pv.ndim == 4 else pv.shape[0] * pv.shape[1]
        pvv = inputs.get("pixel_values_videos")
        if pvv is not None and pvv.ndim == 5:
            n += pvv.shape[0] * pvv.shape[1]
        return n

    def _pad_id(self) -> int | None:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        return pad if pad is not None else getattr(tok, "eos_token_id", None)


# --------------------------------------------------------------------------------------------------
# registry of adapters by model_type
# --------------------------------------------------------------------------------------------------
ADAPTERS: dict[str, type[VLMAdapter]] = {}


def register_adapter(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    for mt in cls.model_types:
        ADAPTERS[mt] = cls
    return cls


def adapter_for(model: PreTrainedModel, processor: Any) -> VLMAdapter:
    """The adapter for ``model`` (chosen by ``config.model_type``)."""
    import mmfast.models.llava  # noqa: F401  (registers adapters)
    import mmfast.models.qwen_vl  # noqa: F401

    mt = getattr(model.config, "model_type", "")
    if mt not in ADAPTERS:
        raise UnsupportedModelError(
            f"No mmfast adapter for model_type {mt!r} ({type(model).__name__}). "
            f"Supported: {', '.join(sorted(ADAPTERS))}."
        )
    return ADAPTERS[mt](model, processor)
