"""ARGenAdapter over transformers' Janus / Janus-Pro in image-generation mode.

Janus (Wu et al., 2024, "Janus: Decoupling Visual Encoding for Unified Multimodal Understanding and Generation";
Janus-Pro, Chen et al., 2025) generates an image as a raster of VQ tokens with its Llama language model: the
prompt ends with the begin-of-image token, every image token is embedded by ``generation_embeddings`` +
``generation_aligner`` and predicted by ``generation_head`` (not the text LM head), and classifier-free guidance
doubles the batch with unconditional rows whose prompt tokens (all but BOS and BOI) are replaced by pad.

:class:`JanusAdapter` rebuilds exactly what ``JanusForConditionalGeneration.generate(generation_mode="image")``
does, but as an :class:`~mmfast.models.argen.ARGenSession` whose KV cache (a ``StaticCache`` laid out like
``generate``'s) can be truncated and accepts several image tokens per forward: the baseline loop reproduces
``generate`` token for token (same seed, same settings; float32, and bf16 up to torch.multinomial's own bf16
rounding) and speculative decoders can verify windows of draft tokens.

:class:`CachedLMSession` (shared with :mod:`mmfast.models.emu3`) holds the KV-cache bookkeeping common to sessions
over a transformers decoder: prompt padding mask, explicit position ids, truncation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmfast.errors import ConfigError, InvalidInputError, UnsupportedModelError
from mmfast.models.argen import ARGenAdapter, ARGenSession, Sampling, load_hf_generator, to_pil
from mmfast.models.attention import cache_kwarg


def hf_sampling_kwargs(sampling: Sampling) -> dict[str, Any]:
    """The ``generate`` kwargs meaning the same as ``sampling`` (explicit ``top_k`` so transformers' default 50
    does not apply; ``guidance_scale`` only with CFG)."""
    kw: dict[str, Any] = {
        "do_sample": not sampling.greedy,
        "guidance_scale": sampling.guidance_scale if sampling.cfg else None,
    }
    if not sampling.greedy:
        kw.update(temperature=float(sampling.temperature), top_k=sampling.top_k, top_p=float(sampling.top_p))
    return kw


class CachedLMSession(ARGenSession):
    """KV-cache bookkeeping for a session over a transformers decoder (``LlamaModel``-like ``lm``).

    The prompt (``B'`` rows, left-padded to ``S`` tokens) is prefilled once; image-side tokens are appended to the
    cache (``StaticCache`` of ``max_cache_len`` slots if given, else ``DynamicCache``) and :meth:`truncate` drops
    them again. :meth:`_stream_len` maps ``n`` image tokens to the tokens held after the prompt (Janus: ``n``;
    Emu3 also holds its end-of-line tokens).
    """

    def __init__(
        self, lm: torch.nn.Module, prompt_mask: torch.Tensor, batch: int, num_tokens: int, max_cache_len: int = 0
    ) -> None:
        from transformers import DynamicCache, StaticCache

        self.lm = lm
        # A StaticCache when the reference generation loop uses one: same key layout (unfilled slots masked), so
        # the attention kernels round exactly as they do there (in bf16 a DynamicCache drifts by ~1 bf16 ulp).
        self.cache = (
            StaticCache(config=lm.config, max_cache_len=max_cache_len)
            if max_cache_len
            else DynamicCache(config=lm.config)
        )
        self.prompt_mask = prompt_mask  # (B', S) 1 = token, 0 = left padding
        self.batch = batch
        self.length = 0
        self.num_tokens = num_tokens
        self._prefill_raw: torch.Tensor | None = None

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_mask.shape[1])

    def _run(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """(B', T, D) embeddings at (B', T) positions, appended after everything cached → (B', T, D) hidden states."""
        past = int(self.cache.get_seq_length())
        rows, t = embeds.shape[:2]
        # 2-D padding mask over cache + new tokens; transformers turns it into the causal (B', 1, T, past+T) mask.
        new = torch.ones(rows, past + t - self.prompt_len, dtype=self.prompt_mask.dtype, device=self.prompt_mask.device)
        mask = torch.cat([self.prompt_mask, new], dim=1)
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            **{cache_kwarg(self.lm): self.cache},
            use_cache=True,
        )
        return out.last_hidden_state

    def _crop(self, stream_len: int) -> None:
        """Keep the prompt plus the first ``stream_len`` tokens after it."""
        from transformers import StaticCache

        keep = self.prompt_len + stream_len
        held = int(self.cache.get_seq_length())
        if held <= keep:
            return
        if isinstance(self.cache, StaticCache):
            # Static layers write at `cumulative_length` and mask every slot after the query: moving it back drops
            # the tail (stale slots are overwritten by the next tokens).
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.cumulative_length.fill_(keep)
        else:
            self.cache.crop(keep - held)

    def _check_feed(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[int, int]:
        """Validate a forward call; rewinds the cache if ``positions`` start before :attr:`length`. → (p0, L)."""
        if self._prefill_raw is None:
            raise InvalidInputError("Call session.prefill() before session.forward().")
        if tokens.ndim != 2 or tokens.shape[0] != self.batch or tokens.shape[1] == 0:
            raise InvalidInputError(
                f"tokens must be ({self.batch}, L>0) image tokens, got shape {tuple(tokens.shape)}."
            )
        positions = torch.as_tensor(positions).reshape(-1).cpu().long()
        n = tokens.shape[1]
        p0 = int(positions[0]) if positions.numel() else -1
        if positions.numel() != n or not torch.equal(positions, torch.arange(p0, p0 + n)):
            raise InvalidInputError(f"positions must be {n} consecutive image positions, got {positions.tolist()}.")
        if p0 < 0 or p0 > self.length or p0 + n > self.num_tokens:
            raise InvalidInputError(
                f"Cannot feed image positions {p0}..{p0 + n - 1}: the cache holds {self.length} of "
                f"{self.num_tokens} tokens (feed from position <= {self.length})."
            )
        if p0 < self.length:  # re-feeding a position overwrites everything from it on
            self.truncate(p0)
        return p0, n

    def truncate(self, n: int) -> None:
        """Keep the conditioning plus the first ``n`` image tokens."""
        if not 0 <= n <= self.length:
            raise InvalidInputError(f"truncate({n}): the cache holds {self.length} image tokens.")
        self._crop(self._stream_len(n))
        self.length = n

    def _stream_len(self, n: int) -> int:
        """Tokens held after the prompt when ``n`` image tokens are cached."""
        return n


class JanusSession(CachedLMSession):
    """A Janus image-generation request: prompt rows (cond, then uncond under CFG) prefilled into a KV cache."""

    def __init__(
        self, adapter: JanusAdapter, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: int
    ) -> None:
        model = adapter.model
        # generate() allocates a static cache of max(max_length (default 20), prompt + image tokens) slots; so do we
        cache_len = max(model.generation_config.max_length or 20, input_ids.shape[1] + adapter.num_tokens)
        super().__init__(model.model.language_model, attention_mask, batch, adapter.num_tokens, cache_len)
        self.model = model
        self.input_ids = input_ids  # (B', S)
        self.cfg = input_ids.shape[0] == 2 * batch

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """→ (B', 1, V) generation-head logits (model dtype) for image position 0."""
        if self._prefill_raw is not None:
            self.truncate(0)
            return self._prefill_raw
        embeds = self.model.get_input_embeddings()(self.input_ids)
        # generate() passes no position ids: the LM numbers the padded prompt 0..S-1 (RoPE is relative, so left
        # padding only shifts every row's positions) and image token i sits at S + i.
        pos = torch.arange(self.prompt_len, device=embeds.device).expand(embeds.shape[0], -1)
        hidden = self._run(embeds, pos)
        self._prefill_raw = self.model.model.generation_head(hidden[:, -1:])
        return self._prefill_raw

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed image tokens (B, L) at consecutive image positions (L,) → (B', L, V) logits; ``[:, j]`` predicts
        position ``positions[j] + 1``."""
        p0, n = self._check_feed(tokens, positions)
        tok = tokens.to(self.input_ids.device, torch.long)
        if self.cfg:
            tok = torch.cat([tok, tok], dim=0)
        embeds = self.model.prepare_embeddings_for_image_generation(tok)
        pos = (self.prompt_len + torch.arange(p0, p0 + n, device=embeds.device)).expand(embeds.shape[0], -1)
        hidden = self._run(embeds, pos)
        self.length = p0 + n
        return self.model.model.generation_head(hidden)


class JanusAdapter(ARGenAdapter):
    """Text-to-image with ``JanusForConditionalGeneration`` (Janus, Janus-Pro).

    Args:
        model: a ``JanusForConditionalGeneration``.
        processor: its ``JanusProcessor``.
        use_chat_template: wrap each prompt in the processor's chat template (a user turn + generation prompt) as
            the Janus model card does; plain prompts otherwise, or when the processor has no template.
    """

    family = "janus"
    conditioning = "text"
    string_prompts = True

    def __init__(self, model: Any, processor: Any, use_chat_template: bool = True) -> None:
        super().__init__()
        from transformers import JanusForConditionalGeneration

        if not isinstance(model, JanusForConditionalGeneration):
            raise UnsupportedModelError(
                f"JanusAdapter needs a JanusForConditionalGeneration, got {type(model).__name__}."
            )
        self.model = model.eval()
        self.processor = processor
        self.use_chat_template = use_chat_template
        vq = model.model.vqmodel
        rows, cols = (int(d) for d in vq.quantize.quant_state_dims)
        n_tokens = model.model.vision_model.config.num_image_tokens
        if rows * cols != n_tokens:
            raise UnsupportedModelError(
                f"Janus config mismatch: num_image_tokens={n_tokens} but the VQ grid is {rows}x{cols}."
            )
        self.grid = (rows, cols)
        self.codebook_size = int(vq.config.num_embeddings)
        gen = model.generation_config
        tok = processor.tokenizer
        # the special ids generate() uses for the unconditional rows (generation_config first, as it does)
        self.bos_token_id = gen.bos_token_id if gen.bos_token_id is not None else tok.bos_token_id
        boi = (gen.generation_kwargs or {}).get("boi_token_id")
        self.boi_token_id = boi if boi is not None else tok.convert_tokens_to_ids(tok.boi_token)
        pad = gen.pad_token_id
        if pad is None:  # generate() falls back to eos
            eos = gen.eos_token_id
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        if pad is None:
            pad = tok.pad_token_id
        self.pad_token_id = pad

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | Path, dtype: torch.dtype | str | None = None, device: Any = None, **kwargs: Any
    ) -> JanusAdapter:
        """Load model + processor through transformers' ``from_pretrained`` (``dtype`` defaults to float32)."""
        model, processor = load_hf_generator(path_or_id, "janus", "JanusForConditionalGeneration", dtype, device)
        return cls(model, processor, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # conditioning
    # ------------------------------------------------------------------------------------------------------

    def format_prompt(self, prompt: str) -> str:
        """The text the processor receives (chat template applied if enabled and available)."""
        if self.use_chat_template and getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return prompt

    def encode_prompts(self, prompts: list[str]) -> Any:
        """``processor(text=..., generation_mode="image")``: exactly the inputs ``model.generate`` takes.

        Returns:
            BatchFeature with ``input_ids`` / ``attention_mask`` (B, S), left-padded, ending with BOI.
        """
        texts = [self.format_prompt(p) for p in self.parse_conditions(prompts)]
        return self.processor(text=texts, generation_mode="image", return_tensors="pt", padding=True)

    def session(self, conditions: list[Any], sampling: Sampling) -> JanusSession:
        enc = self.encode_prompts(conditions)
        device = self.model.device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        batch = ids.shape[0]
        if sampling.cfg:
            uncond = ids.clone()
            keep = (uncond == self.bos_token_id) | (uncond == self.boi_token_id)
            uncond.masked_fill_(~keep, self.pad_token_id)
            ids, mask = torch.cat([ids, uncond]), torch.cat([mask, mask])
        return JanusSession(self, ids, mask, batch)

    @torch.inference_mode()
    def reference_generate(self, prompts: list[str], sampling: Sampling, **kwargs: Any) -> torch.Tensor:
        """transformers' own ``model.generate(generation_mode="image")`` with the same prompts and settings.

        For comparisons: after the same ``torch.manual_seed`` it returns the tokens :func:`mmfast.decoding.ar_decode`
        returns. Returns (B, N) image tokens.
        """
        if not sampling.cfg:
            raise ConfigError("transformers' Janus image generation needs guidance_scale > 1.")
        enc = self.encode_prompts(prompts).to(self.model.device)
        return self.model.generate(**enc, generation_mode="image", **hf_sampling_kwargs(sampling), **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # image side
    # ------------------------------------------------------------------------------------------------------

    def codebook_embeddings(self) -> torch.Tensor:
        """(V, D) VQ codebook vectors (``quantize.embedding.weight``; the decoder L2-normalises them)."""
        return self.model.model.vqmodel.quantize.embedding.weight.detach()

    @torch.inference_mode()
    def token_embeddings(self) -> torch.Tensor:
        """(V, hidden) what the LLM reads for each image token: the aligned generation embeddings."""
        ids = torch.arange(self.codebook_size, device=self.model.device)
        return self.model.prepare_embeddings_for_image_generation(ids).detach().float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """(B, N) image tokens → B PIL images through ``model.decode_image_tokens`` (VQ decoder, [-1, 1] pixels)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.num_tokens:
            raise InvalidInputError(f"Janus decode needs (B, {self.num_tokens}) tokens, got {tuple(tokens.shape)}.")
        pixels = self.model.decode_image_tokens(tokens.to(self.model.device, torch.long))  # (B, H, W, 3)
        return to_pil(pixels.permute(0, 3, 1, 2))
