"""Tiny, random-initialised, saved-and-reloadable VLMs of real Hugging Face families.

Every model built here is an instance of the REAL ``transformers`` class (``LlavaForConditionalGeneration``,
``Qwen2VLForConditionalGeneration``, ...) with the family's REAL processor class (image processor, video
processor, chat template) and an in-memory byte-level BPE tokenizer, so that the normal loading path works
with no download::

    from transformers import AutoModelForImageTextToText, AutoProcessor
    from mmfast.train.tiny_models import build_tiny_vlm

    path = build_tiny_vlm("qwen2_vl", tmp_path / "qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)

``size="tiny"`` models (text hidden 64, 2 layers, 4 heads / 2 KV heads; vision hidden 32, 2 layers; 32-64 px
images) run forward + ``generate(max_new_tokens=8)`` in a few milliseconds. Each image and each video frame
(for Qwen: each temporal patch of 2 frames) gives at least 16 visual tokens laid out on a 2-D grid with even
sides (for square images at the default sizes), so spatial 2x2 pooling can be tested. Weights are drawn with a
large ``initializer_range`` (0.25) so that greedy decoding is not degenerate: 8 greedy tokens contain several
distinct ids (5-8 typically, >= 3 for every seed checked) and the answer changes with the image / video. The
LM-head rows of all special tokens (eos, pad, image / video placeholders, ...) and of byte tokens that do not
decode to printable ASCII are zeroed, so greedy decoding never stops early (``generate(max_new_tokens=n)``
returns exactly ``n`` tokens), never emits a placeholder, and decodes to clean ASCII. Pass ``eos_token_id=...``
to ``generate`` with another id if a test needs early stopping.

``size="bench"`` (``"llava_onevision"`` only) is a random LLaVA-OneVision-shaped model with realistic
proportions for speed benchmarks: SigLIP-style 336 px / patch 14 tiles (24x24 = 576 tokens per tile; an image
gives base + one hi-res tile + 24 newlines = 1176 tokens; a video frame gives 12x12 = 144 tokens after the 2x2
video pooling, 16 frames = 2305 tokens), a cheap vision tower (hidden 128, 2 layers) and a Qwen2 LLM (hidden
512, 8 layers, 8 heads, 2 KV heads, MLP 1408) that dominates the prefill cost: a 16-frame prefill takes ~1.0 s
in fp32 (vision ~0.14 s) and ~0.5 s in bf16 on a 2-core AVX-512 CPU; an image prefill ~0.4 s / ~0.2 s.

The models are never trained: outputs are meaningless text, but deterministic for a given ``seed``.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import string
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfast.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import PretrainedConfig, PreTrainedTokenizerFast, ProcessorMixin

__all__ = [
    "FAMILIES",
    "SIZES",
    "VIDEO_FAMILIES",
    "tiny_tokenizer",
    "tiny_vlm_config",
    "tiny_processor",
    "build_tiny_vlm",
    "make_test_image",
    "make_test_video",
]

#: Families :func:`build_tiny_vlm` knows, keyed like the ``model_type`` of their transformers config.
FAMILIES: tuple[str, ...] = ("llava", "llava_next", "llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
#: Families whose processor also takes ``videos=``.
VIDEO_FAMILIES: tuple[str, ...] = ("llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
#: Model sizes: ``"tiny"`` for every family, ``"bench"`` for ``"llava_onevision"`` only.
SIZES: tuple[str, ...] = ("tiny", "bench")

# Std of the normal weight init. With 0.02-0.1 (the HF default is 0.02) tiny random models often repeat 1-2
# tokens; with 0.25 greedy decoding of 8 tokens gave 5-8 distinct ids (>= 3 for all 8 seeds x 5 families
# checked), different answers for different images / videos, sdpa == eager and batched == single outputs.
# Much larger values (0.4) make the output flip under 1% pixel noise.
_TINY_INIT_RANGE = 0.25
_BENCH_INIT_RANGE = 0.05

# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------

_CORPUS: tuple[str, ...] = (
    "What is this? What is in the image? What is happening in the video?",
    "Describe the image in detail. Describe the video in one sentence.",
    "A cat is sitting on a red mat next to a small dog.",
    "The dog runs across the green park and jumps over a log.",
    "There are three people standing near a white car on the street.",
    "A man in a blue shirt is riding a bicycle down the road.",
    "Two children are playing with a yellow ball on the beach.",
    "The sky is clear and the sun is shining over the mountains.",
    "A woman holds an umbrella while walking in the rain.",
    "The picture shows a kitchen with a table, four chairs and a window.",
    "A bird flies above the lake at sunset, and the water is calm.",
    "The train arrives at the station and people get off.",
    "First the door opens, then a person enters the room and sits down.",
    "The camera moves to the left and shows a tall building.",
    "How many animals can you see? I can see two animals.",
    "What color is the car? The car is red. The bus is blue.",
    "Is there a person in the picture? Yes, there is one person.",
    "The answer is yes. The answer is no. I do not know.",
    "Where is the ball? The ball is under the chair.",
    "Please answer the question with a single word or phrase.",
    "The video shows a cooking show where a chef cuts vegetables.",
    "At the end of the clip, the player scores a goal and the crowd cheers.",
    "This is a photo of a city at night with bright lights.",
    "An orange fox is sleeping in the snow under a tree.",
    "You are a helpful assistant. Answer the user in English.",
)

# Special tokens per family. The first ones get the smallest ids, in this order.
_SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    # role -> token. Roles image_token / video_token become tokenizer attributes (extra_special_tokens).
    "llava": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "image_token": "<image>",
    },
    "llava_next_video": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "image_token": "<image>",
        "video_token": "<video>",
    },
    "llava_onevision": {
        "pad_token": "<|endoftext|>",
        "bos_token_im": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "image_token": "<image>",
        "video_token": "<video>",
    },
    "qwen2_vl": {
        "pad_token": "<|endoftext|>",
        "bos_token_im": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
        "vision_pad_token": "<|vision_pad|>",
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
    },
}
_SPECIAL_TOKENS["qwen2_5_vl"] = dict(_SPECIAL_TOKENS["qwen2_vl"])
_SPECIAL_TOKENS["llava_next"] = dict(_SPECIAL_TOKENS["llava"])

# Roles that are genuine tokenizer special-token attributes; the others become extra_special_tokens attributes
# (image_token, video_token, vision_start_token, ...) or are only added as special tokens.
_STANDARD_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
_EXTRA_ROLES = ("image_token", "video_token", "vision_start_token", "vision_end_token")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ConfigError(f"Unknown tiny VLM family {family!r}; choose one of {', '.join(FAMILIES)}.")


@functools.lru_cache(maxsize=16)
def _trained_bpe_json(family: str, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(_SPECIAL_TOKENS[family].values())
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    bos = _SPECIAL_TOKENS[family].get("bos_token")
    if bos is not None:  # Llama-style tokenizers prepend <s>
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def tiny_tokenizer(
    family: str = "llava", vocab_size: int = 400, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """An in-memory byte-level BPE tokenizer with the family's special tokens.

    The BPE is trained (in a few milliseconds) on a small fixed English corpus, so it is deterministic, encodes
    any text (bytes fall back to the 256 byte tokens) and decodes back exactly. Special tokens come first:

    * ``"llava"`` / ``"llava_next"``: ``<s>`` (bos, prepended), ``</s>`` (eos), ``<unk>``, ``<pad>``, ``<image>``;
    * ``"llava_next_video"``: the same plus ``<video>``;
    * ``"llava_onevision"``: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos), ``<image>``, ``<video>``;
    * ``"qwen2_vl"`` / ``"qwen2_5_vl"``: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos),
      ``<|vision_start|>``, ``<|vision_end|>``, ``<|vision_pad|>``, ``<|image_pad|>``, ``<|video_pad|>``.

    ``tokenizer.image_token`` / ``tokenizer.video_token`` (and ``..._id``) are set, as the processors expect.

    Args:
        family: one of :data:`FAMILIES`.
        vocab_size: BPE target vocabulary size (including 256 byte tokens and the special tokens); the corpus
            is small, so the real size may stay below it (``len(tokenizer)`` is the truth).
        chat_template: Jinja chat template; defaults to the family's template (see :func:`tiny_processor`).

    Returns:
        a ``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    _check_family(family)
    if vocab_size < 300:
        raise ConfigError(f"vocab_size must be >= 300 (256 byte tokens + merges + specials), got {vocab_size}.")
    tok = Tokenizer.from_str(_trained_bpe_json(family, vocab_size))
    roles = _SPECIAL_TOKENS[family]
    standard = {k: v for k, v in roles.items() if k in _STANDARD_ROLES}
    extra = {k: v for k, v in roles.items() if k in _EXTRA_ROLES}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens=extra,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        padding_side="left",  # batched generate needs left padding
        **standard,
    )
    # Special tokens that are neither standard nor extra roles (e.g. <|im_start|>) must still be special.
    others = [v for k, v in roles.items() if k not in _STANDARD_ROLES and k not in _EXTRA_ROLES]
    if others:
        fast.add_special_tokens({"additional_special_tokens": others}, replace_extra_special_tokens=False)
    fast.chat_template = chat_template if chat_template is not None else _CHAT_TEMPLATES[family]
    return fast


