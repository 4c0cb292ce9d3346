"""tiny-vlm: the embedded LLaVA-OneVision-format VLM that mmfast trains on CPU from its synthetic data.

It is the accuracy yardstick of every visual-token reduction and KV method, so it is an instance of the real
``LlavaOnevisionForConditionalGeneration`` (SigLIP vision tower, 2-layer MLP projector, Qwen2 language model) with
the real ``LlavaOnevisionProcessor`` and is loaded by ``from_pretrained`` like any hub checkpoint.

Geometry (the real model's anyres scheme, scaled down): the tower takes 48 px crops, patch 8, so one crop is a
6 x 6 grid of 36 tokens (``vision_feature_select_strategy="full"``). Images are 96 px and
``image_grid_pinpoints=[[96, 96]]``: the processor gives a 48 px base (overview) view of the whole image (36 tokens,
16 px cells) + 2 x 2 full-resolution anyres tiles, packed into a 12 x 12 grid of 8 px cells with 12 row newlines
(156) = 192 visual tokens. A 16-frame clip gives 16 x 9 (48 px frames, 2x2 bilinear pooled) + 1 newline = 145.

Why 48 px crops: with a 96 px tower, a 96 px image gives a base view and one anyres tile that are the *same pixels*,
so every patch reached the language model twice and dropping a random 75% of the visual tokens still left 44% of
the image positions visible (measured: ``random(keep=0.25)`` lost only 4.6 points). Overview + tiles is the
structure the real model has on real (large) images: the detail lives once, in the tiles.

Tokenizer: word level over :func:`mmfast.train.data.vocabulary` plus role / prompt words and the special tokens,
with a Qwen-style chat template (``<|im_start|>user\\n<image>\\nquestion<|im_end|>\\n<|im_start|>assistant\\n``);
answers end with ``<|im_end|>`` (the eos), so generation stops by itself.

Training recipe (:func:`train`, ``mmfast zoo train tiny-vlm``), four stages, all resumable:

1. ``tower``: the vision tower alone with dense per-patch targets (colour, shape, size, region, object centre,
   centre offset and position of the covering object) through a linear head on the very features the projector
   reads, on all 5 crops of each image. A tile cannot know where it sits in the image, so its object patches are
   taught "no position" (``Recipe.tile_position="blank"``): absolute position then reaches the language model
   from the base view only, and a question about one object reads that object's place (left unsupervised, the
   tiles answered as if each were the whole image and held-out position accuracy fell as 1 / number of objects).
   A from-scratch VLM never learns shape at free (off-grid) positions; direct per-patch supervision does.
2. ``image``: tower frozen; projector + newline (higher LR) + language model from scratch on multi-turn sequences
   (up to 10 QAs and the dense description per image, so 192 visual tokens are amortised over ~20 supervised
   tokens), answers-only loss, a 1 -> 6 objects curriculum.
3. ``joint``: images and 16-frame clips (video QA + the clip's dense description) together.
4. ``video``: a second, lower cosine with mostly clips (10 clips + 2 images per step; stage 3: 4 + 8).
   Video was under-fit at the end of stage 3 (training-stream accuracy no better than held-out), and the
   questions that need time (when, order, direction) stayed near chance. ``Recipe.video_hold`` shows stage-4
   clips with each frame held several times (long, redundant videos); the shipped model uses none. Held clips
   (1 / 2 / 4x, 900 more steps from the shipped model) lift 64-frame accuracy from 55.5% to 71.6% (100 clips) but
   cost 16-frame video 3 points (75.4% vs 78.3%, 250 clips), so that fine-tune is not shipped.

The training fast path takes the crops from the real image / video processors (:func:`image_pixels`,
:func:`video_pixels`), runs the tower and projector on them and scatters the features into ``inputs_embeds``;
:func:`image_features` / :func:`video_features` give exactly what the model's own forward packs (tested).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfast.errors import ConfigError, MMFastError
from mmfast.train import data as D

if TYPE_CHECKING:
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        PreTrainedTokenizerFast,
    )

__all__ = [
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "GRID",
    "VIEW_GRID",
    "TOWER_SIZE",
    "IMAGE_TOKENS",
    "NUM_FRAMES",
    "CAPTION_PROMPT",
    "VIDEO_CAPTION_PROMPT",
    "ModelSize",
    "MODEL_SIZES",
    "Recipe",
    "build_tokenizer",
    "build_config",
    "build_processor",
    "build_model",
    "image_pixels",
    "video_pixels",
    "image_features",
    "video_features",
    "SequenceBuilder",
    "tower_targets",
    "train",
    "auto_threads",
    "save_model",
    "plot_curves",
]

IMAGE_SIZE = 96  # data images (the anyres canvas)
TOWER_SIZE = 48  # the tower's crop: one anyres tile, the base view, one video frame
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE  # 12: the detail grid of the 2 x 2 tiles
VIEW_GRID = TOWER_SIZE // PATCH_SIZE  # 6: one crop
N_VIEWS = 1 + (IMAGE_SIZE // TOWER_SIZE) ** 2  # base view + 4 tiles
IMAGE_TOKENS = VIEW_GRID * VIEW_GRID + GRID * (GRID + 1)  # base view + tiles with row newlines = 192
NUM_FRAMES = 16
VIDEO_TOKENS = NUM_FRAMES * math.ceil(VIEW_GRID / 2) ** 2 + 1  # 145
CAPTION_PROMPT = "describe the image."
VIDEO_CAPTION_PROMPT = "describe the video."

PAD, IM_START, IM_END, IMAGE, VIDEO, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, IM_START, IM_END, IMAGE, VIDEO, UNK)  # ids 0..5 in this order
EXTRA_WORDS: tuple[str, ...] = ("user", "assistant", "system", "describe", "the", "image", "video", ".")

# Qwen-style template (as LLaVA-OneVision's): each turn is "<|im_start|>role\n...<|im_end|>\n"; media first.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif c['type'] == 'video' -%}{{ '<video>\n' }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------------------------
# Model, tokenizer, processor
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    """Widths and depths of the tower (SigLIP) and the language model (Qwen2)."""

    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 2
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 8
    text_kv_heads: int = 4
    text_intermediate: int = 768


#: ``default`` is the shipped model; ``tiny`` is for smoke tests (trains a few steps in seconds).
MODEL_SIZES: dict[str, ModelSize] = {
    "default": ModelSize(),
    "tiny": ModelSize(vision_hidden=32, vision_layers=1, vision_heads=1, text_hidden=64, text_layers=1, text_heads=2,
                      text_kv_heads=1, text_intermediate=128),
}


def _words() -> list[str]:
    return sorted(set(D.vocabulary()) | set(EXTRA_WORDS))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer: special tokens (ids 0-5), then the sorted closed vocabulary.

    Text is lowercased and split on whitespace with punctuation isolated (so "star?" -> "star", "?"); newlines of
    the chat template vanish. Unknown words map to ``<unk>``. Decoding joins words with spaces and glues
    punctuation back ("left , small" -> "left, small").
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *_words()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE, "video_token": VIDEO},
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        padding_side="left",  # batched generate needs left padding
    )
    fast.add_special_tokens({"additional_special_tokens": [IM_START]}, replace_extra_special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(size: ModelSize | str = "default") -> LlavaOnevisionConfig:
    """The ``LlavaOnevisionConfig`` of tiny-vlm (``size``: a :class:`ModelSize` or a key of :data:`MODEL_SIZES`)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    if isinstance(size, str):
        if size not in MODEL_SIZES:
            raise ConfigError(f"unknown tiny-vlm size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
        size = MODEL_SIZES[size]
    n_vocab = len(SPECIAL_TOKENS) + len(_words())
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vision = SiglipVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=4 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=TOWER_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=n_vocab,
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=4096,
        # Qwen2's own theta: half of each head's rotary frequencies turn < 0.3 rad over a 192-token image, so
        # attention can match content regardless of where an object sits in the sequence
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False,
        bos_token_id=ids[IM_START],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD],
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids[IMAGE],
        video_token_index=ids[VIDEO],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
        bos_token_id=ids[IM_START],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD],
        # read by mmfast's pipelines: the caption instruction and the default number of video frames
        mmfast_caption_prompt=CAPTION_PROMPT,
        mmfast_num_frames=NUM_FRAMES,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaOnevisionProcessor:
    """The real ``LlavaOnevisionProcessor`` (48 px crops of 96 px images, 48 px video frames, mean = std = 0.5)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    geometry = dict(size={"height": TOWER_SIZE, "width": TOWER_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ip = LlavaOnevisionImageProcessor(**geometry, image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]])
    vp = LlavaOnevisionVideoProcessor(**geometry)
    return LlavaOnevisionProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        video_processor=vp,
        num_image_tokens=VIEW_GRID * VIEW_GRID,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=CHAT_TEMPLATE,
    )


def _sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) 2-D sine-cosine position table (MAE style): x in the first half, y in the second."""
    import torch

    d = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(d, dtype=torch.float32) / d))
    yy, xx = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    ox, oy = xx.flatten()[:, None] * omega, yy.flatten()[:, None] * omega
    table = torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1]))


