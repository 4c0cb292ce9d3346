"""VLMAdapter: the one place that knows how a Hugging Face VLM family is put together.

Accelerators never touch a model directly; they talk to an adapter (one small subclass per family in
:mod:`mmfast.models.llava` / :mod:`mmfast.models.qwen_vl`), which gives them

* **vision stage**: the visual tokens of each image / video as the language model would read them
  (:class:`~mmfast.types.VisualTokens`: features plus grid coordinates and anchors), computed by the model's *own*
  ``get_image_features`` / ``get_video_features`` exactly as ``generate`` calls them, optionally with per-token
  tower statistics (:meth:`VLMAdapter.visual_tokens` with a :class:`~mmfast.models.vision.TowerProbe`: the tower's
  attention and keys mapped through the family's layout); the tower as plain ViT blocks
  (:meth:`VLMAdapter.vision_tower`, for merging inside it); the tower features of every crop before the
  projector, the projector, and the family's layout of pooled crops (:meth:`VLMAdapter.tower_features`,
  :meth:`VLMAdapter.project`, :meth:`VLMAdapter.grid_items`, for a method with its own pooling / projector);
* **prefill stage**: a :class:`~mmfast.models.prefill.PrefillStage` calling the methods inside the decoder layers;
* **kv stage**: a :class:`~mmfast.models.cache.CompressedCache` built for the language model;
* metadata: :class:`~mmfast.types.Span` s giving where every image / frame sits in the prompt. Nothing hard-codes
  token counts or offsets: they are read off the processor outputs and the feature shapes.

What a family offers beyond the basics is listed in ``capabilities`` (methods name what they need in
``requires``). Generation always goes through :meth:`VLMAdapter.generate`: encode -> vision methods -> rebuild the
prompt (placeholder runs resized, embeddings scattered, family position ids) -> ``model.generate(inputs_embeds=
...)`` with the prefill stage and the compressed cache. With no method attached the rebuilt prompt is the one the
model would build itself, so the answer is token-identical to plain ``model.generate`` (tested on every family).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import BatchFeature, PreTrainedModel

from mmfast.errors import IncompatibleAcceleratorError, InvalidInputError, UnsupportedModelError
from mmfast.models.attention import cache_kwarg, output_cache, packed_decode
from mmfast.models.cache import CompressedCache, kv_bytes, stored_tokens
from mmfast.models.prefill import PrefillStage
from mmfast.models.stream import StreamLayout
from mmfast.models.vision import TowerProbe, VisionTower
from mmfast.types import Span, Stage, VisualTokens


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
    #: what the family offers beyond the basics: "tower_probe" (tower attention / keys per token),
    #: "vit_blocks" (:meth:`vision_tower`), "tower_features" (:meth:`tower_features` / :meth:`project` /
    #: :meth:`grid_items`), "video_stream" (the ``stream_*`` methods: video fed chunk by chunk)
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: PreTrainedModel, processor: Any):
        self.model = model
        self.processor = processor
        self.config = model.config
        self.text_config = model.config.get_text_config(decoder=True)
        self.vision_methods: list[Any] = []
        self.prefill_methods: list[Any] = []
        self.kv_methods: list[Any] = []
        self.stream_methods: list[Any] = []
        self._last_spans: list[Span] = []
        self._gen_prompt_len: int | None = None

    # ---- accelerator registration --------------------------------------------------------------
    def add_accelerator(self, acc: Any) -> None:
        for stage in acc.stages:
            if stage == Stage.VISION:
                self.vision_methods.append(acc)
            elif stage == Stage.PREFILL:
                self.prefill_methods.append(acc)
            elif stage == Stage.KV:
                self.kv_methods.append(acc)
            elif stage == Stage.STREAM:
                self.stream_methods.append(acc)
            else:
                raise IncompatibleAcceleratorError(f"{acc.spec()} acts on the decode loop of AR image models.")

    def remove_accelerator(self, acc: Any) -> None:
        for lst in (self.vision_methods, self.prefill_methods, self.kv_methods, self.stream_methods):
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

    @property
    def min_image_side(self) -> int:
        """Smallest image side the model can see anything in: one patch of its vision tower (1 if unknown)."""
        vc = getattr(self.config, "vision_config", None)
        patch = getattr(vc, "patch_size", None) if vc is not None else None
        return int(patch) if isinstance(patch, int) and patch > 0 else 1

    @property
    def context_length(self) -> int | None:
        """The language model's context in tokens (``max_position_embeddings``), or None if the config has none."""
        n = getattr(self.text_config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

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

    def visual_tokens(self, inputs: BatchFeature, probe: TowerProbe | None = None) -> list[VisualTokens]:
        """Visual tokens of every image, then every video, of a single prompt (batch size 1).

        With a ``probe`` (and the ``"tower_probe"`` capability) each item's ``tower`` dict holds the wanted
        statistics of the last tower layer feeding the features, aligned with its tokens (0 on layout tokens):
        ``"attention"`` (N,) and ``"keys"`` (N, C); a statistic the tower cannot give, or a prompt whose layout
        could not be matched, is left out."""
        raise NotImplementedError

    def encode(self, inputs: BatchFeature) -> list[VisualTokens]:
        """:meth:`visual_tokens`, unless an attached vision method encodes itself (its ``encode`` hook returns the
        items: merging inside the ViT, its own projector); that method's ``reduce`` still runs afterwards."""
        for method in self.vision_methods:
            items = method.encode(self, inputs)
            if items is not None:
                return items
        return self.visual_tokens(inputs)

    @property
    def tower_layers(self) -> int:
        """How many vision tower layers feed the LLM tokens."""
        raise NotImplementedError

    def vision_tower(self, inputs: BatchFeature) -> VisionTower | None:
        """This prompt's image crops and the tower as plain ViT blocks (``"vit_blocks"``), or None when the tower
        is not a plain ViT or the prompt's layout cannot take merged tokens (e.g. videos pooled after the
        projector, anyres grids that are interpolated)."""
        return None

    def tower_features(self, inputs: BatchFeature, modality: str) -> torch.Tensor | None:
        """(crops, s * s, D_vision): the selected tower hidden states of every ``"image"`` crop / ``"video"`` frame,
        before the projector, as ``get_*_features`` selects them; None when the prompt has no such input."""
        raise NotImplementedError

    def native_side(self, modality: str) -> int:
        """Side of the square grid the LLM natively reads per crop (``"image"``) or per frame (``"video"``)."""
        raise NotImplementedError

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The family's projector (vision width -> LLM width)."""
        raise NotImplementedError

    def grid_items(self, inputs: BatchFeature, modality: str, grids: torch.Tensor) -> list[VisualTokens]:
        """Lay out projected ``grids`` (crops, n, n, D), one per crop / frame of :meth:`tower_features`, as the
        family lays out its own features (anyres base view + unpadded tiles with row newlines, frames, trailing
        newline), with anchors into the native layout."""
        raise NotImplementedError

    # ---- streaming (the streaming-video-qa task, mmfast.models.stream) --------------------------------------
    #: frames the tower encodes together (Qwen: a temporal patch); a stream is fed in chunks of this many frames
    stream_chunk: ClassVar[int] = 1

    def stream_layout(self, question: str = "") -> StreamLayout:
        """Token ids around the frames of a one-shot video prompt for ``question``: the prefix before the first
        frame, the tokens between consecutive frames (frames-as-images families), the suffix after the last."""
        kind = "video" if self.stream_kind == "video" else "image"
        n = 1 if kind == "video" else 2
        ids = self.tokenizer(self.build_prompt(question, kind, n))["input_ids"]
        tid = self.token_id(kind)
        where = [i for i, t in enumerate(ids) if t == tid]
        if len(where) != n:
            raise UnsupportedModelError(f"{type(self.model).__name__}: the prompt has {len(where)} {kind} placeholders.")
        between = ids[where[0] + 1 : where[1]] if n == 2 else []
        return StreamLayout(prefix=ids[: where[0]], between=between, suffix=ids[where[-1] + 1 :])

    @property
    def stream_kind(self) -> str:
        """``"video"``: one placeholder for the whole video; ``"image"``: one placeholder per frame."""
        return "video"

    def stream_encode(self, frames: Sequence[Any]) -> tuple[VisualTokens, torch.Tensor]:
        """One chunk of frames ((H, W, 3) uint8 each) -> its visual tokens as the model reads them inside a video
        (frame index from 0 within the chunk) and the layout tokens that close a video (e.g. OneVision's trailing
        newline; (0, D) when there are none)."""
        import numpy as np

        inputs = self.preprocess("", video=np.stack([np.asarray(f) for f in frames]))
        item = self.visual_tokens(inputs)[-1]
        trailing = item.layout_mask & (item.coords[:, 2] < 0)
        trailer = item.features[trailing]
        item = item.select((~trailing).nonzero().flatten())
        item.extra["stream_inputs"] = inputs
        return item, trailer

    def stream_positions(self, state: Any, kind: str, n: int, item: VisualTokens | None = None) -> torch.Tensor:
        """Position ids of the next ``n`` stream entries of ``kind`` (``"text"``, ``"frame"`` with its ``item``, or
        ``"carrier"``), shape (1, n) for 1-D RoPE, (3, 1, n) for M-RoPE. Default: the stream's counter onwards."""
        start = state.next_position
        state.pending += n
        return torch.arange(start, start + n, device=self.device)[None]

    def stream_answer_position(self, state: Any, last: torch.Tensor) -> None:
        """Prepare ``generate`` to give the token it feeds next the position ``last`` (the question's last token;
        M-RoPE families set their rope deltas); default: nothing (1-D positions follow the cache's counter)."""

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
        elif self.position_policy() == "original" and kept_pos.numel() != ids.numel():
            out["position_ids"] = kept_pos[None].clone()
        return out, spans

    def reduce_position_ids(self, pos: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return pos[..., kept]

    def position_policy(self) -> str:
        """How a reduced prompt is numbered: ``"compact"`` (0..L'-1) unless an attached vision method asks for
        ``"original"`` (each kept token keeps its position). M-RoPE families keep the original 3-D positions of
        kept visual tokens either way."""
        policies = {getattr(m, "positions", "compact") for m in self.vision_methods}
        return "original" if "original" in policies else "compact"

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
            gen_inputs[cache_kwarg(self.model)] = cache
        stage = None
        if self.prefill_methods:
            stage = PrefillStage(self, self.prefill_methods, spans, cache.shared if cache is not None else None)

        marks: dict[str, Any] = {}

        def on_forward(_module: Any, _args: Any, output: Any) -> None:
            if "prefill_end" not in marks:
                _sync(self.device)  # CUDA runs ahead of the host: time the prefill's end, not its launch
                marks["prefill_end"] = time.perf_counter()
                pkv = output_cache(output)
                marks["kv_prefill"] = kv_bytes(pkv)
                marks["kv_tokens_prefill"] = stored_tokens(pkv)

        kwargs = {"do_sample": False, "max_new_tokens": 32}
        kwargs.update(gen_kwargs)
        kwargs.setdefault("pad_token_id", self._pad_id())
        handle = self.model.register_forward_hook(on_forward)
        # decode steps over a compressed cache read its packed parts in the kernel when it is selected (no-op else)
        undo_packed = packed_decode(self) if cache is not None else (lambda: None)
        try:
            with stage if stage is not None else nullcontext():
                if answer_from_kv and cache is not None:
                    self._prefill_head(gen_inputs, self.generation_prompt_length())
                out = self.model.generate(**gen_inputs, **kwargs, return_dict_in_generate=True)
        finally:
            handle.remove()
            undo_packed()
        _sync(self.device)
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
            "kv_bytes_end": int(kv_bytes(output_cache(out))),
            "kv_tokens": int(marks.get("kv_tokens_prefill", 0)),
            "kv_tokens_end": int(stored_tokens(output_cache(out))),
            "prefill_ms": (prefill_end - t0) * 1e3,
            "decode_ms": (t_end - prefill_end) * 1e3,
            "new_tokens": n_new,
        }
        stats["decode_ms_per_token"] = stats["decode_ms"] / max(n_new - 1, 1)
        if stage is not None:  # per layer: tokens processed, tokens attention ran among, probe rows
            stats["prefill_layers"] = stage.records
        return GenerationResult(new_tokens=new, text=text, stats=stats, spans=spans)

    # ---- batched generation ----------------------------------------------------------------------
    #: False for a family whose prompts cannot be left-padded into one ``generate`` call
    batchable: ClassVar[bool] = True

    def batch_blocker(self, gen_kwargs: dict[str, Any]) -> str | None:
        """Why :meth:`generate_batch` cannot answer several prompts in one ``generate`` call with the attached
        methods and ``gen_kwargs``, or None when it can. Vision methods batch (they act on each prompt before the
        prompts are padded); prefill / KV / stream methods keep per-prompt state inside the decoder or the cache."""
        if not self.batchable:
            return f"{type(self).__name__} does not batch"
        others = [m.spec() for m in (*self.prefill_methods, *self.kv_methods, *self.stream_methods)]
        if others:
            return f"{', '.join(dict.fromkeys(others))} act(s) per prompt inside the decoder / KV cache"
        if gen_kwargs.get("answer_from_kv"):
            return "answer_from_kv prefills one prompt at a time"
        return None

    @torch.inference_mode()
    def generate_batch(self, inputs: Sequence[BatchFeature], **gen_kwargs: Any) -> list[GenerationResult]:
        """Answer several preprocessed prompts (each of batch size 1) in ONE ``model.generate`` call.

        Each prompt is encoded, reduced by the vision methods and rebuilt exactly as :meth:`generate` does; the
        rebuilt prompts are then left-padded into (B, L_max) ``inputs_embeds`` / ``attention_mask`` (0 on padding)
        / ``position_ids`` (each row keeps the positions it has alone, so generate continues every row from its own
        last position). Greedy answers equal :meth:`generate`'s one prompt at a time (tested on every family).

        Per-row stats are those of :meth:`generate` for that prompt: visual / prompt / KV token counts and
        ``kv_bytes`` as the row's own unpadded cache would hold them; ``prefill_ms`` / ``decode_ms`` are the
        whole batch's (every row waits for them) and ``batch_size`` says how many rows shared them. Raises
        :class:`~mmfast.errors.IncompatibleAcceleratorError` when :meth:`batch_blocker` gives a reason.
        """
        if len(inputs) == 1:
            return [self.generate(inputs[0], **gen_kwargs)]
        reason = self.batch_blocker(gen_kwargs)
        if reason is not None:
            raise IncompatibleAcceleratorError(f"Cannot batch prompts: {reason}; use batch_size=1.")
        gen_kwargs.pop("answer_from_kv", None)
        t0 = time.perf_counter()
        rows: list[tuple[dict[str, Any], list[Span], int, int, int]] = []
        for inp in inputs:
            items = self.encode(inp)
            n_in = sum(it.n_original for it in items)
            for method in self.vision_methods:
                items = [method.reduce(it) for it in items]
            gen_inputs, spans = self.build_inputs(inp, items)
            rows.append((gen_inputs, spans, n_in, sum(len(it) for it in items), self.vision_crops(inp)))
        batch, lengths = self._left_pad([r[0] for r in rows])

        marks: dict[str, Any] = {}

        def on_forward(_module: Any, _args: Any, output: Any) -> None:
            if "prefill_end" not in marks:
                _sync(self.device)  # CUDA runs ahead of the host: time the prefill's end, not its launch
                marks["prefill_end"] = time.perf_counter()
                marks["kv_prefill"] = kv_bytes(output_cache(output))

        kwargs = {"do_sample": False, "max_new_tokens": 32}
        kwargs.update(gen_kwargs)
        kwargs.setdefault("pad_token_id", self._pad_id())
        handle = self.model.register_forward_hook(on_forward)
        try:
            out = self.model.generate(**batch, **kwargs, return_dict_in_generate=True)
        finally:
            handle.remove()
        _sync(self.device)
        t_end = time.perf_counter()
        width = batch["input_ids"].shape[1]
        per_entry = marks.get("kv_prefill", 0) / (len(rows) * width)  # bytes of one cached token of one row
        prefill_end = marks.get("prefill_end", t_end)
        eos = kwargs.get("eos_token_id", self.model.generation_config.eos_token_id)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        results = []
        for i, (_, spans, n_in, n_kept, crops) in enumerate(rows):
            new = out.sequences[i, width:]
            ends = [j for j, t in enumerate(new.tolist()) if t in eos_ids]
            if ends:  # a finished row is padded after its eos
                new = new[: ends[0] + 1]
            n_new, length = int(new.numel()), lengths[i]
            stats = {
                "visual_tokens_in": n_in,
                "visual_tokens_kept": n_kept,
                "prompt_tokens": length,
                "vision_crops": crops,
                "kv_bytes": round(per_entry * length),
                "kv_bytes_end": round(per_entry * (length + max(n_new - 1, 0))),
                "kv_tokens": length,
                "kv_tokens_end": length + max(n_new - 1, 0),
                "prefill_ms": (prefill_end - t0) * 1e3,
                "decode_ms": (t_end - prefill_end) * 1e3,
                "new_tokens": n_new,
                "batch_size": len(rows),
            }
            stats["decode_ms_per_token"] = stats["decode_ms"] / max(out.sequences.shape[1] - width - 1, 1)
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            results.append(GenerationResult(new_tokens=new, text=text, stats=stats, spans=spans))
        return results

    def _left_pad(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[int]]:
        """Stack rebuilt one-prompt ``generate`` kwargs into a left-padded batch; returns it and the row lengths.

        ``input_ids`` (1, L_i) -> (B, L) padded with the pad id, ``inputs_embeds`` (1, L_i, D) with zeros,
        ``attention_mask`` with 0, ``mm_token_type_ids`` with 0, ``position_ids`` (..., 1, L_i) -> (..., B, L) with 0
        (rows without their own get 0..L_i-1, what ``generate`` numbers an unpadded prompt with)."""
        lengths = [int(r["input_ids"].shape[1]) for r in rows]
        width = max(lengths)
        pad_id = self._pad_id() or 0

        def pad(x: torch.Tensor, value: float, seq_dim: int = -1) -> torch.Tensor:
            n = width - x.shape[seq_dim]
            if n == 0:
                return x
            shape = list(x.shape)
            shape[seq_dim] = n
            return torch.cat([torch.full(shape, value, dtype=x.dtype, device=x.device), x], dim=seq_dim)

        out: dict[str, Any] = {
            "input_ids": torch.cat([pad(r["input_ids"], pad_id) for r in rows]),
            "attention_mask": torch.cat([pad(r["attention_mask"], 0) for r in rows]),
            "inputs_embeds": torch.cat([pad(r["inputs_embeds"], 0.0, seq_dim=1) for r in rows]),
        }
        if any("mm_token_type_ids" in r for r in rows):
            out["mm_token_type_ids"] = torch.cat([pad(r["mm_token_type_ids"], 0) for r in rows])
        if any("position_ids" in r for r in rows):
            pos = [r.get("position_ids") for r in rows]
            ref = next(p for p in pos if p is not None)
            filled = []
            for p, n in zip(pos, lengths):
                if p is None:
                    p = torch.arange(n, device=ref.device, dtype=ref.dtype).expand(*ref.shape[:-1], n)
                filled.append(pad(p, 0))
            out["position_ids"] = torch.cat(filled, dim=-2)
        return out, lengths

    def _prefill_head(self, gen_inputs: dict[str, Any], tail: int) -> None:
        """Run the prompt minus its last ``tail`` tokens into the cache in ``gen_inputs`` (the KV methods
        compress it), then all but the last prompt token one at a time; ``generate`` continues from that cache
        with the last one. One token per forward because an eviction policy may keep a different number of
        entries per layer, which a multi-token causal mask (built from layer 0's length) cannot describe."""
        total = gen_inputs["input_ids"].shape[1]
        key = cache_kwarg(self.model)
        cache = gen_inputs[key]
        start = total - tail
        if start < 1:
            return
        for lo, hi in [(0, start), *((t, t + 1) for t in range(start, total - 1))]:
            chunk = {k: gen_inputs[k][:, lo:hi] for k in ("inputs_embeds", "mm_token_type_ids") if k in gen_inputs}
            chunk["attention_mask"] = gen_inputs["attention_mask"][:, :hi]
            if "position_ids" in gen_inputs:
                chunk["position_ids"] = gen_inputs["position_ids"][..., lo:hi]
            self.model(**chunk, **{key: cache}, use_cache=True)

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


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so host clocks measure finished work (no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
