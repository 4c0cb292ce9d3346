"""Pipelines on tiny random models of the real transformers classes (the session's shared models, see conftest).

Every model is saved with ``save_pretrained`` and loaded back through the normal ``from_pretrained`` path
(``mmfast.pipeline(model=<dir>)``). The baseline must be token-identical to plain ``model.generate``; every method on
every family is in test_matrix.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import mmfast
from mmfast.errors import InvalidInputError
from mmfast.train.tiny_models import FAMILIES, VIDEO_FAMILIES, make_test_image, make_test_video

pytestmark = pytest.mark.usefixtures("one_thread")
GEN = {"max_new_tokens": 8}
Q = "What is this?"


@pytest.fixture
def pipes(vlm_pipes):
    """family -> (image-qa pipeline loaded from disk, video-qa pipeline sharing the model or None)."""
    return vlm_pipes


def _plain(pipe, inputs) -> str:
    """Plain ``model.generate`` on the processor outputs (no mmfast in the loop)."""
    kwargs = {k: v for k, v in inputs.items() if not k.startswith("mmfast_")}
    ids = pipe.model.generate(**kwargs, **GEN, do_sample=False)
    return pipe.processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_baseline_identical_to_plain_generate_image(pipes, family):
    img_pipe, _ = pipes[family]
    for seed in (0, 1):
        image = make_test_image(seed)
        out = img_pipe(image=image, question=Q, **GEN)
        assert out["answer"] == _plain(img_pipe, img_pipe.adapter.preprocess(Q, images=[image]))
        st = out["stats"]
        assert st["visual_tokens_in"] == st["visual_tokens_kept"] >= 16
        assert st["new_tokens"] == 8 and st["kv_bytes"] > 0 and st["prefill_ms"] > 0 and st["decode_ms"] > 0
    # the answer depends on the image (otherwise identity tests would be weak)
    answers = {img_pipe(image=make_test_image(s), question=Q, **GEN)["answer"] for s in range(3)}
    assert len(answers) > 1


@pytest.mark.parametrize("family", ["llava", *VIDEO_FAMILIES])
def test_baseline_identical_to_plain_generate_video(pipes, family):
    _, vid_pipe = pipes[family]
    video = make_test_video(8)
    out = vid_pipe(video=video, question="What happens?", **GEN)
    assert out["answer"] == _plain(vid_pipe, vid_pipe.adapter.preprocess("What happens?", video=video))
    assert out["stats"]["frames"] == 8


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pool_factor2_keeps_a_quarter(pipes, family):
    img_pipe, _ = pipes[family]
    st = type(img_pipe)(img_pipe.adapter, mmfast.accel.resolve("pool(factor=2)"))(
        image=make_test_image(0), question=Q, **GEN
    )["stats"]
    assert st["visual_tokens_kept"] * 4 == st["visual_tokens_in"]


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_kv_window_matches_a_manual_streaming_loop(pipes, family):
    """Evict inside generate == a hand-written loop that evicts and feeds explicit absolute positions."""
    img_pipe, _ = pipes[family]
    sink, recent, steps = 3, 6, 6
    image = make_test_image(1)
    out = type(img_pipe)(img_pipe.adapter, mmfast.accel.resolve(f"kv_window(sink={sink},recent={recent})"))(
        image=image, question=Q, max_new_tokens=steps
    )
    model, adapter = img_pipe.model, img_pipe.adapter
    inputs = adapter.preprocess(Q, images=[image])
    gen_inputs, _ = adapter.build_inputs(inputs, adapter.visual_tokens(inputs))
    embeds = gen_inputs["inputs_embeds"]
    n = embeds.shape[1]
    with torch.inference_mode():
        cache = DynamicCache()
        logits = model(inputs_embeds=embeds, past_key_values=cache, use_cache=True).logits
        tokens = []
        for step in range(steps):
            for layer in cache.layers:  # StreamingLLM eviction: first `sink` + last `recent`
                s = layer.keys.shape[-2]
                if s > sink + recent:
                    idx = torch.cat([torch.arange(sink), torch.arange(s - recent, s)])
                    layer.keys, layer.values = layer.keys[:, :, idx], layer.values[:, :, idx]
            tok = logits[0, -1].argmax()
            tokens.append(int(tok))
            if step == steps - 1:
                break
            pos = torch.tensor([[n + step]])
            logits = model(input_ids=tok.view(1, 1), position_ids=pos, past_key_values=cache, use_cache=True).logits
    ref = img_pipe.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert out["answer"] == ref


def test_batches_and_errors(pipes):
    img_pipe, vid_pipe = pipes["llava"]
    outs = img_pipe(image=[make_test_image(0), make_test_image(1)], question=Q, **GEN)
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0]["answer"] == img_pipe(image=make_test_image(0), question=Q, **GEN)["answer"]
    outs = img_pipe([{"image": make_test_image(0), "question": Q}, {"image": make_test_image(1), "question": "Why?"}], **GEN)
    assert len(outs) == 2
    frames = [make_test_image(i) for i in range(4)]  # a list of images is ONE video
    assert isinstance(vid_pipe(video=frames, question=Q, **GEN), dict)
    with pytest.raises(InvalidInputError, match="question"):
        img_pipe(image=make_test_image(0))
    with pytest.raises(InvalidInputError):
        img_pipe(image=None, question=Q)
    with pytest.raises(InvalidInputError):
        img_pipe(image=[make_test_image(0)] * 2, question=[Q] * 3)


def test_generation_kwargs_pass_through(pipes):
    img_pipe, _ = pipes["qwen2_vl"]
    st = img_pipe(image=make_test_image(0), question=Q, max_new_tokens=5, min_new_tokens=5)["stats"]
    assert st["new_tokens"] == 5


def test_vision_methods_choose_the_position_policy(pipes):
    """A vision method with ``positions = "original"`` keeps each kept token's position (FastV-style); the default
    renumbers the shorter prompt 0..L'-1 (what a shorter prompt would get)."""
    from dataclasses import dataclass

    from mmfast.accel import RandomKeep

    @dataclass
    class KeepPositions(RandomKeep):
        positions = "original"

    img, _ = pipes["llava"]
    ad = img.adapter
    inputs = ad.preprocess(Q, images=[make_test_image(0)])
    for method, expect_ids in ((RandomKeep(keep=0.25), False), (KeepPositions(keep=0.25), True)):
        with method(ad):
            items = [method.reduce(it) for it in ad.visual_tokens(inputs)]
            gen, _ = ad.build_inputs(inputs, items)
        assert ("position_ids" in gen) == expect_ids
        if expect_ids:
            pos = gen["position_ids"][0]
            n = inputs["input_ids"].shape[1]
            assert pos[-1] == n - 1 and bool((pos.diff() > 0).all()) and pos.numel() < n


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"max_new_tokens": -5}, {"max_new_tokens": "8"},
                                 {"max_new_tokens": 2, "min_new_tokens": 4}])
def test_bad_token_counts_are_typed_errors(vlm_pipes, bad):
    from mmfast.errors import InvalidInputError
    from mmfast.train.tiny_models import make_test_image

    img, _ = vlm_pipes["llava_onevision"]
    with pytest.raises(InvalidInputError, match="new_tokens"):
        img(question="What is this?", image=make_test_image(0), **bad)


def test_cli_bench_list_and_unwritable_generate_out(tmp_path):
    from typer.testing import CliRunner

    from mmfast.cli import app

    r = CliRunner().invoke(app, ["bench", "--list"])
    assert r.exit_code == 0 and "var-quality" in r.output and "video-stream" in r.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = CliRunner().invoke(app, ["generate", "--labels", "1", "--out", str(blocker / "g.png")])
    assert r.exit_code != 0 and isinstance(r.exception, mmfast.errors.InvalidInputError)
    assert "cannot write --out" in str(r.exception)
