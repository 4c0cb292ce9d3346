"""FastV (prefill stage) against a hand-written prefill, VisionZip on hand-built tokens, and how both compose."""

from __future__ import annotations

import pytest
import torch
from conftest import eager_attention, prompt_embeds
from transformers import DynamicCache

import mmfast
from mmfast.accel.visionzip import VisionZip
from mmfast.errors import ConfigError, IncompatibleAcceleratorError
from mmfast.models.attention import cache_kwarg
from mmfast.train.tiny_models import make_test_image, make_test_video
from mmfast.types import VisualTokens

Q = "What is this?"
STEPS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(pipe, spec, **kw):
    return type(pipe)(pipe.adapter, mmfast.accel.resolve(spec))(question=Q, max_new_tokens=STEPS, **kw)


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_fastv_equals_a_hand_written_prefill(vlm_pipes, family):
    """Layer 0 on every token; the last prompt token's head-mean attention in layer 0 (eager) picks a quarter of the
    visual tokens; layer 1 reads only the kept ones at their original RoPE positions; then plain greedy decoding."""
    img, _ = vlm_pipes[family]
    image = make_test_image(1)
    out = _run(img, "fastv(k=1,keep=0.25)", image=image)
    model, ad = img.model, img.adapter
    embeds, visual = prompt_embeds(img, Q, image)
    n = embeds.shape[1]
    with eager_attention(model):
        attn = model(inputs_embeds=embeds, output_attentions=True).attentions[0]
    score = attn[0, :, -1].mean(0)
    vis = visual.nonzero().flatten()
    top = vis[score[vis].topk(round(0.25 * vis.numel())).indices]
    keep = torch.cat([(~visual).nonzero().flatten(), top]).sort().values
    lm = ad.language_model
    pos = torch.arange(n)[None]
    cos, sin = lm.rotary_emb(embeds, pos)
    cache = DynamicCache()
    with torch.no_grad():
        h = embeds
        for i, layer in enumerate(ad.decoder_layers):
            if i == 1:  # drop the unpicked visual tokens, keep the original positions of the rest
                h, cos, sin = h[:, keep], cos[:, keep], sin[:, keep]
            h = layer(h, position_embeddings=(cos, sin), use_cache=True, **{cache_kwarg(layer): cache})
        logits = model.lm_head(lm.norm(h))
        tokens = []
        for step in range(STEPS):
            tok = logits[0, -1].argmax()
            tokens.append(int(tok))
            step_pos = torch.tensor([[n + step]])
            logits = model(input_ids=tok.view(1, 1), position_ids=step_pos, use_cache=True,
                           **{cache_kwarg(model): cache}).logits
    assert cache.layers[1].keys.shape[-2] == keep.numel() + STEPS  # the pruned prompt + every fed token
    assert out["stats"]["visual_tokens_late"] == top.numel()
    assert out["answer"] == img.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_fastv_stacks_with_kv_methods_and_validates(vlm_pipes):
    img, vid = vlm_pipes["qwen2_vl"]
    st = _run(img, "fastv(k=1,keep=0.5)+lookm(budget=0.2)", image=make_test_image(0))["stats"]
    assert st["new_tokens"] == STEPS and st["kv_tokens"] == round(0.2 * st["prompt_tokens"])
    st = _run(vid, "fastv(k=1,keep=0.5)+kv_window(sink=2,recent=8)", video=make_test_video(4))["stats"]
    assert st["kv_tokens_end"] == 10 and st["visual_tokens_late"] * 2 <= st["visual_tokens_kept"]
    with pytest.raises(IncompatibleAcceleratorError):  # both act inside the decoder layers
        mmfast.accel.resolve("fastv+zipvl")
    for bad in ("fastv(k=0)", "fastv(keep=0)", "fastv(keep=1.5)", "visionzip(keep=0.5,dominant=3)",
                "visionzip(dominant=-1,contextual=2)", "visionzip(dominant=0,contextual=0)"):
        with pytest.raises(ConfigError):
            mmfast.accel.resolve(bad)
    with pytest.raises(IncompatibleAcceleratorError, match="decoder layers"):  # the tiny models have 2 layers
        _run(img, "fastv(k=2)", image=make_test_image(0))


def _grid_tokens(attention: list[float], keys: torch.Tensor, feats: torch.Tensor) -> VisualTokens:
    n = feats.shape[0]
    tok = VisualTokens.from_grid(feats, [(0, 1, 1, n, False)], kind="image", index=0, token_id=1)
    tok.tower = {"attention": torch.tensor(attention), "keys": keys}
    return tok