def build_model(size: ModelSize | str = "default", seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    """A freshly initialised tiny-vlm (fp32). The tower's position table starts as a 2-D sine-cosine table
    (x0.5; still learned), which made shape readable at free positions sooner than the random default."""
    import torch
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    config = build_config(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    emb = model.model.vision_tower.embeddings.position_embedding
    with torch.no_grad():
        emb.weight.copy_(0.5 * _sincos_2d(VIEW_GRID, emb.weight.shape[1]))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
        max_new_tokens=48,
    )
    return model


# ---------------------------------------------------------------------------------------------------------------
# Fast path: pixels -> visual features, exactly as the processor + model compute them
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _media_processors() -> tuple[Any, Any]:
    p = build_processor()
    return p.image_processor, p.video_processor


def image_pixels(images: np.ndarray) -> torch.Tensor:
    """(B, 96, 96, 3) uint8 -> (B, 5, 3, 48, 48): base view + 2 x 2 tiles, by the real image processor."""
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ConfigError(f"expected (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) images, got {tuple(images.shape)}")
    return _media_processors()[0](list(images), return_tensors="pt")["pixel_values"]


def video_pixels(frames: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, T, 3, 48, 48), by the real video processor."""
    if frames.ndim != 5:
        raise ConfigError(f"expected (B, T, H, W, 3) clips, got {tuple(frames.shape)}")
    return _media_processors()[1](list(frames), return_tensors="pt")["pixel_values_videos"]


def _tower(model: LlavaOnevisionForConditionalGeneration, pixels: torch.Tensor, grad: bool) -> torch.Tensor:
    """(N, 3, 48, 48) -> (N, 36, Hv): the hidden state ``vision_feature_layer`` selects."""
    import torch

    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer]


def pack_views(model: LlavaOnevisionForConditionalGeneration, f: torch.Tensor) -> torch.Tensor:
    """(B, 5, v * v, D) projected crops -> (B, v^2 + 2v (2v + 1), D): the base view, then the 2 x 2 tiles as one
    2v x 2v grid in raster order with a newline after each row (``pack_image_features`` for a square 96 px image;
    v = 6: 192 tokens)."""
    import torch

    b, _, nn, d = f.shape
    nt, v = IMAGE_SIZE // TOWER_SIZE, math.isqrt(nn)  # v < 6: crops pooled to v x v (tiny-vlm-flex)
    g = nt * v
    tiles = f[:, 1:].reshape(b, nt, nt, v, v, d).permute(0, 1, 3, 2, 4, 5).reshape(b, g, g, d)
    newline = model.model.image_newline.to(f.dtype).view(1, 1, 1, d).expand(b, g, 1, d)
    tiles = torch.cat([tiles, newline], dim=2).reshape(b, g * (g + 1), d)
    return torch.cat([f[:, 0], tiles], dim=1)


def image_features(model: LlavaOnevisionForConditionalGeneration, pixels: torch.Tensor,
                   tower_grad: bool = True) -> torch.Tensor:
    """(B, 5, 3, 48, 48) from :func:`image_pixels` -> (B, 192, D), exactly ``get_image_features`` + packing."""
    m = model.model
    b = pixels.shape[0]
    f = m.multi_modal_projector(_tower(model, pixels.flatten(0, 1), tower_grad))  # (B*5, 36, D)
    return pack_views(model, f.view(b, N_VIEWS, VIEW_GRID * VIEW_GRID, -1))


def video_features(model: LlavaOnevisionForConditionalGeneration, pixels: torch.Tensor,
                   tower_grad: bool = False) -> torch.Tensor:
    """(B, T, 3, 48, 48) from :func:`video_pixels` -> (B, T * 9 + 1, D): projected frames, 2x2 bilinear pooled,
    then one newline."""
    import torch

    m = model.model
    b, t = pixels.shape[:2]
    f = m.multi_modal_projector(_tower(model, pixels.flatten(0, 1), tower_grad))  # (B*T, 36, D)
    f = m.apply_pooling(f).reshape(b, -1, f.shape[-1])
    newline = m.image_newline.to(f.dtype).view(1, 1, -1).expand(b, 1, -1)
    return torch.cat([f, newline], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------------------------------

# Loss groups of supervised tokens: QA answers (+ their <|im_end|>) and dense descriptions.
G_NONE, G_QA, G_DESC = 0, 1, 2


class SequenceBuilder:
    """Token ids of multi-turn conversations about one image / clip, as the chat template + processor make them.

    ``encode([(question, answer), ...], "image")`` returns ``ids`` (L,) and ``groups`` (L,) where ``groups[t]``
    says whether token ``t`` is a supervised answer token (:data:`G_QA`), a description token (:data:`G_DESC`) or
    context (:data:`G_NONE`). The first user turn carries the visual placeholders (``n_visual`` of them).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        self.tok = tokenizer
        self.vocab = tokenizer.get_vocab()
        self.user = [self.vocab[IM_START], self.vocab["user"]]
        self.assistant = [self.vocab[IM_START], self.vocab["assistant"]]
        self.end = self.vocab[IM_END]
        self.pad = self.vocab[PAD]
        self._cache: dict[str, list[int]] = {}

    def words(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            self._cache[text] = ids
        return ids

    def encode(self, turns: Sequence[tuple[str, str | None]], modality: str, n_visual: int,
               desc_prompts: Sequence[str] = (CAPTION_PROMPT, VIDEO_CAPTION_PROMPT)) -> tuple[list[int], list[int]]:
        """Turns ``(question, answer)``; ``answer=None`` ends with the generation prompt (for evaluation)."""
        media = self.vocab[IMAGE if modality == "image" else VIDEO]
        ids: list[int] = []
        groups: list[int] = []
        for i, (q, a) in enumerate(turns):
            head = self.user + ([media] * n_visual if i == 0 else []) + self.words(q) + [self.end] + self.assistant
            ids += head
            groups += [G_NONE] * len(head)
            if a is None:
                break
            ans = self.words(a) + [self.end]
            ids += ans
            groups += [G_DESC if q in desc_prompts else G_QA] * len(ans)
        return ids, groups


def _collate(seqs: Sequence[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to (B, L) ids and next-token targets (B, L) grouped by loss group (-1 = no loss).

    ``targets[b, t] = (ids[b, t + 1], group)`` packed as ``group * 1_000_000 + id`` is avoided: returns
    ``ids`` and ``tgt_groups`` where ``tgt_groups[b, t]`` is the group of token ``t + 1``.
    """
    import torch

    n = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    grp = torch.zeros((len(seqs), n), dtype=torch.long)
    for b, (i, g) in enumerate(seqs):
        ids[b, : len(i)] = torch.tensor(i)
        grp[b, : len(g) - 1] = torch.tensor(g[1:])
    return ids, grp


def _embed(model: LlavaOnevisionForConditionalGeneration, ids: torch.Tensor, feats: torch.Tensor,
           token_id: int) -> torch.Tensor:
    """Token embeddings with the visual features scattered over the placeholders (as the model's forward does)."""
    emb = model.get_input_embeddings()(ids)
    mask = (ids == token_id).unsqueeze(-1)
    return emb.masked_scatter(mask, feats.to(emb.dtype))


def _lm_hidden(model: LlavaOnevisionForConditionalGeneration, embeds: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (B, L, D) last hidden states; causal only (right padding never leaks backwards)."""
    return model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state


# ---------------------------------------------------------------------------------------------------------------
# Dense tower targets
# ---------------------------------------------------------------------------------------------------------------

#: per-patch classification heads of the tower stage: name -> number of classes (0 = background)
TOWER_CLASSES: dict[str, int] = {"color": 8, "shape": 7, "size": 3, "region": 6, "centre": 2}
TOWER_REGRESS = 4  # centre offset (dx, dy) in patches, object position (x, y) in [-1, 1]


def _grid_targets(scene: D.Scene, grid: int, absolute: bool, tile_position: str = "blank") -> dict[str, np.ndarray]:
    """(grid, grid[, 4]) targets at one cell size. ``absolute=False`` is a tile, which cannot know where it sits in
    the image: ``tile_position="ignore"`` leaves its object cells' region class (-100) and absolute position
    unsupervised (the tower then answers as if the tile were the whole image); ``"blank"`` teaches it to say "no
    position" there (region class 0, absolute position 0), so only the base view's tokens carry absolute-position
    words into the language model (see :meth:`_Trainer._projector_from_head`)."""
    if tile_position not in ("ignore", "blank"):
        raise ConfigError(f"tile_position must be 'ignore' or 'blank', got {tile_position!r}")
    pl = D.patch_labels(scene, grid=grid)
    cell = scene.image_size / grid
    centre = np.zeros((grid, grid), np.int64)
    geom = np.zeros((grid, grid, TOWER_REGRESS), np.float32)
    geom_w = np.zeros((grid, grid, TOWER_REGRESS), np.float32)
    gy, gx = np.mgrid[0:grid, 0:grid]
    blank = tile_position == "blank"
    for j, o in enumerate(scene.objects):
        centre[min(grid - 1, int(o.y // cell)), min(grid - 1, int(o.x // cell))] = 1
        m = pl["object"] == j
        geom[m, 0] = (o.x - (gx[m] + 0.5) * cell) / cell
        geom[m, 1] = (o.y - (gy[m] + 0.5) * cell) / cell
        if absolute:
            geom[m, 2] = 2.0 * o.x / scene.image_size - 1.0
            geom[m, 3] = 2.0 * o.y / scene.image_size - 1.0
        geom_w[m] = (1.0, 1.0, float(absolute or blank), float(absolute or blank))
    out = {k: pl[k] for k in ("color", "shape", "size", "region")}
    if not absolute:
        out["region"] = np.where(pl["object"] >= 0, 0 if blank else -100, 0)
    out["centre"], out["geom"], out["geom_w"] = centre, geom, geom_w
    return out


def tower_targets(scene: D.Scene, tile_position: str = "blank") -> dict[str, np.ndarray]:
    """Per-patch targets of the 5 crops of one scene (base view, then the tiles in raster order), each (5, 36) or
    (5, 36, 4): the covering object's colour / shape / size / region (:func:`mmfast.train.data.patch_labels` at the
    crop's cell size), ``centre`` (1 on the patch holding an object's centre), ``geom`` (offset of that object's
    centre from the patch centre in patches, and its position in [-1, 1]) and ``geom_w`` (which geom entries count)."""
    base = _grid_targets(scene, VIEW_GRID, absolute=True)
    fine = _grid_targets(scene, GRID, absolute=False, tile_position=tile_position)
    nt, v = IMAGE_SIZE // TOWER_SIZE, VIEW_GRID
    out = {}
    for k, b in base.items():
        f = fine[k]
        tiles = f.reshape(nt, v, nt, v, *f.shape[2:]).swapaxes(1, 2).reshape(nt * nt, v * v, *f.shape[2:])
        out[k] = np.concatenate([b.reshape(1, v * v, *b.shape[2:]), tiles], axis=0)
    return out


def _tower_batch(split: str, seed: int, start: int, n: int, tile_position: str = "blank"
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Crops (n * 5, 3, 48, 48) and stacked :func:`tower_targets` (n * 5, 36[, 4]) of images ``start .. start + n - 1``."""
    import torch

    images, targets = [], []
    for i in range(start, start + n):
        scene = D.make_scene(D.sample_rng("image", split, seed, i), split)
        images.append(scene.image)
        targets.append(tower_targets(scene, tile_position))
    y = {k: torch.from_numpy(np.stack([t[k] for t in targets]).reshape(n * N_VIEWS, *targets[0][k].shape[1:]))
         for k in targets[0]}
    return image_pixels(np.stack(images)).flatten(0, 1), y


class TowerHead:
    """Linear per-patch read-out of the tower features: the classes of :data:`TOWER_CLASSES` + 4 regressions."""

    def __init__(self, hidden: int):
        import torch

        self.linear = torch.nn.Linear(hidden, sum(TOWER_CLASSES.values()) + TOWER_REGRESS)

    def loss(self, feats: torch.Tensor, y: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum of per-head cross-entropies + 0.5 x MSE of the geometry on object patches; also accuracies."""
        import torch.nn.functional as F

        out = self.linear(feats).float()  # (N, 36, C)
        total, i, acc = 0.0, 0, {}
        obj = y["color"] > 0
        for k, n in TOWER_CLASSES.items():
            logits = out[..., i:i + n]
            i += n
            total = total + F.cross_entropy(logits.reshape(-1, n), y[k].reshape(-1))
            m = y[k] == 1 if k == "centre" else obj & (y[k] >= 0)  # object patches (centre: recall of centres)
            acc[k] = float((logits.argmax(-1)[m] == y[k][m]).float().mean()) if bool(m.any()) else 0.0
        w = y["geom_w"]
        mse = ((out[..., i:] - y["geom"]).pow(2) * w).sum() / w.sum().clamp(min=1.0)
        return total + 0.5 * mse, acc


# ---------------------------------------------------------------------------------------------------------------
# Recipe and training
# ---------------------------------------------------------------------------------------------------------------

STAGES: tuple[str, ...] = ("tower", "image", "joint", "video")


@dataclass
class Recipe:
    """Every knob of :func:`train` (the defaults are the shipped model's recipe)."""

    size: str = "default"
    seed: int = 0
    # stage 1: tower alone, dense per-patch targets
    tower_steps: int = 2500
    tower_batch: int = 32  # images; x 5 crops
    tower_lr: float = 2e-3
    # tiles cannot know where they sit: "blank" teaches them "no position", so absolute-position words reach the
    # language model from the base view only; "ignore" (the first checkpoint) left them unsupervised, the tower
    # answered as if each tile were the whole image, and the LM learned to read a place regardless of which object
    # was asked about (position accuracy fell as 1 / number of objects)
    tile_position: str = "blank"
    # stage 2: images; tower frozen
    image_steps: int = 3000
    image_batch: int = 16
    curriculum_steps: int = 300  # first steps of stage 2 use 2-3 objects per image (always a choice to make)
    qas_per_image: int = 16
    desc_first: float = 0.2  # fraction of sequences that are only the description turn (as captioning asks)
    # stage 3: images + 16-frame clips
    joint_steps: int = 2000
    joint_image_batch: int = 8
    joint_video_batch: int = 4
    qas_per_clip: int = 12
    # stage 4: more clips (images too, so image skills stay), a second cosine; stage 3 ended with video under-fit
    video_steps: int = 3500
    video_image_batch: int = 2
    video_video_batch: int = 10
    video_lr: float = 0.5  # x lm_lr / projector_lr at the start of stage 4, then cosine to 10% of that
    # stage-4 clips show each frame ``hold`` times (a long, redundant video of 16 * hold frames, same answers),
    # ``hold`` cycling through this tuple step by step; (1,) is the shipped model (16-frame clips only)
    video_hold: tuple[int, ...] = (1,)
    # optimisation (stages 2-4)
    lm_lr: float = 1e-3
    projector_lr: float = 3e-3
    projector_from_head: bool = True  # see _Trainer._projector_from_head
    tower_finetune_lr: float = 0.0  # > 0: fine-tune the tower on images in stage 3 at this LR
    weight_decay: float = 0.05
    warmup: int = 100
    clip_norm: float = 1.0
    desc_weight: float = 0.5  # loss weight of description tokens relative to answers
    # bookkeeping
    eval_every: int = 250
    eval_images: int = 120
    eval_clips: int = 40
    eval_seed: int = 1  # the in-training monitor uses held-out seed 1; reported numbers use seed 0
    checkpoint_every_s: float = 180.0

    def steps(self, stage: str) -> int:
        return {"tower": self.tower_steps, "image": self.image_steps, "joint": self.joint_steps,
                "video": self.video_steps}[stage]

    @classmethod
    def quick(cls) -> Recipe:
        """A smoke run: tiny model, a few steps of each stage (about a minute)."""
        return cls(size="tiny", tower_steps=6, tower_batch=8, image_steps=6, image_batch=4, curriculum_steps=3,
                   joint_steps=6, joint_image_batch=2, joint_video_batch=1, video_steps=4, video_image_batch=1,
                   video_video_batch=1, warmup=2, eval_every=6, eval_images=6,
                   eval_clips=3, qas_per_image=4, qas_per_clip=4)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))


def _param_groups(model: LlavaOnevisionForConditionalGeneration, stage: str, r: Recipe,
                  head: TowerHead | None) -> list[dict[str, Any]]:
    """Optimizer groups of a stage; frozen parts get ``requires_grad=False``."""
    m = model.model
    tower = list(m.vision_tower.parameters())
    proj = [*m.multi_modal_projector.parameters(), m.image_newline]
    lm = [*m.language_model.parameters(), *model.lm_head.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)

    def group(params: list, lr: float) -> dict[str, Any]:
        for p in params:
            p.requires_grad_(True)
        decay = [p for p in params if p.ndim >= 2]
        return {"params": decay, "lr": lr, "base_lr": lr, "weight_decay": r.weight_decay}, {
            "params": [p for p in params if p.ndim < 2], "lr": lr, "base_lr": lr, "weight_decay": 0.0}

    if stage == "tower":
        assert head is not None
        return [*group(tower + list(head.linear.parameters()), r.tower_lr)]
    groups = [*group(lm, r.lm_lr), *group(proj, r.projector_lr)]
    if stage == "joint" and r.tower_finetune_lr > 0:
        groups += [*group(tower, r.tower_finetune_lr)]
    return groups


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _optim_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as flat safetensors entries ``{param_index}.{key}`` (params in group order)."""
    out = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            out[f"{i}.{k}"] = v if hasattr(v, "shape") else __import__("torch").tensor(v)
    return out


def _load_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        opt.state[params[int(i)]][k] = v


@dataclass
class _EvalSet:
    """Fixed held-out monitor: images / clips with their questions, pre-rendered."""

    images: list[D.Sample] = field(default_factory=list)
    clips: list[D.ClipSample] = field(default_factory=list)


def _teacher_forced_eval(model: LlavaOnevisionForConditionalGeneration, builder: SequenceBuilder,
                         ev: _EvalSet, batch: int = 24) -> dict[str, dict[str, float]]:
    """Exact-match accuracy per question type, one question per prompt (the pipeline's format).

    With teacher forcing, "argmax is right at every answer position and at the closing <|im_end|>" is exactly
    "greedy decoding returns this answer", at the cost of one forward pass.
    """
    import torch

    model.eval()
    res: dict[str, dict[str, float]] = {}
    cfg = model.config
    for modality, items in (("image", ev.images), ("video", ev.clips)):
        if not items:
            continue
        n_vis = IMAGE_TOKENS if modality == "image" else VIDEO_TOKENS
        jobs = [(k, qa) for k, it in enumerate(items) for qa in it.questions]
        hits: dict[str, list[bool]] = {}
        for s in range(0, len(jobs), batch):
            chunk = jobs[s:s + batch]
            seqs = [builder.encode([(qa.question, qa.answer)], modality, n_vis) for _, qa in chunk]
            ids, grp = _collate(seqs, builder.pad)
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                if modality == "image":
                    pix = image_pixels(np.stack([items[k].image for k, _ in chunk]))
                    feats = image_features(model, pix)
                    tid = cfg.image_token_index
                else:
                    pix = video_pixels(np.stack([items[k].frames for k, _ in chunk]))
                    feats = video_features(model, pix)
                    tid = cfg.video_token_index
                h = _lm_hidden(model, _embed(model, ids, feats, tid))
                pred = model.lm_head(h).argmax(-1)
            tgt = torch.roll(ids, -1, dims=1)
            for b, (_, qa) in enumerate(chunk):
                m = grp[b] > 0
                hits.setdefault(qa.qtype, []).append(bool((pred[b][m] == tgt[b][m]).all()))
        out = {t: float(np.mean(v)) for t, v in sorted(hits.items())}
        out["overall"] = float(np.mean([x for v in hits.values() for x in v]))
        res[modality] = out
    model.train()
    return res


class _ThreadTuner:
    """Keeps the faster of 1 thread and all cores, re-measured every few minutes.

    On a shared machine the right count changes as other jobs come and go, and a wrong choice costs up to ~10x
    (two-thread steps wait at OpenMP barriers when another process holds a core), so every ``period_s`` the
    next ``probe`` steps run with the other count and the faster mean step time wins.
    """

    def __init__(self, period_s: float = 240.0, probe: int = 6):
        import torch

        self.cores = os.cpu_count() or 1
        self.period_s, self.probe = period_s, probe
        self.current = torch.get_num_threads()
        self.recent: list[float] = []
        self.trial: list[float] = []
        self.trying: int | None = None
        self.last = time.perf_counter()

    def observe(self, dt: float) -> None:
        import torch

        if self.trying is None:
            self.recent = (self.recent + [dt])[-self.probe:]
            if time.perf_counter() - self.last > self.period_s and len(self.recent) == self.probe:
                self.trying = 1 if self.current != 1 else self.cores
                self.trial = []
                torch.set_num_threads(self.trying)
            return
        self.trial.append(dt)
        if len(self.trial) >= self.probe:
            if np.mean(self.trial[1:]) < np.mean(self.recent[1:]):
                self.current = self.trying
            torch.set_num_threads(self.current)
            self.trying, self.recent, self.last = None, [], time.perf_counter()


def _more_questions(qas: list[D.QA], draw: Callable[[int], list[D.QA]], n: int, rounds: int = 6) -> list[D.QA]:
    """``qas`` topped up to ``n`` distinct questions with further draws of the (answer-balanced) generator."""
    out, seen = list(qas), {qa.question for qa in qas}
    for _ in range(rounds):
        if len(out) >= n:
            break
        for qa in draw(len(D.IMAGE_QTYPES)):
            if qa.question not in seen and len(out) < n:
                out.append(qa)
                seen.add(qa.question)
    return out


def _stage_index(name: str) -> int:
    return STAGES.index(name) if name in STAGES else len(STAGES)


def save_checkpoint(final: Path, tensors: dict[str, dict[str, Any]], state: dict[str, Any]) -> None:
    """Atomic checkpoint directory: ``NAME.safetensors`` per entry of ``tensors`` + ``state.json``, written into
    a fresh directory and then swapped in, so a run killed mid-write keeps its previous checkpoint."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensor_dict in tensors.items():
        _save_tensors(tmp / f"{name}.safetensors", tensor_dict)
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


class _Trainer:
    """Runs the stages of a :class:`Recipe` with checkpoints in ``work_dir`` (resumable at any point)."""

    def __init__(self, recipe: Recipe, work_dir: Path, log: Callable[[str], None] = print,
                 progress: bool = True):

        self.r = recipe
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.say = log
        self.progress = progress
        self.model = build_model(recipe.size, seed=recipe.seed)
        self.model.train()
        self.processor = build_processor()
        self.builder = SequenceBuilder(self.processor.tokenizer)
        self.head = TowerHead(self.model.config.vision_config.hidden_size)
        self.stage_i, self.step, self.elapsed = 0, 0, 0.0
        self.cpu_elapsed = 0.0
        self.stage_time: dict[str, float] = {}
        self.opt: torch.optim.Optimizer | None = None
        self.log_path = self.dir / "log.jsonl"
        self._ev: _EvalSet | None = None
        self.threads: _ThreadTuner | None = None  # set by train() when the thread count is automatic

    # ---- state -----------------------------------------------------------------------------------------------
    @property
    def stage(self) -> str:
        return STAGES[self.stage_i] if self.stage_i < len(STAGES) else "done"

    def _new_optimizer(self) -> None:
        import torch

        groups = _param_groups(self.model, self.stage, self.r, self.head)
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.98))

    def save(self) -> None:
        tensors = {"model": self.model.state_dict(), "tower_head": self.head.linear.state_dict()}
        if self.opt is not None:
            tensors["optim"] = _optim_tensors(self.opt)
        state = {"stage": self.stage, "step": self.step, "elapsed": self.elapsed, "cpu_elapsed": self.cpu_elapsed,
                 "stage_time": self.stage_time, "recipe": asdict(self.r)}
        save_checkpoint(self.dir / "ckpt", tensors, state)

    def load(self) -> bool:
        """Restore the last checkpoint of ``work_dir``; False if there is none."""
        ck = self.dir / "ckpt"
        if not (ck / "state.json").is_file():
            return False
        state = json.loads((ck / "state.json").read_text())
        saved = Recipe(**state["recipe"])
        if saved.size != self.r.size:
            raise ConfigError(f"{ck} holds a {saved.size!r} model, not {self.r.size!r}; use another --work-dir")
        self.model.load_state_dict(_load_tensors(ck / "model.safetensors"))
        self.head.linear.load_state_dict(_load_tensors(ck / "tower_head.safetensors"))
        self.stage_i, self.step = _stage_index(state["stage"]), int(state["step"])
        self.elapsed, self.cpu_elapsed = float(state["elapsed"]), float(state.get("cpu_elapsed", 0.0))
        self.stage_time = dict(state.get("stage_time", {}))
        if self.stage_i >= len(STAGES):
            return True
        self._new_optimizer()
        if (ck / "optim.safetensors").is_file() and self.step > 0:
            _load_optim(self.opt, _load_tensors(ck / "optim.safetensors"))
        # drop log lines written after the checkpoint (they will be redone)
        if self.log_path.is_file():
            keep = []
            for line in self.log_path.read_text().splitlines():
                rec = json.loads(line)
                if (_stage_index(rec["stage"]), rec["step"]) <= (self.stage_i, self.step):
                    keep.append(line)
            self.log_path.write_text("".join(x + "\n" for x in keep))
        return True

    def _log(self, rec: dict[str, Any]) -> None:
        rec = {"stage": self.stage, "step": self.step, "time_s": round(self.elapsed, 1), **rec}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    # ---- data ------------------------------------------------------------------------------------------------
    @property
    def evalset(self) -> _EvalSet:
        if self._ev is None:
            r = self.r
            self._ev = _EvalSet(
                D.image_dataset("heldout", r.eval_images, seed=r.eval_seed),
                D.video_dataset("heldout", r.eval_clips, seed=r.eval_seed, num_frames=NUM_FRAMES),
            )
        return self._ev

    def _image_seqs(self, start: int, n: int, n_objects: Any) -> tuple[np.ndarray, list]:
        """Images ``start .. start + n - 1`` of the training stream and their multi-turn sequences: up to
        ``qas_per_image`` distinct QAs (extra draws of the answer-balanced generator), then the description."""
        r = self.r
        images, seqs = [], []
        for i in range(start, start + n):
            s = D.image_sample("train", r.seed, i, k=len(D.IMAGE_QTYPES), n_objects=n_objects)
            images.append(s.image)
            rng = D.sample_rng("image", "train", r.seed + 7919, i)  # turn layout, independent of the scene
            qas = _more_questions(s.questions, lambda k, s=s, rng=rng: D.image_questions(s.scene, rng, k=k),
                                  r.qas_per_image)
            seqs.append(self.builder.encode(self._turns(rng, qas, CAPTION_PROMPT, s.description), "image",
                                            IMAGE_TOKENS))
        return np.stack(images), seqs

    def _clip_seqs(self, start: int, n: int, hold: int = 1) -> tuple[np.ndarray, list]:
        r = self.r
        frames, seqs = [], []
        for i in range(start, start + n):
            c = D.clip_sample("train", r.seed, i, num_frames=NUM_FRAMES, k=len(D.VIDEO_QTYPES))
            frames.append(np.repeat(np.asarray(c.frames), hold, axis=0) if hold > 1 else c.frames)
            rng = D.sample_rng("video", "train", r.seed + 7919, i)
            qas = _more_questions(c.questions, lambda k, c=c, rng=rng: D.video_questions(c.clip, rng, k=k),
                                  r.qas_per_clip)
            seqs.append(self.builder.encode(self._turns(rng, qas, VIDEO_CAPTION_PROMPT, c.description), "video",
                                            (VIDEO_TOKENS - 1) * hold + 1))
        return np.stack(frames), seqs

    def _turns(self, rng: np.random.Generator, qas: list[D.QA], prompt: str, description: str
               ) -> list[tuple[str, str]]:
        # The description comes last (earlier, later answers could be copied from it instead of read from the
        # image), except in a ``desc_first`` fraction of sequences where it is the only turn, as captioning asks.
        if rng.random() < self.r.desc_first or not qas:
            return [(prompt, description)]
        return [(qa.question, qa.answer) for qa in qas] + [(prompt, description)]

    # ---- losses ----------------------------------------------------------------------------------------------
    def _lm_loss(self, ids: torch.Tensor, grp: torch.Tensor, feats: torch.Tensor, token_id: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        import torch
        import torch.nn.functional as F

        h = _lm_hidden(self.model, _embed(self.model, ids, feats, token_id))
        tgt = torch.roll(ids, -1, dims=1)
        total = torch.zeros((), dtype=torch.float32)
        stats = {}
        for g, w, name in ((G_QA, 1.0, "qa"), (G_DESC, self.r.desc_weight, "desc")):
            m = grp == g
            if not bool(m.any()):
                continue
            logits = self.model.lm_head(h[m]).float()
            loss = F.cross_entropy(logits, tgt[m])
            total = total + w * loss
            stats[f"loss_{name}"] = float(loss.detach())
            stats[f"tok_acc_{name}"] = float((logits.argmax(-1) == tgt[m]).float().mean())
        return total, stats

    def _train_step(self) -> dict[str, float]:
        import torch

        r, st, step = self.r, self.stage, self.step
        model = self.model
        stats: dict[str, float] = {}
        with torch.autocast("cpu", torch.bfloat16):
            if st == "tower":
                pix, y = _tower_batch("train", r.seed, step * r.tower_batch, r.tower_batch, r.tile_position)
                loss, acc = self.head.loss(_tower(model, pix, grad=True), y)
                stats.update({f"acc_{k}": v for k, v in acc.items()})
            else:
                loss = torch.zeros(())
                tower_grad = st == "joint" and r.tower_finetune_lr > 0
                n_img = {"image": r.image_batch, "joint": r.joint_image_batch, "video": r.video_image_batch}[st]
                n_vid = {"joint": r.joint_video_batch, "video": r.video_video_batch}.get(st, 0)
                if n_img:
                    n_obj = range(2, 4) if st == "image" and step < r.curriculum_steps else None
                    images, seqs = self._image_seqs(self._image_offset() + step * n_img, n_img, n_obj)
                    ids, grp = _collate(seqs, self.builder.pad)
                    feats = image_features(model, image_pixels(images), tower_grad=tower_grad)
                    li, s = self._lm_loss(ids, grp, feats, model.config.image_token_index)
                    loss = loss + li
                    stats.update({f"img_{k}": v for k, v in s.items()})
                if n_vid:
                    hold = r.video_hold[step % len(r.video_hold)] if st == "video" else 1
                    frames, seqs = self._clip_seqs(self._clip_offset() + step * n_vid, n_vid, hold)
                    ids, grp = _collate(seqs, self.builder.pad)
                    feats = video_features(model, video_pixels(frames), tower_grad=False)
                    lv, s = self._lm_loss(ids, grp, feats, model.config.video_token_index)
                    loss = loss + lv
                    stats.update({f"vid_{k}": v for k, v in s.items()})
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, r.clip_norm))
        if st == "tower":
            f = _lr_factor(step, r.tower_steps, r.warmup)
        elif st == "video":  # a second, lower cosine (stage 3 ended at 10% of the LR)
            f = r.video_lr * _lr_factor(step, r.video_steps, r.warmup)
        else:  # one schedule over stages 2 + 3: re-warming for stage 3 undid image skills (0.78 -> 0.67)
            f = _lr_factor(step + (r.image_steps if st == "joint" else 0), r.image_steps + r.joint_steps, r.warmup)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        stats["loss"] = float(loss.detach())
        return stats

    def _projector_from_head(self, n_calib: int = 32, word_gain: float = 10.0, rest_gain: float = 0.1,
                             match_gain: float = 2.0, match_layers: int = 2) -> None:
        """Structured start of stage 2: visual tokens begin as "bags of visual words", and one attention head in
        each of the first ``match_layers`` layers begins as a matcher from question words to those visual words.

        * ``linear_1``: its first units compute the tower head's per-patch class logits (scaled to unit std), so
          after the GELU they are near one-hot colour / shape / size / region / centre units.
        * ``linear_2``: each class unit writes ``M @ emb(word)`` ("red", "star", "large", "top" + "left", ...), with
          ``M`` a fixed random rotation, so a patch of a large red star enters the language model close to
          ``M (emb(large) + emb(red) + emb(star) + emb(region))``; the other units are scaled down.
        * query head 0 / key-value head 0 of the first layers: ``W_q = g R`` and ``W_k = g R M^T`` on the slow
          (near position-free) rotary dimensions, with ``R`` a random orthonormal projection. A question word
          then attends to the patches that show it (``q . k ~ emb(w) . emb(w)``), but not to itself or other
          text (``M`` scrambles text keys). Finding the few relevant tokens among 192 is what a from-scratch
          language model learned slowest; this head does it from step 0.

        Everything stays trainable; this only sets where training starts.
        """
        import torch

        w, b = self.head.linear.weight.detach(), self.head.linear.bias.detach()  # (C, Hv), (C,)
        n_cls = sum(TOWER_CLASSES.values())
        pix, _ = _tower_batch("train", self.r.seed + 1, 0, n_calib)
        model = self.model
        proj = model.model.multi_modal_projector
        emb = model.get_input_embeddings().weight.detach()
        hidden = emb.shape[1]
        gen = torch.Generator().manual_seed(self.r.seed + 11)
        rot = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen))[0]  # M
        vocab = self.builder.vocab
        names = {"color": ("",) + D.COLOR_NAMES, "shape": ("",) + D.SHAPES, "size": ("",) + D.SIZES,
                 "region": ("",) + D.REGIONS, "centre": ("", "object")}  # one "object" per object: counting
        words = [n for k in TOWER_CLASSES for n in names[k]]
        with torch.no_grad():
            feats = _tower(model, pix, grad=False)
            scale = 1.0 / (feats @ w[:n_cls].T + b[:n_cls]).std().clamp(min=1e-6)
            proj.linear_1.weight[:n_cls] = w[:n_cls] * scale
            proj.linear_1.bias[:n_cls] = b[:n_cls] * scale
            proj.linear_2.weight[:, n_cls:] *= rest_gain
            proj.linear_2.weight[:, :n_cls] = 0.0
            for j, phrase in enumerate(words):
                for word in phrase.split():
                    proj.linear_2.weight[:, j] += word_gain * (rot @ emb[vocab[word]]) / 3.0
            # object position: units GELU(+-2x), GELU(+-2y) of the head's (x, y) regression write "right" / "left" /
            # "bottom" / "top", so left-right relations between two objects are a difference along one direction
            gx, gy = n_cls + 2, n_cls + 3  # head outputs: dx, dy, x, y
            for j, (row, sign, word) in enumerate([(gx, 1, "right"), (gx, -1, "left"), (gy, 1, "bottom"),
                                                   (gy, -1, "top")]):
                unit = n_cls + j
                proj.linear_1.weight[unit] = 2.0 * sign * w[row]
                proj.linear_1.bias[unit] = 2.0 * sign * b[row]
                proj.linear_2.weight[:, unit] = word_gain * (rot @ emb[vocab[word]]) / 3.0
            tc = model.config.text_config
            hd = tc.hidden_size // tc.num_attention_heads
            slow = [*range(hd // 4, hd // 2), *range(3 * hd // 4, hd)]  # low-frequency rotary pairs
            for layer in model.model.language_model.layers[:match_layers]:
                att = layer.self_attn
                r_proj = torch.linalg.qr(torch.randn(hidden, len(slow), generator=gen))[0].T  # (|slow|, hidden)
                att.q_proj.weight[:hd] = 0.0
                att.q_proj.bias[:hd] = 0.0
                att.k_proj.weight[:hd] = 0.0
                att.k_proj.bias[:hd] = 0.0
                att.q_proj.weight[slow] = match_gain * r_proj
                att.k_proj.weight[slow] = match_gain * r_proj @ rot.T

    def _image_offset(self) -> int:
        """Each stage's images continue the image stream of the stages before instead of repeating it."""
        r = self.r
        return {"image": 0, "joint": r.image_steps * r.image_batch,
                "video": r.image_steps * r.image_batch + r.joint_steps * r.joint_image_batch}.get(self.stage, 0)

    def _clip_offset(self) -> int:
        """Stage 4 continues the clip stream of stage 3."""
        return self.r.joint_steps * self.r.joint_video_batch if self.stage == "video" else 0

    def _evaluate(self) -> dict[str, Any]:
        import torch

        if self.stage == "tower":
            self.model.eval()
            pix, y = _tower_batch("heldout", self.r.eval_seed, 0, self.r.eval_images, self.r.tile_position)
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                _, acc = self.head.loss(_tower(self.model, pix, grad=False), y)
            self.model.train()
            return {"tower": acc}
        ev = self.evalset
        if self.stage == "image":
            ev = _EvalSet(ev.images, [])
        return _teacher_forced_eval(self.model, self.builder, ev)

    # ---- loop ------------------------------------------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> None:
        from tqdm.auto import tqdm

        r = self.r
        if self.opt is None:
            self._new_optimizer()
        while self.stage_i < len(STAGES):
            st = self.stage
            if st == "image" and self.step == 0 and r.projector_from_head:
                self._projector_from_head()
            total = r.steps(st) if max_steps is None else min(r.steps(st), max_steps)
            bar = tqdm(total=total, initial=min(self.step, total), desc=f"tiny-vlm {st}", disable=not self.progress,
                       dynamic_ncols=True)
            last_ckpt = time.perf_counter()
            while self.step < total:
                t0, c0 = time.perf_counter(), time.process_time()
                stats = self._train_step()
                self.step += 1
                dt = time.perf_counter() - t0
                if self.threads is not None:
                    self.threads.observe(dt)
                self.elapsed += dt
                self.cpu_elapsed += time.process_time() - c0
                self.stage_time[st] = self.stage_time.get(st, 0.0) + dt
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}")
                if self.step % 10 == 0 or self.step == total:
                    self._log({"train": stats, "step_s": round(dt, 3)})
                if self.step % r.eval_every == 0 or self.step == total:
                    res = self._evaluate()
                    self._log({"eval": res})
                    bar.write(f"[{st} {self.step}/{total}] " + _fmt_eval(res))
                if time.perf_counter() - last_ckpt > r.checkpoint_every_s:
                    self.save()
                    last_ckpt = time.perf_counter()
            bar.close()
            self.say(f"stage {st} done: {self.step} steps, {self.stage_time.get(st, 0.0) / 60:.1f} min")
            self.stage_i += 1
            self.step = 0
            if self.stage_i < len(STAGES):
                self._new_optimizer()
            self.save()


def _fmt_eval(res: dict[str, Any]) -> str:
    parts = []
    for mod, accs in res.items():
        parts.append(mod + ": " + " ".join(f"{k}={v:.2f}" for k, v in accs.items()))
    return " | ".join(parts)


def save_model(model: LlavaOnevisionForConditionalGeneration, processor: LlavaOnevisionProcessor,
               out_dir: str | Path, dtype: str = "float16") -> Path:
    """``save_pretrained`` model (weights cast to ``dtype`` to keep the checkpoint small) and processor."""
    import copy

    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(getattr(torch, dtype)).eval()
    for p in half.parameters():
        p.requires_grad_(False)
    half.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def auto_threads(own: int = 0) -> int:
    """All cores on an idle machine, one when other processes already keep the cores busy: with more runnable
    threads than cores, a two-thread OpenMP training step waits at barriers and ran ~10x slower than with one
    thread (measured on a shared 2-core machine). ``own``: threads of this process already in the load."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        load = 0.0
    return 1 if load - own >= cores - 0.5 else cores


def train(out_dir: str | Path | None = None, work_dir: str | Path = "tiny-vlm-train", resume: bool = False,
          steps: int | None = None, quick: bool = False, recipe: Recipe | None = None,
          log: Callable[[str], None] = print, progress: bool = True, threads: int | None = None) -> Path:
    """Run the tiny-vlm recipe; write the model + processor into ``out_dir`` and return it.

    ``work_dir`` holds the resumable checkpoint (``ckpt/``: model, tower head and optimizer in safetensors, state
    JSON), ``log.jsonl`` (losses, accuracies) and the learning curves. ``resume=True`` continues from the last
    checkpoint (saved every few minutes and at each stage end). ``steps`` caps every stage (smoke runs);
    ``quick`` uses :meth:`Recipe.quick`. ``out_dir`` defaults to ``work_dir/model``. ``threads``: torch CPU
    threads (default: all cores, or one if the machine is already busy).
    """
    import torch

    torch.set_num_threads(threads or auto_threads())
    log(f"tiny-vlm training with {torch.get_num_threads()} CPU thread(s)" + ("" if threads else " (auto)"))
    work = Path(work_dir)
    r = recipe if recipe is not None else (Recipe.quick() if quick else Recipe())
    if not resume and (work / "ckpt").exists():
        raise MMFastError(f"{work} already holds a training run: pass --resume to continue it, or another --work-dir")
    tr = _Trainer(r, work, log=log, progress=progress)
    if threads is None and (os.cpu_count() or 1) > 1:
        tr.threads = _ThreadTuner()
    if resume and tr.load():
        log(f"resumed {work}: stage {tr.stage}, step {tr.step}, {tr.elapsed / 60:.1f} min trained so far")
    elif not resume:
        (work / "log.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    if tr.stage_i < len(STAGES):
        tr.run(max_steps=steps)
    out = Path(out_dir) if out_dir is not None else work / "model"
    save_model(tr.model, tr.processor, out)
    summary = {"recipe": asdict(r), "train_minutes": round(tr.elapsed / 60, 1),
               "cpu_minutes": round(tr.cpu_elapsed / 60, 1),
               "stage_minutes": {k: round(v / 60, 1) for k, v in tr.stage_time.items()}}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    try:
        plot_curves(work / "log.jsonl", work / "curves.png")
    except ImportError:  # matplotlib is an optional extra
        pass
    log(f"tiny-vlm written to {out} ({tr.elapsed / 60:.1f} min of training, this session "
        f"{(time.perf_counter() - t0) / 60:.1f} min)")
    return out


def plot_curves(log_path: str | Path, png_path: str | Path) -> Path:
    """Learning curves from ``log.jsonl``: tower per-patch accuracy (stage 1) and held-out accuracy per question
    type vs step (stages 2-3, images solid, videos dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in Path(log_path).read_text().splitlines() if x.strip()]
    evals = {}
    for rec in recs:  # last record wins (a resumed run may repeat steps)
        if "eval" in rec:
            evals[(_stage_index(rec["stage"]), rec["step"])] = rec
    offsets, acc = {}, 0
    for s in STAGES[1:]:  # the VLM steps of stages 2-4 (the tower has its own panel)
        offsets[s] = acc
        acc += max([st for (i, st) in evals if STAGES[i] == s], default=0)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
    tower = sorted((k, v) for k, v in evals.items() if "tower" in v["eval"])
    for name in TOWER_CLASSES:
        ax0.plot([k[1] for k, _ in tower], [v["eval"]["tower"][name] for _, v in tower], label=name)
    ax0.set(title="stage 1: tower per-patch held-out accuracy", xlabel="tower step", ylabel="accuracy", ylim=(0, 1))
    ax0.legend(fontsize=8)
    vlm = sorted((k, v) for k, v in evals.items() if "tower" not in v["eval"])
    for mod, style in (("image", "-"), ("video", "--")):
        pts = [(offsets[STAGES[k[0]]] + k[1], v["eval"][mod]) for k, v in vlm if mod in v["eval"]]
        if not pts:
            continue
        for qt in pts[-1][1]:
            lw = 2.5 if qt == "overall" else 1.2
            ax1.plot([x for x, _ in pts], [a.get(qt, np.nan) for _, a in pts], style, lw=lw, label=f"{mod} {qt}")
    for s in STAGES[2:]:
        if offsets.get(s):
            ax1.axvline(offsets[s], color="grey", lw=0.8, ls=":")
    ax1.set(title="stages 2-4: held-out exact-match accuracy", xlabel="VLM step", ylabel="accuracy", ylim=(0, 1))
    ax1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