# ----------------------------------------------------------------------------------------------------------
# Chat templates (simplified versions of the official ones, same prompt format)
# ----------------------------------------------------------------------------------------------------------

# LLaVA-1.5 / LLaVA-NeXT-Video: "USER: <image>\nWhat is this? ASSISTANT:"
_LLAVA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ c['text'] }}{%- endfor -%}"
    "{%- endif -%}{{ ' ' }}"
    "{%- else -%}"
    "{{ message['role'].upper() + ': ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for c in message['content'] | selectattr('type', 'equalto', 'video') -%}{{ '<video>\n' }}{%- endfor -%}"
    "{%- for c in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{{ c['text'] }}{%- if not loop.last -%}{{ ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}{{ ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# LLaVA-OneVision (Qwen2 LLM): "<|im_start|>user <image>\nWhat is this?<|im_end|><|im_start|>assistant\n"
_ONEVISION_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>' }}{%- endfor -%}"
    "{%- for c in message['content'] | selectattr('type', 'equalto', 'video') -%}{{ '<video>' }}{%- endfor -%}"
    "{%- for c in message['content'] | selectattr('type', 'equalto', 'text') -%}"
    "{%- if message['role'] == 'assistant' and loop.first -%}{{ c['text'] }}{%- else -%}{{ '\n' + c['text'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# Qwen2-VL / Qwen2.5-VL:
