"""ARGenAdapter over transformers' Emu3 (Emu3-Gen) text-to-image generation.

Emu3 (Wang et al., 2024, "Emu3: Next-Token Prediction is All You Need") generates an image as ordinary text
tokens: after ``<bos>{prompt}<|image start|>{h}*{w}<|image token|>`` the language model emits ``h`` rows of ``w``
visual tokens (``<|visual token 000000|>`` ...), each row followed by an end-of-line token ``<|extra_200|>``, then
EOF / EOI / EOS. transformers runs it as plain ``generate`` with a prefix-constrained logits processor (visual
tokens, or the forced EOL / EOF / EOI / EOS) and classifier-free guidance against a negative prompt
(``UnbatchedClassifierFreeGuidanceLogitsProcessor``: CFG on log-softmaxed scores).

:class:`Emu3Adapter` presents this as a plain raster grid of ``codebook_size`` visual tokens: the session feeds the
EOL token itself after the last token of every row, returns log-probabilities (over the full vocabulary, so CFG
is bit-identical to transformers') restricted to the visual ids in codebook order, and batches the negative prompt
as the unconditional rows. Visual-token index ``k`` is VQ codebook entry ``k``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmfast.errors import InvalidInputError, UnsupportedModelError
from mmfast.models.argen import ARGenAdapter, Sampling, load_hf_generator, to_pil
from mmfast.models.janus import CachedLMSession, hf_sampling_kwargs

#: The negative prompt of Emu3's official image-generation example.
EMU3_NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst "
    "quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)


class Emu3Session(CachedLMSession):
    """An Emu3 generation request: prompt rows (cond, then negative under CFG) prefilled into a KV cache; image
    positions map to the token stream with one EOL token after each row."""

    def __init__(self, adapter: Emu3Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: int) -> None:
        model = adapter.model
        super().__init__(model.model.text_model, attention_mask, batch, adapter.num_tokens)
        self.model = model
        self.input_ids = input_ids  # (B', S), left-padded
        self.cfg = input_ids.shape[0] == 2 * batch
        self.width = adapter.grid[1]
        self.visual_ids = adapter.visual_token_ids.to(input_ids.device)
        self.eol_token_id = adapter.eol_token_id
        # generate() numbers a left-padded row's tokens 0..n-1 (position ids from the attention mask); tokens after
        # the prompt continue from n, per row
        self.offsets = attention_mask.sum(dim=1, keepdim=True)  # (B', 1)

    def _stream_len(self, n: int) -> int:
        return n + n // self.width  # n visual tokens + the EOL of every completed row

    def _visual_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B', T, D) → (B', T, V) float32 log-probabilities of the visual tokens (log-softmax over the FULL vocab,
        as transformers' CFG processor takes it, then restricted: CFG then matches it bit for bit)."""
        logp = self.model.lm_head(hidden).float().log_softmax(dim=-1)
        return logp.index_select(-1, self.visual_ids)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """→ (B', 1, V) float32 visual-token log-probabilities for image position 0."""
        if self._prefill_raw is not None:
            self.truncate(0)
            return self._prefill_raw
        pos = (self.prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self._run(self.model.get_input_embeddings()(self.input_ids), pos)
        self._prefill_raw = self._visual_logprobs(hidden[:, -1:])
        return self._prefill_raw

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed visual tokens (B, L) (codebook indices) at consecutive image positions (L,) → (B', L, V);
        ``[:, j]`` predicts position ``positions[j] + 1`` (at a row end: the output of the EOL fed after it; for
        the last image position: the EOL's output, meaningless)."""
        p0, n = self._check_feed(tokens, positions)
        tok = self.visual_ids[tokens.to(self.visual_ids.device, torch.long)]  # (B, L) vocabulary ids
        if self.cfg:
            tok = torch.cat([tok, tok], dim=0)
        cols, out_idx, t = [], [], 0
        for j, p in enumerate(range(p0, p0 + n)):
            cols.append(tok[:, j : j + 1])
            t += 1
            if (p + 1) % self.width == 0:  # row end: Emu3 always continues with EOL
                cols.append(torch.full_like(tok[:, :1], self.eol_token_id))
                t += 1
            out_idx.append(t - 1)
        stream = torch.cat(cols, dim=1)  # (B', T)
        start = self._stream_len(p0)
        pos = self.offsets + start + torch.arange(stream.shape[1], device=stream.device)
        hidden = self._run(self.model.get_input_embeddings()(stream), pos)
        self.length = p0 + n
        return self._visual_logprobs(hidden[:, out_idx])


class Emu3Adapter(ARGenAdapter):
    """Text-to-image with ``Emu3ForConditionalGeneration`` (Emu3-Gen).

    Args:
        model: an ``Emu3ForConditionalGeneration``.
        processor: its ``Emu3Processor``.
        image_area: pixels of the generated image (default: ``config.image_area`` as in the original Emu3-Gen
            config, else the processor's 720x720); with ``ratio`` it fixes the token grid like the processor does.
        ratio: ``"W:H"`` aspect ratio.
        negative_prompt: text of the unconditional (CFG) rows, formatted like the prompts (with the image prefix,
            as Emu3's official inference code does). ``""`` gives a prompt-free unconditional branch.
    """

    family = "emu3"
    conditioning = "text"
    string_prompts = True

    def __init__(
        self,
        model: Any,
        processor: Any,
        image_area: int | None = None,
        ratio: str = "1:1",
        negative_prompt: str = EMU3_NEGATIVE_PROMPT,
    ) -> None:
        super().__init__()
        from transformers import Emu3ForConditionalGeneration

        if not isinstance(model, Emu3ForConditionalGeneration):
            raise UnsupportedModelError(
                f"Emu3Adapter needs an Emu3ForConditionalGeneration, got {type(model).__name__}."
            )
        self.model = model.eval()
        self.processor = processor
        self.negative_prompt = negative_prompt
        self.ratio = ratio
        self.image_area = int(image_area or getattr(model.config, "image_area", None) or processor.image_area)
        rows, cols = processor.calculate_generate_size(ratio, self.image_area, processor.downsample_ratio)
        if rows < 1 or cols < 1:
            raise InvalidInputError(f"image_area={self.image_area} with ratio {ratio} gives an empty token grid.")
        self.grid = (int(rows), int(cols))
        vocab = model.vocabulary_mapping
        self.codebook_size = int(model.config.vq_config.codebook_size)
        img2bpe = vocab.img2bpe
        if sorted(img2bpe) != list(range(self.codebook_size)) or vocab.eol_token_id is None:
            raise UnsupportedModelError(
                f"Emu3 vocabulary_map has {len(img2bpe)} visual tokens for a codebook of {self.codebook_size} "
                "(or no <|extra_200|> end-of-line token)."
            )
        #: (V,) vocabulary id of visual token k (= codebook entry k)
        self.visual_token_ids = torch.tensor([img2bpe[k] for k in range(self.codebook_size)], dtype=torch.long)
        self.eol_token_id = int(vocab.eol_token_id)

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | Path, dtype: torch.dtype | str | None = None, device: Any = None, **kwargs: Any
    ) -> Emu3Adapter:
        """Load model + processor through transformers' ``from_pretrained`` (``dtype`` defaults to float32)."""
        model, processor = load_hf_generator(path_or_id, "emu3", "Emu3ForConditionalGeneration", dtype, device)
        return cls(model, processor, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # conditioning
    # ------------------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> Any:
        """``processor(text=..., return_for_image_generation=True)`` at this adapter's grid → ``input_ids`` /
        ``attention_mask`` (B, S), left-padded, ending with ``<|image start|>{h}*{w}<|image token|>``."""
        enc = self.processor(
            text=self.parse_conditions(prompts),
            return_for_image_generation=True,
            ratio=self.ratio,
            image_area=self.image_area,
            return_tensors="pt",
            padding=True,
        )
        enc.pop("image_sizes", None)
        return enc

    def encode_negative(self, batch: int) -> Any:
        """The negative prompt (formatted like the prompts) repeated ``batch`` times."""
        return self.encode_prompts([self.negative_prompt] * batch)

    def session(self, conditions: list[Any], sampling: Sampling) -> Emu3Session:
        enc = self.encode_prompts(conditions)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        batch = ids.shape[0]
        if sampling.cfg:
            neg = self.encode_negative(batch)
            ids, mask = _left_pad_cat([ids, neg["input_ids"]], [mask, neg["attention_mask"]], self._pad_id())
        device = self.model.device
        return Emu3Session(self, ids.to(device), mask.to(device), batch)

    def _pad_id(self) -> int:
        pad = self.processor.tokenizer.pad_token_id
        return int(pad if pad is not None else self.model.config.get_text_config().pad_token_id or 0)

    # ------------------------------------------------------------------------------------------------------
    # transformers' own generation path
    # ------------------------------------------------------------------------------------------------------

    def prefix_allowed_tokens_fn(self, prompt_len: int) -> Any:
        """The prefix constraint of transformers' Emu3 image-generation example, for prompts of ``prompt_len``
        tokens: visual tokens, EOL after every row, then EOF, EOI, EOS, pad."""
        rows, cols = self.grid
        tok = self.processor.tokenizer
        visual = self.visual_token_ids.tolist()
        eol, eof = [self.eol_token_id], [tok.convert_tokens_to_ids(tok.eof_token)]
        eoi, eos, pad = [tok.convert_tokens_to_ids(tok.eoi_token)], [tok.eos_token_id], [self._pad_id()]

        def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            offset = input_ids.shape[0] - prompt_len + 1  # 1 right after <|image token|>
            if offset % (cols + 1) == 0:
                return eol
            if offset == (cols + 1) * rows + 1:
                return eof
            if offset == (cols + 1) * rows + 2:
                return eoi
            if offset == (cols + 1) * rows + 3:
                return eos
            return pad if offset > (cols + 1) * rows + 3 else visual

        return allowed

    @torch.inference_mode()
    def reference_generate(self, prompts: list[str], sampling: Sampling, **kwargs: Any) -> Any:
        """transformers' own path: ``model.generate`` with the prefix constraint and (under CFG) the negative prompt
        through ``negative_prompt_ids``. Extra kwargs go to ``generate`` (e.g. ``output_scores=True``).

        Returns:
            ``(tokens, out)``: (B, N) visual-token indices and the raw ``generate`` output (dict-like).
        """
        enc = self.encode_prompts(prompts).to(self.model.device)
        prompt_len = enc["input_ids"].shape[1]
        rows, cols = self.grid
        kw = hf_sampling_kwargs(sampling)
        if sampling.cfg:
            neg = self.encode_negative(enc["input_ids"].shape[0]).to(self.model.device)
            kw.update(negative_prompt_ids=neg["input_ids"], negative_prompt_attention_mask=neg["attention_mask"])
        out = self.model.generate(
            **enc,
            prefix_allowed_tokens_fn=self.prefix_allowed_tokens_fn(prompt_len),
            max_new_tokens=rows * (cols + 1) + 3,
            return_dict_in_generate=True,
            **kw,
            **kwargs,
        )
        seq = out.sequences[:, prompt_len : prompt_len + rows * (cols + 1)].reshape(-1, rows, cols + 1)[..., :cols]
        lookup = torch.full((int(self.visual_token_ids.max()) + 1,), -1, dtype=torch.long)
        lookup[self.visual_token_ids] = torch.arange(self.codebook_size)
        return lookup[seq.reshape(seq.shape[0], -1).cpu()], out

    # ------------------------------------------------------------------------------------------------------
    # image side
    # ------------------------------------------------------------------------------------------------------

    def codebook_embeddings(self) -> torch.Tensor:
        """(V, D) VQ codebook vectors (``vqmodel.quantize.embedding.weight``; row k = visual token k)."""
        return self.model.model.vqmodel.quantize.embedding.weight.detach()

    def token_embeddings(self) -> torch.Tensor:
        """(V, hidden) the LLM's input embeddings of the visual tokens, in codebook order."""
        emb = self.model.get_input_embeddings().weight
        return emb[self.visual_token_ids.to(emb.device)].detach().float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """(B, N) visual-token indices (raster order) → B PIL images through the Emu3 VQ decoder ([-1, 1] pixels),
        as ``model.decode_image_tokens`` does after dropping the EOL column."""
        rows, cols = self.grid
        if tokens.ndim != 2 or tokens.shape[1] != rows * cols:
            raise InvalidInputError(f"Emu3 decode needs (B, {rows * cols}) tokens, got {tuple(tokens.shape)}.")
        grid = tokens.to(self.model.device, torch.long).reshape(-1, rows, cols)
        return to_pil(self.model.model.vqmodel.decode(grid))


def _left_pad_cat(ids: list[torch.Tensor], masks: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack left-padded (B_i, S_i) batches into one (ΣB_i, max S_i) batch, padding on the left."""
    width = max(t.shape[1] for t in ids)
    out_ids = [torch.nn.functional.pad(t, (width - t.shape[1], 0), value=pad_id) for t in ids]
    out_masks = [torch.nn.functional.pad(m, (width - m.shape[1], 0), value=0) for m in masks]
    return torch.cat(out_ids), torch.cat(out_masks)
