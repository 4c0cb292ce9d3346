"""Turbo, TokenFLEX and adaptive pooling: hand-built merges, attention identities, the method x family matrix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.accel.tokenflex import FlexProjector, adaptive_pool_tokens, flex_items
from mmfast.accel.turbo import Turbo
from mmfast.errors import ConfigError, IncompatibleAcceleratorError
from mmfast.kernels.token_merge import bipartite_merge, fold_merge, layer_schedule
from mmfast.models.vision import proportional_attention
from mmfast.train.tiny_models import FAMILIES, make_test_image, make_test_video
from mmfast.types import VisualTokens

pytestmark = pytest.mark.usefixtures("one_thread")
GEN = {"max_new_tokens": 6}
Q = "What is this?"
FLEX = ("llava", "llava_next", "llava_next_video", "llava_onevision")


def _e(*idx: float) -> torch.Tensor:
    v = torch.zeros(4)
    for i, w in zip(idx[::2], idx[1::2]):
        v[int(i)] = w
    return v


def _toks(metric: torch.Tensor, size: list[float] | None = None):
    t = metric.shape[0]
    x = torch.arange(t, dtype=torch.float32)[:, None].repeat(1, 2)  # feature = token index
    s = torch.tensor(size if size else [1.0] * t)
    return x[None], s[None], torch.arange(t)[None], metric[None]


# tokens 0..5: A = {0, 2, 4}, B = {1, 3, 5}. 0 == 1 exactly, 4 is close to 3, 2 and 5 are orthogonal to all.
METRIC = torch.stack([_e(0, 1), _e(0, 1), _e(1, 1), _e(2, 1), _e(2, 1, 1, 0.3), _e(3, 1)])


def test_bipartite_merge_picks_the_most_redundant_pairs():
    x, s, a, m = _toks(METRIC)
    out = bipartite_merge(x, s, a, m, r=1)
    assert out.src.tolist() == [[0]] and out.dst.tolist() == [[1]]
    assert out.anchor.tolist() == [[1, 2, 3, 4, 5]]  # the merged token sits at its B partner's anchor
    assert out.size.tolist() == [[2, 1, 1, 1, 1]]
    assert out.x[0, 0].tolist() == [0.5, 0.5]  # mean of tokens 0 and 1
    out = bipartite_merge(x, s, a, m, r=2)
    assert sorted(zip(out.src[0].tolist(), out.dst[0].tolist())) == [(0, 1), (4, 3)]
    assert out.anchor.tolist() == [[1, 2, 3, 5]] and out.size.tolist() == [[2, 1, 2, 1]]
    assert out.x[0, 2].tolist() == [3.5, 3.5]


def test_bipartite_merge_size_weighted_average_and_semantic_sum():
    x, s, a, m = _toks(METRIC, size=[3, 1, 1, 1, 1, 1])
    sem = torch.tensor([[0.1, 0.2, 0.0, 0.3, 0.0, 0.0]])
    out = bipartite_merge(x, s, a, m, r=1, semantic=sem)
    assert out.size[0, 0] == 4 and out.x[0, 0].tolist() == [0.25, 0.25]  # (3 * 0 + 1 * 1) / 4
    assert out.semantic[0, 0].item() == pytest.approx(0.3)  # attention mass of the group
    # the metric is size-averaged too (used by the next fold round)
    assert torch.allclose(out.metric[0, 0], METRIC[0])


def test_semantic_value_protects_informative_tokens_and_class_token():
    x, s, a, m = _toks(METRIC)
    sem = torch.tensor([[0.05, 0.0, 0.0, 0.0, 0.0, 0.0]])  # token 0 draws the class token's attention
    out = bipartite_merge(x, s, a, m, r=1, semantic=sem, weight=5 * 30)  # 1 - 7.5 < cos(4, 3) - 0
    assert out.src.tolist() == [[4]] and out.dst.tolist() == [[3]]
    out = bipartite_merge(x, s, a, m, r=1, protect_first=True)  # token 0 is the class token
    assert out.src.tolist() == [[4]]
    assert 0 in out.anchor[0].tolist()
    out = bipartite_merge(x, s, a, m, r=3, protect_first=True)  # at most (T - 1) // 2 = 2 merges
    assert out.x.shape[1] == 4 and 0 in out.anchor[0].tolist()


def test_fold_merge_goes_below_half_and_keeps_sizes():
    torch.manual_seed(0)
    x = torch.randn(2, 17, 3)
    out = fold_merge(x, torch.ones(2, 17), torch.arange(17).expand(2, -1), x, r=13, protect_first=True)
    assert out.x.shape == (2, 4, 3) and out.anchor[:, 0].tolist() == [0, 0]
    assert out.size.sum(1).tolist() == [17, 17]
    # size-weighted means conserve the feature sum
    assert torch.allclose((out.x * out.size[..., None]).sum(1), x.sum(1), atol=1e-5)
    assert bool((out.anchor.diff(dim=1) > 0).all())


def test_layer_schedule():
    assert layer_schedule(576, 144, 23) == [19] * 18 + [18] * 5
    assert sum(layer_schedule(16, 4, 1)) == 12 and layer_schedule(16, 20, 3) == [0, 0, 0]


def test_proportional_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    plain = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(proportional_attention(q, k, v, torch.ones(2, 5), 8**-0.5), plain, atol=1e-6)
    assert torch.equal(proportional_attention(q, k, v, None, 8**-0.5), plain)
    # a token of size 2 attends like two identical copies of it
    k2, v2 = torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2)
    size = torch.tensor([[2.0, 1, 1, 1, 1]]).expand(2, -1)
    assert torch.allclose(proportional_attention(q, k, v, size, 8**-0.5), F.scaled_dot_product_attention(q, k2, v2),
                          atol=1e-5)


def test_post_path_merges_duplicates_first_and_rescales():
    feats = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0.7, 0.7], [0, -1.0], [-1.0, 0], [9, 9]])
    coords = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 1, 2],
                           [0, 0, 1, -1]])
    tok = VisualTokens(feats, coords, torch.arange(7), torch.ones(7), "image", 0, 1, 7, {0: (2, 3)})
    out = Turbo(keep=5 / 6, semantic="none").reduce(tok)  # 6 regular tokens -> 5, the newline is kept
    assert out.source.tolist() == [1, 2, 3, 4, 5, 6]
    assert out.sizes.tolist() == [2, 1, 1, 1, 1, 1]
    assert torch.allclose(out.features[0], torch.tensor([1.0, 0]) * (1 + math.log(2)))
    assert torch.equal(out.features[-1], feats[-1])
    assert torch.equal(Turbo(keep=5 / 6, semantic="none", rescale=False).reduce(tok).features[0], feats[0])


def test_adaptive_pool_tokens_hand_built():
    # a 4x4 grid with a newline per row, features = index; pooled to 2x2
    blocks = [(0, 1, 4, 4, True)]
    feats = torch.arange(20, dtype=torch.float32)[:, None]
    tok = VisualTokens.from_grid(feats, blocks, kind="image", index=0, token_id=1)
    out = adaptive_pool_tokens(tok, 0.5)
    # rows of 5 (4 patches + newline): patch (y, x) has index 5y + x; newlines 4, 9, 14, 19
    assert out.source.tolist() == [0, 2, 9, 10, 12, 19]
    assert out.features[:, 0].tolist() == [3.0, 5.0, 9.0, 13.0, 15.0, 19.0]
    assert out.sizes.tolist() == [4, 4, 1, 4, 4, 1]
    assert out.coords.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, -1], [0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 1, -1]]


def test_spec_validation():
    assert Turbo().keep == 0.25 and mmfast.accel.parse_spec("turbo(r=16,alpha=5)")[0].r == 16
    for bad in ("turbo(keep=0.5,r=3)", "turbo(keep=0)", "turbo(path=x)", "turbo(metric=x)", "tokenflex(tokens=0)",
                "adaptive_pool(keep=2)", "tokenflex(keep=0.5,tokens=4)"):
        with pytest.raises(ConfigError):
            mmfast.accel.parse_spec(bad)


# ----------------------------------------------------------------------------------------------------------
# the method x family matrix on tiny random models
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def pipes(vlm_pipes):
    """The session's tiny models; the LLaVA families carry a random TokenFLEX projector (conftest)."""
    return vlm_pipes