def test_visionzip_dominant_and_contextual_tokens_by_hand():
    # 8 tokens in one crop; the tower attends most to 5 and 2; keys: 0,1,3 point one way, 4,6,7 another
    keys = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [0.8, 0.2], [0, 1.0], [1, 1], [0.1, 0.9], [0.2, 0.8]])
    feats = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 3)
    tok = _grid_tokens([0.0, 0.05, 0.3, 0.0, 0.1, 0.5, 0.0, 0.05], keys, feats)
    out = VisionZip(dominant=2, contextual=2).reduce(tok)
    # dominant: 5 and 2; the rest [0, 1, 3, 4, 6, 7]: targets every 3rd -> 0 and 4; 1, 3 -> 0 and 6, 7 -> 4
    assert out.source.tolist() == [0, 2, 4, 5]
    assert out.features[:, 0].tolist() == [0 + (1 + 3) / 2, 2, 4 + (6 + 7) / 2, 5]
    assert out.sizes.tolist() == [3, 1, 3, 1]
    assert VisionZip(keep=0.5).counts(8) == (3, 1) and VisionZip(keep=0.25).counts(64) == (14, 2)
    assert VisionZip(dominant=6, contextual=5).counts(8) == (6, 2)


def test_visionzip_works_per_crop_and_keeps_layout(vlm_pipes):
    ad = vlm_pipes["llava_onevision"][0].adapter
    for kw in ({"images": [make_test_image(0)]}, {"video": make_test_video(4)}):
        inputs = ad.preprocess(Q, **kw)
        with torch.no_grad():
            items = VisionZip(keep=0.25).encode(ad, inputs)
        for item in items:
            assert item.tower["attention"].shape == (len(item),) and item.tower["keys"].shape[0] == len(item)
            out = VisionZip(keep=0.25).reduce(item)
            assert int(out.layout_mask.sum()) == int(item.layout_mask.sum())  # newlines stay
            for key in torch.unique(item.coords[~item.layout_mask][:, :2], dim=0):  # each crop / frame
                n = int(((item.coords[:, :2] == key).all(1) & ~item.layout_mask).sum())
                kept = int(((out.coords[:, :2] == key).all(1) & ~out.layout_mask).sum())
                assert kept == min(n, max(1, round(0.25 * n)))
            assert float(out.sizes[~out.layout_mask].sum()) == float((~item.layout_mask).sum())


def test_fastv_under_eager_attention_slices_the_masks(vlm_pipes):
    """With eager attention every layer gets an explicit mask: the prefill stage cuts it to the kept tokens at
    prefill and to the entries each layer holds while decoding, so eager answers as sdpa does."""
    img, _ = vlm_pipes["llava_onevision"]
    sdpa = _run(img, "fastv(k=1,keep=0.25)", image=make_test_image(2))
    img.model.set_attn_implementation("eager")
    try:
        eager = _run(img, "fastv(k=1,keep=0.25)", image=make_test_image(2))
    finally:
        img.model.set_attn_implementation("sdpa")
    assert eager["answer"] == sdpa["answer"] and eager["stats"]["kv_bytes"] == sdpa["stats"]["kv_bytes"]


def test_kv_methods_after_fastv_see_original_positions(vlm_pipes, monkeypatch):
    """Layers after FastV's pruning cache fewer prompt entries; the KV stage gets their original positions (so
    LOOK-M's text prior still knows which entries are visual) and the whole prompt length as seen."""
    from mmfast.accel.lookm import LookM

    seen: dict[int, tuple] = {}
    compress = LookM.compress

    def spy(self, keys, values, ctx):
        if ctx.phase == "prefill":
            seen[ctx.layer_idx] = (ctx.entry_positions(keys)[0, 0].clone(), ctx.seen, ctx.prompt_len)
        return compress(self, keys, values, ctx)

    monkeypatch.setattr(LookM, "compress", spy)
    img, _ = vlm_pipes["llava"]
    st = _run(img, "fastv(k=1,keep=0.25)+lookm(budget=0.5)", image=make_test_image(0))["stats"]
    n = st["prompt_tokens"]
    pos0, seen0, _ = seen[0]
    pos1, seen1, prompt1 = seen[1]
    assert torch.equal(pos0, torch.arange(n)) and seen0 == n
    assert seen1 == prompt1 == n and pos1.numel() == n - (st["visual_tokens_kept"] - st["visual_tokens_late"])
    assert bool((pos1.diff() > 0).all()) and int(pos1[-1]) == n - 1  # kept prompt tokens, by original position