# "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n
#  <|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n"
_QWEN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' or 'image' in c or 'image_url' in c -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'video' or 'video' in c -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in c -%}{{ c['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

_CHAT_TEMPLATES: dict[str, str] = {
    "llava": _LLAVA_TEMPLATE,
    "llava_next": _LLAVA_TEMPLATE,
    "llava_next_video": _LLAVA_TEMPLATE,
    "llava_onevision": _ONEVISION_TEMPLATE,
    "qwen2_vl": _QWEN_TEMPLATE,
    "qwen2_5_vl": _QWEN_TEMPLATE,
}

# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _text_config(kind: str, size: str, vocab_size: int, ids: dict[str, int | None]) -> dict[str, Any]:
    """Llama (``kind='llama'``), Qwen2 (``'qwen2'``) or Qwen2-VL text (``'qwen2_vl'``) config dict."""
    if size == "tiny":
        cfg: dict[str, Any] = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            initializer_range=_TINY_INIT_RANGE,
        )
    else:  # bench
        cfg = dict(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            initializer_range=_BENCH_INIT_RANGE,
        )
    cfg.update(
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        bos_token_id=ids.get("bos"),
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    if kind == "llama":
        cfg.update(
            model_type="llama", rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        )
    elif kind == "qwen2":
        cfg.update(model_type="qwen2", rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    else:  # qwen2_vl / qwen2_5_vl text: M-RoPE, sections sum to head_dim / 2 (real models: [16, 24, 24] of 64)
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        half = head_dim // 2
        t = half // 4
        h = (half - t) // 2
        cfg.update(
            model_type=f"{kind}_text",
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [t, h, half - t - h]},
        )
    return cfg


def _clip_vision(image_size: int, patch_size: int, size: str) -> dict[str, Any]:
    return dict(
        model_type="clip_vision_model",
        hidden_size=32 if size == "tiny" else 192,
        intermediate_size=64 if size == "tiny" else 768,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        image_size=image_size,
        patch_size=patch_size,
        initializer_range=_TINY_INIT_RANGE if size == "tiny" else _BENCH_INIT_RANGE,
    )


def _siglip_vision(image_size: int, patch_size: int, size: str) -> dict[str, Any]:
    if size == "tiny":
        hidden, inter, layers, heads = 32, 64, 2, 4
    else:
        hidden, inter, layers, heads = 128, 512, 2, 2
    return dict(
        model_type="siglip_vision_model",
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )


def _token_ids(family: str, vocab_size: int) -> tuple[int, dict[str, int | None]]:
    tok = tiny_tokenizer(family, vocab_size)
    vocab = tok.get_vocab()
    roles = _SPECIAL_TOKENS[family]
    ids = {
        "bos": vocab[roles["bos_token"]] if "bos_token" in roles else None,
        "eos": vocab[roles["eos_token"]],
        "pad": vocab[roles["pad_token"]],
        "image": vocab[roles["image_token"]],
        "video": vocab[roles["video_token"]] if "video_token" in roles else None,
        "vision_start": vocab.get("<|vision_start|>"),
        "vision_end": vocab.get("<|vision_end|>"),
    }
    return len(tok), ids


def _pinpoints(base: int, max_tiles: int) -> list[list[int]]:
    return [[base * i, base * j] for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1)]