def _run(pipe, spec, kw):
    return type(pipe)(pipe.adapter, mmfast.accel.resolve(spec))(question=Q, **kw, **GEN)


@pytest.mark.parametrize("family", FAMILIES)
def test_turbo_r0_is_the_baseline(pipes, family):
    """``r=`` schedules with r = 0 merge nothing (keep=1.0 is in the method matrix)."""
    img, _ = pipes[family]
    kw = {"image": make_test_image(0)}
    assert _run(img, "turbo(r=0)", kw)["answer"] == img(question=Q, **kw, **GEN)["answer"]


def test_tokenflex_refuses_untrained_or_unsupported_checkpoints(pipes, tmp_path):
    with pytest.raises(IncompatibleAcceleratorError, match="adaptive_pool"):
        _run(pipes["qwen2_vl"][0], "tokenflex(keep=0.25)", {"image": make_test_image(0)})
    with pytest.raises(IncompatibleAcceleratorError, match="adaptive_pool"):
        _run(pipes["llava"][0], f"tokenflex(keep=0.25,weights='{tmp_path}/none.safetensors')",
             {"image": make_test_image(0)})


@pytest.mark.parametrize("family", FLEX)
def test_flex_path_at_native_count_reproduces_the_model_layout(pipes, family):
    """Pooling to n = s with zero feature weighting is exactly the model's own features and layout."""
    img, _ = pipes[family]
    ad = img.adapter
    zero = FlexProjector(ad.config.vision_config.hidden_size, 4)
    wide = make_test_image(1).resize((96, 40))
    cases = [{"images": [make_test_image(0)]}, {"images": [wide]}]
    cases += [{"video": make_test_video(4)}] if ad.supports_video else []
    for kw in cases:
        inputs = ad.preprocess(Q, **kw)
        with torch.no_grad():
            ref, got = ad.visual_tokens(inputs), flex_items(ad, zero, inputs, 1.0)
        for r, g in zip(ref, got, strict=True):
            assert torch.equal(r.coords, g.coords) and torch.equal(r.source, g.source)
            assert r.n_original == g.n_original
            if not (family == "llava_onevision" and "video" in kw):  # OneVision pools video after its projector
                assert torch.allclose(r.features, g.features, atol=1e-5)


