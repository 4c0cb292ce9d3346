"""Tiny random VLMs of real HF families (mmfast.train.tiny_models): build, save, reload through the Auto classes, run."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from mmfast.errors import ConfigError
from mmfast.train.tiny_models import (
    FAMILIES,
    VIDEO_FAMILIES,
    build_tiny_vlm,
    make_test_image,
    make_test_video,
    tiny_processor,
    tiny_tokenizer,
    tiny_vlm_config,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer  # noqa: E402

EXPECTED_CLASSES = {
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor", "CLIPImageProcessor", None),
    "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor", "LlavaNextImageProcessor", None),
    "llava_next_video": (
        "LlavaNextVideoForConditionalGeneration",
        "LlavaNextVideoProcessor",
        "LlavaNextImageProcessor",
        "LlavaNextVideoVideoProcessor",
    ),
    "llava_onevision": (
        "LlavaOnevisionForConditionalGeneration",
        "LlavaOnevisionProcessor",
        "LlavaOnevisionImageProcessor",
        "LlavaOnevisionVideoProcessor",
    ),
    "qwen2_vl": (
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLProcessor",
        "Qwen2VLImageProcessor",
        "Qwen2VLVideoProcessor",
    ),
    "qwen2_5_vl": (
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLProcessor",
        "Qwen2VLImageProcessor",
        "Qwen2VLVideoProcessor",
    ),
}

# Processor outputs (besides input_ids / attention_mask) the model needs, per family.
IMAGE_KEYS = {
    "llava": {"pixel_values"},
    "llava_next": {"pixel_values", "image_sizes"},
    "llava_next_video": {"pixel_values", "image_sizes"},
    "llava_onevision": {"pixel_values", "image_sizes", "batch_num_images"},
    "qwen2_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "qwen2_5_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
}
VIDEO_KEYS = {
    "llava_next_video": {"pixel_values_videos"},
    "llava_onevision": {"pixel_values_videos"},
    "qwen2_vl": {"pixel_values_videos", "video_grid_thw", "mm_token_type_ids"},
    "qwen2_5_vl": {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids"},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (model, processor), each built once, saved and loaded back through the Auto classes."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            path = build_tiny_vlm(family, tmp_path_factory.mktemp(family), seed=0)
            model = AutoModelForImageTextToText.from_pretrained(path).eval()
            processor = AutoProcessor.from_pretrained(path)
            cache[family] = (model, processor, path)
        return cache[family]

    return get


def _prompt(processor, kind: str, question: str = "What is this?") -> str:
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _feature_rows(output) -> int:
    """Rows of a get_image_features / get_video_features result (a tensor, or a list/tuple per image/video)."""
    feats = output.pooler_output if hasattr(output, "pooler_output") else output
    if isinstance(feats, (list, tuple)):
        return sum(_feature_rows(f) for f in feats)
    return feats.reshape(-1, feats.shape[-1]).shape[0]


def _call_with_accepted(fn, inputs) -> object:
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in inputs.items() if k in params and k not in ("input_ids", "attention_mask")})


def _generate(model, inputs, n: int = 8) -> list[int]:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_real_classes_and_chat_template(built, family):
    model, processor, path = built(family)
    model_cls, proc_cls, image_cls, video_cls = EXPECTED_CLASSES[family]
    assert type(model).__name__ == model_cls
    assert type(processor).__name__ == proc_cls
    assert type(processor.image_processor).__name__ == image_cls
    assert type(getattr(processor, "video_processor", None)).__name__ == (video_cls or "NoneType")
    text = _prompt(processor, "image")
    assert text.count(processor.image_token) == 1 and "What is this?" in text
    if family.startswith("qwen"):
        assert "<|vision_start|><|image_pad|><|vision_end|>What is this?" in text
        assert text.endswith("<|im_start|>assistant\n")
    elif family == "llava_onevision":
        assert text == "<|im_start|>user <image>\nWhat is this?<|im_end|><|im_start|>assistant\n"
    else:
        assert text == "USER: <image>\nWhat is this? ASSISTANT:"
    if family in VIDEO_FAMILIES:
        assert _prompt(processor, "video").count(processor.video_token) == 1
    # The tokenizer alone reloads with its chat template and special-token attributes.
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and tok.image_token == processor.image_token
    ids = tok("What is in the image?", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "What is in the image?"
    # Config and tokenizer agree on the placeholder ids and vocab.
    cfg = model.config
    assert getattr(cfg, "image_token_id", None) == processor.image_token_id
    assert cfg.get_text_config().vocab_size == len(tok)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_generate_and_token_count(built, family):
    model, processor, _ = built(family)
    text = _prompt(processor, "image")
    inputs = processor(text=text, images=[make_test_image(0, 64)], return_tensors="pt")
    assert IMAGE_KEYS[family] <= set(inputs) - {"input_ids", "attention_mask"}
    n_placeholders = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert n_placeholders >= 16
    with torch.inference_mode():
        feats = _call_with_accepted(model.model.get_image_features, inputs)
    assert _feature_rows(feats) == n_placeholders

    new = _generate(model, inputs)
    assert len(new) == 8, "special tokens are silenced, so generation never stops early"
    assert len(set(new)) >= 3, f"degenerate generation {new}"
    assert not set(new) & set(processor.tokenizer.all_special_ids)
    decoded = processor.decode(new)
    assert decoded and decoded.isascii() and decoded.isprintable()

    # The answer depends on the image.
    answers = {tuple(new)}
    for seed in (1, 2):
        other = processor(text=text, images=[make_test_image(seed, 64)], return_tensors="pt")
        answers.add(tuple(_generate(model, other)))
    assert len(answers) >= 2


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_generate_and_token_count(built, family):
    model, processor, _ = built(family)
    text = _prompt(processor, "video", "What happens?")
    clip = make_test_video(8, 64, seed=0)
    as_array = processor(text=text, videos=[clip], do_sample_frames=False, return_tensors="pt")
    as_frames = processor(text=text, videos=[[Image.fromarray(f) for f in clip]], return_tensors="pt")
    assert VIDEO_KEYS[family] <= set(as_array) - {"input_ids", "attention_mask"}
    assert torch.equal(as_array["input_ids"], as_frames["input_ids"])
    torch.testing.assert_close(as_array["pixel_values_videos"], as_frames["pixel_values_videos"])

    n_placeholders = int((as_array["input_ids"] == processor.video_token_id).sum())
    with torch.inference_mode():
        feats = _call_with_accepted(model.model.get_video_features, as_array)
    assert _feature_rows(feats) == n_placeholders
    # >= 16 tokens per frame (Qwen: 36 per temporal patch of 2 frames); OneVision adds one newline per video.
    assert (n_placeholders - (family == "llava_onevision")) / len(clip) >= 16

    new = _generate(model, as_array)
    assert len(new) == 8 and len(set(new)) >= 3
    other = processor(text=text, videos=[make_test_video(8, 64, seed=5)], return_tensors="pt")
    assert _generate(model, other) != new


def test_seed_reproducible_and_overrides(tmp_path):
    a = build_tiny_vlm("llava", tmp_path / "a", seed=3)
    b = build_tiny_vlm("llava", tmp_path / "b", seed=3)
    c = build_tiny_vlm("llava", tmp_path / "c", seed=4, text_config={"num_hidden_layers": 1})
    ma, mb, mc = (AutoModelForImageTextToText.from_pretrained(p) for p in (a, b, c))
    wa, wb = ma.get_input_embeddings().weight, mb.get_input_embeddings().weight
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, mc.get_input_embeddings().weight)
    assert mc.config.text_config.num_hidden_layers == 1


def test_tiny_geometry():
    # Qwen M-RoPE sections sum to head_dim / 2.
    for family in ("qwen2_vl", "qwen2_5_vl"):
        text = tiny_vlm_config(family).text_config
        head_dim = text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    # Token grids have even sides (spatial 2x2 pooling): LLaVA 4x4, LLaVA-NeXT-Video / OneVision base 8x8.
    for family, side in (("llava", 4), ("llava_next_video", 8), ("llava_onevision", 8)):
        v = tiny_vlm_config(family).vision_config
        assert v.image_size // v.patch_size == side
    tok = tiny_tokenizer("qwen2_vl")
    assert 300 <= len(tok) <= 600
    assert tok.convert_ids_to_tokens(tok.image_token_id) == "<|image_pad|>"


def test_bench_config_token_counts():
    config = tiny_vlm_config("llava_onevision", size="bench")
    processor = tiny_processor("llava_onevision", config=config)
    text = _prompt(processor, "video")
    inputs = processor(text=text, videos=[np.zeros((16, 336, 336, 3), dtype=np.uint8)], return_tensors="pt")
    n = int((inputs["input_ids"] == processor.video_token_id).sum())
    assert n == 16 * 144 + 1
    text = _prompt(processor, "image")
    inputs = processor(text=text, images=[make_test_image(0, 336)], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 576 + 576 + 24


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        tiny_vlm_config("blip2")
    with pytest.raises(ConfigError):
        tiny_vlm_config("qwen2_vl", size="bench")
    with pytest.raises(ConfigError):
        build_tiny_vlm("llava", tmp_path, size="huge")


@pytest.mark.slow
def test_bench_model_prefill(tmp_path):
    path = build_tiny_vlm("llava_onevision", tmp_path / "bench", size="bench")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(text=_prompt(processor, "video"), videos=[make_test_video(16, 336)], return_tensors="pt")
    with torch.inference_mode():
        out = model(**inputs, logits_to_keep=1)
    assert out.logits.shape[:2] == (1, 1)