def tiny_vlm_config(family: str, size: str = "tiny", vocab_size: int = 400, **overrides: Any) -> PretrainedConfig:
    """The transformers config of a tiny (or bench-size) random VLM of ``family``.

    Args:
        family: one of :data:`FAMILIES`.
        size: ``"tiny"`` (every family) or ``"bench"`` (``"llava_onevision"`` only).
        vocab_size: BPE target size of :func:`tiny_tokenizer`; the model's vocab is ``len(tokenizer)``.
        **overrides: top-level config fields (e.g. ``image_grid_pinpoints=...``, ``vision_feature_layer=-1``);
            ``text_config={...}`` / ``vision_config={...}`` dicts are merged into the sub-configs
            (e.g. ``text_config={"num_hidden_layers": 4}``).

    Returns:
        a ``PretrainedConfig`` of the family's real config class (``LlavaConfig``, ``Qwen2VLConfig``, ...).

    Tiny shapes (text hidden 64, 2 layers, 4 heads, 2 KV heads, ``initializer_range`` 0.25; vision hidden 32,
    2 layers, 4 heads):

    * ``llava``: CLIP 32 px / patch 8 (4x4 patches + CLS, strategy ``default``): 16 tokens per image.
    * ``llava_next``: CLIP 64 px / patch 8 (8x8), images only: anyres with ``image_grid_pinpoints`` multiples of 64
      up to 128 px (base 8x8 + unpadded tiles with row newlines; a base-only image gets one trailing newline).
    * ``llava_next_video``: CLIP 64 px / patch 8 (8x8). Video: 4x4 = 16 tokens per frame after the stride-2
      pooling. Images: anyres, ``image_grid_pinpoints`` multiples of 64 up to 128 px: base 8x8 + tiles + newlines.
    * ``llava_onevision``: SigLIP 32 px / patch 4 (8x8, strategy ``full``), Qwen2 text. Video: 4x4 = 16 tokens per
      frame after the 2x2 bilinear pooling + ONE newline token per video. Images: anyres with pinpoints
      multiples of 32 up to 96 px (``anyres_max_9``).
    * ``qwen2_vl`` / ``qwen2_5_vl``: patch 8, merge 2, temporal patch 2: one token per 16x16 pixels (per 2 frames for
      videos). The image processor keeps 64^2..128^2 pixels (a 64 px square image gives 4x4 = 16 tokens, any image
      >= 16); the video processor 96^2..128^2 (a 64 px square clip gives 6x6 = 36 tokens per 2 frames). An odd
      frame count is padded by repeating the last frame. Qwen2.5-VL: window attention over 2x2 merged tokens
      (``window_size=32``) in layer 0, full attention in layer 1.

    Bench shape (``llava_onevision``): SigLIP 336 px / patch 14 (hidden 128, 2 layers), Qwen2 LLM hidden 512, 8
    layers, 8 heads, 2 KV heads, MLP 1408, ``initializer_range`` 0.05, pinpoints 336x336 / 336x672 / 672x336.
    """
    _check_family(family)
    if size not in SIZES:
        raise ConfigError(f"Unknown size {size!r}; choose one of {', '.join(SIZES)}.")
    if size == "bench" and family != "llava_onevision":
        raise ConfigError(f"size='bench' exists only for 'llava_onevision', not {family!r}.")

    from transformers import AutoConfig

    n_vocab, ids = _token_ids(family, vocab_size)
    # Sub-config overrides may be dicts or config objects; both are merged into the defaults as dicts.
    text_override = overrides.pop("text_config", None)
    vision_override = overrides.pop("vision_config", None)
    if text_override is not None and not isinstance(text_override, Mapping):
        text_override = text_override.to_dict()
    if vision_override is not None and not isinstance(vision_override, Mapping):
        vision_override = vision_override.to_dict()

    cfg: dict[str, Any]
    if family == "llava":
        vision = _merge(_clip_vision(32, 8, size), vision_override)
        n_img = (vision["image_size"] // vision["patch_size"]) ** 2
        cfg = dict(
            model_type="llava",
            text_config=_merge(_text_config("llama", size, n_vocab, ids), text_override),
            vision_config=vision,
            image_token_index=ids["image"],
            image_seq_length=n_img,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
    elif family == "llava_next":
        vision = _merge(_clip_vision(64, 8, size), vision_override)
        cfg = dict(
            model_type="llava_next",
            text_config=_merge(_text_config("llama", size, n_vocab, ids), text_override),
            vision_config=vision,
            image_token_index=ids["image"],
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            image_grid_pinpoints=_pinpoints(vision["image_size"], 2),
            image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        )
    elif family == "llava_next_video":
        vision = _merge(_clip_vision(64, 8, size), vision_override)
        cfg = dict(
            model_type="llava_next_video",
            text_config=_merge(_text_config("llama", size, n_vocab, ids), text_override),
            vision_config=vision,
            image_token_index=ids["image"],
            video_token_index=ids["video"],
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            image_grid_pinpoints=_pinpoints(vision["image_size"], 2),
            spatial_pool_mode="average",
            spatial_pool_stride=2,
            image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
            video_seq_length=(vision["image_size"] // vision["patch_size"] // 2) ** 2,
        )
    elif family == "llava_onevision":
        if size == "tiny":
            vision = _merge(_siglip_vision(32, 4, size), vision_override)
            pinpoints = _pinpoints(vision["image_size"], 3)
        else:
            vision = _merge(_siglip_vision(336, 14, size), vision_override)
            s = vision["image_size"]
            pinpoints = [[s, s], [s, 2 * s], [2 * s, s]]
        cfg = dict(
            model_type="llava_onevision",
            text_config=_merge(_text_config("qwen2", size, n_vocab, ids), text_override),
            vision_config=vision,
            image_token_index=ids["image"],
            video_token_index=ids["video"],
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=pinpoints,
            vision_aspect_ratio="anyres_max_9",
        )
    else:  # qwen2_vl / qwen2_5_vl
        text = _merge(_text_config(family, size, n_vocab, ids), text_override)
        if family == "qwen2_vl":
            vision = dict(
                depth=2,
                embed_dim=32,
                hidden_size=text["hidden_size"],  # merger output = LLM width
                mlp_ratio=2,
                num_heads=4,
                patch_size=8,
                spatial_merge_size=2,
                temporal_patch_size=2,
                initializer_range=_TINY_INIT_RANGE,
            )
        else:
            vision = dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                out_hidden_size=text["hidden_size"],
                num_heads=4,
                patch_size=8,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=32,  # 32 px = 2x2 merged tokens per attention window
                fullatt_block_indexes=[1],
                tokens_per_second=4,
                initializer_range=_TINY_INIT_RANGE,
            )
        vision = _merge(vision, vision_override)
        cfg = dict(
            model_type=family,
            text_config=text,
            vision_config=vision,
            image_token_id=ids["image"],
            video_token_id=ids["video"],
            vision_start_token_id=ids["vision_start"],
            vision_end_token_id=ids["vision_end"],
        )
    cfg.update(
        tie_word_embeddings=False,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        initializer_range=cfg["text_config"].get("initializer_range", _TINY_INIT_RANGE),
    )
    cfg.update(overrides)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


# ----------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------


def tiny_processor(
    family: str, config: PretrainedConfig | None = None, size: str = "tiny", vocab_size: int = 400
) -> ProcessorMixin:
    """The family's real processor (tokenizer + image processor + video processor + chat template).

    Its geometry (image size, patch size, pinpoints, Qwen patch/merge sizes) is read from ``config``
    (default: :func:`tiny_vlm_config` ``(family, size)``), so the placeholder counts match the model.
    """
    _check_family(family)
    if config is None:
        config = tiny_vlm_config(family, size, vocab_size=vocab_size)
    from transformers import (
        CLIPImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        LlavaProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    template = _CHAT_TEMPLATES[family]
    tok = tiny_tokenizer(family, vocab_size, chat_template=template)
    v = config.vision_config
    if family == "llava":
        s, p = v.image_size, v.patch_size
        ip = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        return LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=p,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS
            chat_template=template,
        )
    if family == "llava_next":
        s, p = v.image_size, v.patch_size
        ip = LlavaNextImageProcessor(
            size={"shortest_edge": s},
            crop_size={"height": s, "width": s},
            image_grid_pinpoints=config.image_grid_pinpoints,
        )
        return LlavaNextProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=p,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            chat_template=template,
        )
    if family == "llava_next_video":
        s, p = v.image_size, v.patch_size
        ip = LlavaNextImageProcessor(
            size={"shortest_edge": s},
            crop_size={"height": s, "width": s},
            image_grid_pinpoints=config.image_grid_pinpoints,
        )
        vp = LlavaNextVideoVideoProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        return LlavaNextVideoProcessor(
            video_processor=vp,
            image_processor=ip,
            tokenizer=tok,
            patch_size=p,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            chat_template=template,
        )
    if family == "llava_onevision":
        s, p = v.image_size, v.patch_size
        ip = LlavaOnevisionImageProcessor(
            size={"height": s, "width": s},
            image_grid_pinpoints=config.image_grid_pinpoints,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        vp = LlavaOnevisionVideoProcessor(size={"height": s, "width": s}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return LlavaOnevisionProcessor(
            image_processor=ip,
            tokenizer=tok,
            video_processor=vp,
            num_image_tokens=(s // p) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
            chat_template=template,
        )
    # Qwen
    p, m, t = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
    factor = p * m
    geometry = dict(
        patch_size=p, merge_size=m, temporal_patch_size=t, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD
    )
    # Images keep 4x4..8x8 merged tokens' worth of pixels (a 64 px square -> 4x4 = 16 tokens). Videos, like the
    # real checkpoints (min 128 tokens per temporal patch vs 4 for images), get a larger minimum: 6x6 = 36 tokens
    # per temporal patch of 2 frames (18 per frame), so a 64 px square clip is upscaled to 96 px.
    ip = Qwen2VLImageProcessor(**geometry, size={"shortest_edge": (4 * factor) ** 2, "longest_edge": (8 * factor) ** 2})
    vp = Qwen2VLVideoProcessor(
        **geometry,
        size={"shortest_edge": (6 * factor) ** 2, "longest_edge": (8 * factor) ** 2},
        min_frames=2,
        max_frames=64,
        cap_pixels_per_frame=True,
    )
    cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=template)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


_PRINTABLE = frozenset(string.ascii_letters + string.digits + string.punctuation + " ")


def _silenced_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids whose LM-head row is zeroed: special tokens and byte tokens that do not decode to printable ASCII."""
    silenced = set(tokenizer.all_special_ids)
    for i in range(len(tokenizer)):
        piece = tokenizer.decode([i])
        if not piece or any(ch not in _PRINTABLE for ch in piece):
            silenced.add(i)
    return sorted(silenced)


def _silence_tokens(model: torch.nn.Module, token_ids: list[int]) -> None:
    """Zero LM-head rows. A zero row has logit 0 while the max over ~250 random rows is clearly positive, so
    greedy decoding never emits these tokens (eos, pad, image/video placeholders, partial UTF-8 bytes)."""
    import torch

    head = model.get_output_embeddings()
    with torch.no_grad():
        for i in token_ids:
            if 0 <= i < head.weight.shape[0]:
                head.weight[i].zero_()


def build_tiny_vlm(
    family: str,
    save_dir: str | Path,
    size: str = "tiny",
    seed: int = 0,
    vocab_size: int = 400,
    **overrides: Any,
) -> Path:
    """Build a random-initialised VLM of ``family`` with its processor and save both into ``save_dir``.

    ``AutoModelForImageTextToText.from_pretrained(save_dir)`` and ``AutoProcessor.from_pretrained(save_dir)``
    load them back (no network). Weights depend only on ``seed`` (``torch.manual_seed(seed)`` inside a forked
    RNG, so the caller's global RNG state is left untouched).

    Args:
        family: one of :data:`FAMILIES`.
        save_dir: target directory (created if needed).
        size: ``"tiny"`` or ``"bench"`` (``"llava_onevision"`` only).
        seed: weight seed.
        vocab_size: target BPE vocabulary size of the tokenizer.
        **overrides: passed to :func:`tiny_vlm_config`.

    Returns:
        ``Path(save_dir)``.
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    config = tiny_vlm_config(family, size, vocab_size=vocab_size, **overrides)
    processor = tiny_processor(family, config=config, vocab_size=vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.eval()
    tok = processor.tokenizer
    _silence_tokens(model, _silenced_token_ids(tok))
    text = config.get_text_config()
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        do_sample=False,
    )
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    (save_dir / "mmfast_tiny.json").write_text(
        json.dumps({"family": family, "size": size, "seed": seed, "vocab_size": vocab_size}, indent=2)
    )
    return save_dir


# ----------------------------------------------------------------------------------------------------------
# Test inputs
# ----------------------------------------------------------------------------------------------------------


def make_test_image(seed: int = 0, size: int | tuple[int, int] = 64) -> Image.Image:
    """A deterministic RGB ``PIL.Image`` with structure (gradients, a rectangle, noise); ``size`` is (W, H) or int."""
    from PIL import Image

    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi, size=3)
    freq = rng.uniform(0.05, 0.3, size=3)
    img = np.stack([127 + 100 * np.sin(freq[c] * (xx if c % 2 else yy) + phase[c]) for c in range(3)], axis=-1)
    x0, y0 = rng.integers(0, max(1, w // 2)), rng.integers(0, max(1, h // 2))
    img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, size=3)
    img += rng.normal(0, 12, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def make_test_video(num_frames: int = 8, size: int | tuple[int, int] = 64, seed: int = 0) -> np.ndarray:
    """A deterministic ``(T, H, W, 3)`` uint8 clip: a coloured square moving over a textured background."""
    w, h = (size, size) if isinstance(size, int) else size
    base = np.asarray(make_test_image(seed, (w, h)), dtype=np.int16)
    rng = np.random.default_rng(seed + 1)
    color = rng.integers(0, 256, size=3)
    side = max(2, min(w, h) // 4)
    frames = []
    for t in range(num_frames):
        f = base.copy()
        x = int((w - side) * t / max(1, num_frames - 1))
        y = int((h - side) * (0.5 + 0.4 * math.sin(t)))
        f[y : y + side, x : x + side] = color
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
    return np.stack(frames)


# ----------------------------------------------------------------------------------------------------------
# Tiny AR image generators (Janus image-generation mode, Emu3-Gen)
# ----------------------------------------------------------------------------------------------------------

# Janus: DeepSeek's SFT format ("<|User|>: ...\n\n<|Assistant|>:"), text parts only.
_JANUS_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}<|User|>: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '\\n\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)
_JANUS_SPECIALS: tuple[str, ...] = (
    "<|begin_of_sentence|>",  # bos (prepended)
    "<|end_of_sentence|>",  # eos
    "<|pad|>",
    "<image_placeholder>",
    "<begin_of_image>",
    "<end_of_image>",
    "<|User|>",
    "<|Assistant|>",
)
# Emu3: the real checkpoints' names (EOL = <|extra_200|>, EOF = <|extra_201|>, bos / eos = extra_203 / 204).
_EMU3_SPECIALS: tuple[str, ...] = (
    "<|extra_203|>",  # bos (the processor prepends it as text)
    "<|extra_204|>",  # eos
    "<|endoftext|>",  # pad
    "<image>",
    "<|image start|>",
    "<|image end|>",
    "<|image token|>",
    "<|extra_200|>",  # end of line (after each row of visual tokens)
    "<|extra_201|>",  # end of frame
)


def _tiny_bpe(specials: tuple[str, ...], vocab_size: int, prepend_bos: bool, extra_tokens: tuple[str, ...] = ()) -> Any:
    """An in-memory byte-level BPE (trained on the fixed corpus) with ``specials`` first and ``extra_tokens`` last."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    if prepend_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{specials[0]} $A",
            pair=f"{specials[0]} $A {specials[0]} $B",
            special_tokens=[(specials[0], tok.token_to_id(specials[0]))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if extra_tokens:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_tokens])
    return tok


def _save_tiny(model: Any, processor: Any, save_dir: str | Path, meta: dict[str, Any]) -> Path:
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    (save_dir / "mmfast_tiny.json").write_text(json.dumps(meta, indent=2))
    return save_dir


def build_tiny_janus(save_dir: str | Path, seed: int = 0) -> Path:
    """A random-initialised ``JanusForConditionalGeneration`` + ``JanusProcessor`` saved into ``save_dir``.

    Image generation: a 4x4 grid of image tokens (vision 32 px / patch 8, ``num_image_tokens=16``) over a
    codebook of 64 entries (VQ embed dim 8), decoded by the VQ decoder to 32x32 px. Llama text model: hidden 64,
    2 layers, 4 heads / 2 KV heads; in-memory BPE (~320 tokens) with Janus's special tokens and a chat template
    in DeepSeek's SFT format. ``generation_config`` carries ``generation_kwargs={"boi_token_id": ...}`` and the
    bos / pad ids that ``generate(generation_mode="image")`` needs. Weights depend only on ``seed`` (forked RNG).
    """
    import torch
    from transformers import (
        GenerationConfig,
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessor,
        JanusProcessor,
        PreTrainedTokenizerFast,
    )

    bpe = _tiny_bpe(_JANUS_SPECIALS, 320, prepend_bos=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=_JANUS_SPECIALS[0],
        eos_token=_JANUS_SPECIALS[1],
        pad_token=_JANUS_SPECIALS[2],
        padding_side="left",
        extra_special_tokens={
            "image_token": _JANUS_SPECIALS[3],
            "boi_token": _JANUS_SPECIALS[4],
            "eoi_token": _JANUS_SPECIALS[5],
        },
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in _JANUS_SPECIALS}
    hidden = 64
    text = dict(
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        initializer_range=_TINY_INIT_RANGE,
        bos_token_id=ids[_JANUS_SPECIALS[0]],
        eos_token_id=ids[_JANUS_SPECIALS[1]],
        pad_token_id=ids[_JANUS_SPECIALS[2]],
        tie_word_embeddings=False,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2.0,
        image_size=32,
        patch_size=8,
        projection_dim=hidden,
        depth=2,
        num_image_tokens=16,
    )
    vq = dict(
        embed_dim=8,
        num_embeddings=64,
        latent_channels=32,
        base_channels=32,  # GroupNorm(32) needs multiples of 32
        channel_multiplier=[1, 1, 2, 2],  # 3 upsamplings: 4x4 tokens -> 32x32 px
        num_res_blocks=1,
        projection_dim=hidden,
        image_token_embed_dim=hidden,
        num_hidden_layers=2,
    )
    config = JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=ids[_JANUS_SPECIALS[3]],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=text["bos_token_id"],
        eos_token_id=text["eos_token_id"],
        pad_token_id=text["pad_token_id"],
        generation_kwargs={"boi_token_id": ids[_JANUS_SPECIALS[4]]},
    )
    ip = JanusImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = JanusProcessor(image_processor=ip, tokenizer=tok, chat_template=_JANUS_TEMPLATE, num_image_tokens=16)
    return _save_tiny(model, processor, save_dir, {"family": "janus", "seed": seed})


def build_tiny_emu3(save_dir: str | Path, seed: int = 0) -> Path:
    """A random-initialised ``Emu3ForConditionalGeneration`` + ``Emu3Processor`` saved into ``save_dir``.

    Image generation with ``image_area=1024`` (the processor's default is 720x720): a 4x4 grid of visual tokens
    (``<|visual token 000000|>`` ... over a codebook of 64 entries) plus one end-of-line token ``<|extra_200|>``
    per row, decoded by the VQ decoder (8x spatial factor, as the processor assumes) to 32x32 px. Text model:
    hidden 64, 2 layers, 4 heads / 2 KV heads; in-memory BPE with Emu3's special tokens; the visual tokens have
    the last ids and ``config.vocabulary_map`` maps every token name to its id, as in the real checkpoints.
    Weights depend only on ``seed`` (forked RNG).
    """
    import torch
    from transformers import (
        Emu3Config,
        Emu3ForConditionalGeneration,
        Emu3ImageProcessor,
        Emu3Processor,
        GenerationConfig,
        PreTrainedTokenizerFast,
    )

    codebook = 64
    visual = tuple(f"<|visual token {i:06d}|>" for i in range(codebook))
    bpe = _tiny_bpe(_EMU3_SPECIALS, 320, prepend_bos=False, extra_tokens=visual)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=_EMU3_SPECIALS[0],
        eos_token=_EMU3_SPECIALS[1],
        pad_token=_EMU3_SPECIALS[2],
        padding_side="left",
        extra_special_tokens={
            "image_token": _EMU3_SPECIALS[3],
            "boi_token": _EMU3_SPECIALS[4],
            "eoi_token": _EMU3_SPECIALS[5],
            "image_wrapper_token": _EMU3_SPECIALS[6],
            "eof_token": _EMU3_SPECIALS[8],
        },
    )
    vocab = tok.get_vocab()
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        initializer_range=_TINY_INIT_RANGE,
        bos_token_id=vocab[_EMU3_SPECIALS[0]],
        eos_token_id=vocab[_EMU3_SPECIALS[1]],
        pad_token_id=vocab[_EMU3_SPECIALS[2]],
    )
    vq = dict(
        codebook_size=codebook,
        embed_dim=4,
        latent_channels=4,
        temporal_downsample_factor=1,
        base_channels=32,  # GroupNorm(32)
        channel_multiplier=[1, 1, 2, 2],  # spatial factor 8 (= Emu3Processor.downsample_ratio)
        num_res_blocks=1,
        attn_resolutions=[],
        hidden_size=64,  # the VQ middle attention runs at base_channels * channel_multiplier[-1]
    )
    # image_area (pixels of the generated image) is a field of the original Emu3-Gen config; the adapter reads it
    config = Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocab, image_area=32 * 32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Emu3ForConditionalGeneration(config)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"]
    )
    ip = Emu3ImageProcessor(
        min_pixels=32 * 32, max_pixels=64 * 64, spatial_factor=8, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = Emu3Processor(image_processor=ip, tokenizer=tok)
    return _save_tiny(model, processor, save_dir, {"family": "emu3", "seed": seed})