def test_turbo_in_vit_without_merges_is_the_tower(pipes):
    """The in-ViT loop (proportional attention, CLS dropped, projector) with r = 0 reproduces get_image_features."""
    img, _ = pipes["llava"]
    ad = img.adapter
    inputs = ad.preprocess(Q, images=[make_test_image(0), make_test_image(1)])
    with torch.no_grad():
        ref = ad.visual_tokens(inputs)
        got = Turbo(r=0)._encode_in_vit(ad.vision_tower(inputs))
    for r, g in zip(ref, got, strict=True):
        assert torch.allclose(r.features, g.features, atol=1e-5) and torch.equal(r.source, g.source)


def test_turbo_in_vit_anchors_threshold_and_paths(pipes):
    img, vid = pipes["llava"]
    ad = img.adapter
    inputs = ad.preprocess(Q, images=[make_test_image(0)])
    with torch.no_grad():
        tower = ad.vision_tower(inputs)
        (item,) = Turbo(keep=0.25)._encode_in_vit(tower)
        assert len(item) == 4 and item.sizes.sum() == 16 and item.n_original == 16
        assert torch.equal(item.coords[:, 2] * 4 + item.coords[:, 3], item.source)  # coords are the anchors' cells
        assert bool((item.source.diff() > 0).all())
        # r= schedules respect the minimum-token threshold (17 tokens incl. CLS)
        assert len(Turbo(r=4, min_tokens=18)._encode_in_vit(tower)[0]) == 16
        assert len(Turbo(r=4, min_tokens=17)._encode_in_vit(tower)[0]) == 12
    st = _run(vid, "turbo(keep=0.25)", {"video": make_test_video(4)})["stats"]
    assert st["visual_tokens_kept"] * 4 == st["visual_tokens_in"]  # every frame merged inside the ViT
    post = _run(img, "turbo(keep=0.25,path=post)", {"image": make_test_image(0)})["stats"]
    assert post["visual_tokens_kept"] == 4
    with pytest.raises(IncompatibleAcceleratorError):
        _run(pipes["qwen2_vl"][0], "turbo(path=vit)", {"image": make_test_image(0)})


def test_turbo_onevision_in_vit_keeps_anchored_grid_tokens(pipes):
    """SigLIP in-ViT path (LLaVA-OneVision images): without merges it is get_image_features; with merges every kept
    token sits at a patch of the model's layout, sizes add up to the patches, and newline tokens all stay."""
    img, vid = pipes["llava_onevision"]
    ad = img.adapter
    wide = make_test_image(1).resize((96, 40))
    cases = [([make_test_image(0)], True), ([wide], False), ([make_test_image(0), make_test_image(1)], True)]
    for images, square in cases:
        inputs = ad.preprocess(Q, images=images)
        with torch.no_grad():
            ref = ad.visual_tokens(inputs)
            same = Turbo(r=0)._encode_in_vit(ad.vision_tower(inputs))
            got = Turbo(keep=0.25, path="vit")._encode_in_vit(ad.vision_tower(inputs))
        for r, s, g in zip(ref, same, got, strict=True):
            assert torch.allclose(r.features, s.features, atol=1e-5)
            assert torch.equal(r.coords, s.coords) and torch.equal(r.source, s.source)
            reg = ~g.layout_mask
            n_reg = int((~r.layout_mask).sum())
            assert g.n_original == r.n_original and int(g.layout_mask.sum()) == int(r.layout_mask.sum())
            assert bool((g.source.diff() > 0).all())
            assert torch.equal(g.coords, r.coords[g.source])  # each kept token sits at its anchor's grid cell
            assert bool((g.sizes[reg] >= 1).all())
            if square:
                assert int(reg.sum()) == round(0.25 * n_reg)
                assert float(g.sizes[reg].sum()) == n_reg  # every patch is in exactly one kept token
            else:  # tokens anchored in the unpadded-away margin go with it
                assert int(reg.sum()) <= round(0.25 * n_reg) and float(g.sizes[reg].sum()) <= n_reg
    base = img(question=Q, image=make_test_image(0), **GEN)
    assert _run(img, "turbo(keep=1.0,path='vit')", {"image": make_test_image(0)})["answer"] == base["answer"]
    st = _run(img, "turbo(keep=0.25,path='vit')", {"image": make_test_image(0)})["stats"]
    assert st["visual_tokens_kept"] == 16 + round(0.25 * 320) and st["new_tokens"] == 6
    with pytest.raises(IncompatibleAcceleratorError):  # OneVision pools video after the projector: post path only
        _run(vid, "turbo(keep=0.25,path='vit')", {"video": make_test_video(4)})


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_turbo_key_metric_is_mapped_onto_every_token(pipes, family):
    img, _ = pipes[family]
    ad = img.adapter
    for kw in ({"images": [make_test_image(0)]}, {"video": make_test_video(4)}):
        items = Turbo(keep=0.5, metric="keys", semantic="none").encode(ad, ad.preprocess(Q, **kw))
        for it in items:
            keys = it.extra["turbo_keys"]
            assert keys.shape[0] == len(it) and float(keys[it.layout_mask].abs().sum()) == 0
            assert len(Turbo(keep=0.5, metric="keys").reduce(it)) < len(it)


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision", "qwen2_5_vl"])
def test_turbo_semantic_probe_is_mapped_onto_every_token(pipes, family):
    img, _ = pipes[family]
    ad = img.adapter
    for kw in ({"images": [make_test_image(0)]}, {"video": make_test_video(4)}):
        items = Turbo(keep=0.5).encode(ad, ad.preprocess(Q, **kw))
        for it in items:
            sem = it.extra["turbo_semantic"]
            assert sem.shape == (len(it),) and float(sem.sum()) == pytest.approx(1.0, abs=1e-5)
            assert float(sem[it.layout_mask].abs().sum()) == 0


def test_tiny_vlm_flex_training_features_match_the_accelerator(tmp_path):
    """The recipe's batched fast path computes exactly what tokenflex(keep=...) feeds the LLM at inference."""
    from PIL import Image

    from mmfast.accel.tokenflex import side_fraction
    from mmfast.train import data as D
    from mmfast.train import tiny_vlm as T
    from mmfast.train import tiny_vlm_flex as TF

    model, proc = T.build_model("tiny"), T.build_processor()
    T.save_model(model, proc, tmp_path, dtype="float32")
    ad = mmfast.pipeline("image-qa", model=str(tmp_path)).adapter
    flex = FlexProjector(model.config.vision_config.hidden_size, 8)
    torch.nn.init.normal_(flex.down.weight, std=0.2)
    s, c = D.image_sample("heldout", 0, 0), D.clip_sample("heldout", 0, 0, num_frames=T.NUM_FRAMES)
    m = ad.model
    with torch.no_grad():
        for keep in (0.5, 0.25, 0.125):
            frac = side_fraction(keep, None, T.VIEW_GRID)
            item = flex_items(ad, flex, ad.preprocess(Q, images=[Image.fromarray(s.image)]), frac)[0]
            n = round(T.VIEW_GRID * frac)
            pix = T.image_pixels(s.image[None])
            tower = T._tower(m, pix.flatten(0, 1), False).view(1, T.N_VIEWS, T.VIEW_GRID ** 2, -1)
            fast = TF.flex_image_features(m, flex, tower, [n])[0]
            assert len(item) == TF.image_tokens(n) and torch.allclose(item.features, fast, atol=1e-6)
            item = flex_items(ad, flex, ad.preprocess(Q, video=c.frames), frac)[0]
            nv = max(1, round(TF.VIDEO_SIDE * frac))
            fast = TF.flex_video_features(m, flex, T._tower(m, T.video_pixels(c.frames[None])[0], False),
                                          T.NUM_FRAMES, [nv])[0]
            assert len(item) == TF.video_tokens(nv) and torch.allclose(item.features, fast, atol=1e-6)


@pytest.mark.parametrize("family", ["llava_next", "llava_next_video"])
def test_turbo_in_vit_on_anyres_clip_towers(pipes, family):
    """CLIP towers with a class token under anyres (path='vit' only): without merges the tower's own features and
    layout; with merges fewer tokens, each at its anchor's cell, every newline kept."""
    img, _ = pipes[family]
    ad = img.adapter
    for images in ([make_test_image(0)], [make_test_image(1).resize((96, 40))]):
        inputs = ad.preprocess(Q, images=images)
        with torch.no_grad():
            (ref,) = ad.visual_tokens(inputs)
            (same,) = Turbo(r=0, path="vit")._encode_in_vit(ad.vision_tower(inputs))
            (got,) = Turbo(keep=0.25, path="vit")._encode_in_vit(ad.vision_tower(inputs))
        assert torch.allclose(ref.features, same.features, atol=1e-5) and torch.equal(ref.source, same.source)
        assert torch.equal(got.coords, ref.coords[got.source]) and int(got.layout_mask.sum()) == int(ref.layout_mask.sum())
        assert int((~got.layout_mask).sum()) <= round(0.25 * int((~ref.layout_mask).sum()))
    assert _run(img, "turbo(keep=0.25)", {"image": make_test_image(0)})["stats"]["visual_tokens_kept"] < 0.4 * len(ref)
