"""ZipVL and LOOK-M: selection rules on hand-built scores, merges against their formulas, the probe path against
eager attention, sparse prefill, identity at 100% budget / tau = 1 with the answer read from the cache, every merge
variant and mode on every family (the identity / reduced matrix of every method is test_matrix.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import eager_attention, prompt_embeds
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import mmfast
from mmfast.accel.lookm import merge_evicted, select_kept
from mmfast.accel.zipvl import dynamic_count, important_tokens
from mmfast.errors import ConfigError, IncompatibleAcceleratorError
from mmfast.kernels.probe_attention import probe_attention, visible_counts
from mmfast.models.attention import AttentionTap, layer_cache, project_queries
from mmfast.models.prefill import PrefillStage
from mmfast.train.tiny_models import FAMILIES, VIDEO_FAMILIES, make_test_image, make_test_video

GEN = {"max_new_tokens": 6}
Q = "What is this?"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pipes(vlm_pipes):
    return vlm_pipes


def _run(pipe, spec, **kw):
    return type(pipe)(pipe.adapter, mmfast.accel.resolve(spec))(question=Q, **kw, **GEN)


# ------------------------------------------------------------------------------------------------
# selection rules on hand-built scores
# ------------------------------------------------------------------------------------------------
def test_tau_rule():
    a = torch.tensor([1.0, 10.0, 0.5, 6.0, 2.5])  # total 20
    assert dynamic_count(a, 0.8) == 2  # 10 + 6 = 16 = 0.8 * 20
    assert dynamic_count(a, 0.85) == 3  # needs 17: 10 + 6 + 2.5
    assert dynamic_count(a, 0.5) == 1 and dynamic_count(a, 1.0) == 5
    assert important_tokens(a, torch.ones(5), 0.85).tolist() == [1, 3, 4]


def test_normalized_score_picks_late_tokens():
    scores = torch.tensor([6.0, 5.0, 2.0, 1.5])  # raw mass favours the early tokens ...
    counts = torch.tensor([10, 8, 2, 1])  # ... that every probe query sees
    assert dynamic_count(scores, 0.75) == 2
    assert important_tokens(scores, counts, 0.75).tolist() == [2, 3]  # normalized: 0.6, 0.625, 1.0, 1.5
    assert important_tokens(scores, counts, 0.75, force=torch.tensor([0])).tolist() == [0, 2, 3]


def test_zipvl_selection_on_hand_built_attention():
    """Keys 3 and 17 are seen by all four probes, key 35 only by the last two: every probe splits its attention
    evenly over the peaks it can see (other logits are ~-inf), so the column sums are known exactly."""
    n, d = 40, 4
    k = torch.zeros(1, 1, n, d)
    k[0, 0, [3, 17, 35], 0] = 1.0
    q = torch.zeros(1, 1, 4, d)
    q[..., 0] = 200.0  # softmax mass only on the peaks
    rows = torch.tensor([20, 30, 38, 39])
    scores = probe_attention(q, k, rows, scale=1.0)[0, 0]
    expect = torch.zeros(n)
    expect[[3, 17]], expect[35] = 0.5 + 0.5 + 1 / 3 + 1 / 3, 2 / 3
    torch.testing.assert_close(scores, expect)
    counts = visible_counts(rows, torch.arange(n))
    assert important_tokens(scores, counts, 0.975).tolist() == [3, 17, 35]  # all the mass needs all three
    assert important_tokens(scores, counts, 0.8).tolist() == [3, 17]  # 10/3 >= 0.8 * 4
    assert important_tokens(scores, counts, 0.8, force=torch.tensor([38, 39])).tolist() == [3, 17, 38, 39]


def test_text_prior_and_recent_window():
    # positions 0-1 text, 2-7 image, 8-9 text; image tokens get the highest attention
    text = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    scores = torch.tensor(
        [[0.1, 0.2, 9.0, 1.0, 8.0, 3.0, 2.0, 7.0, 0.0, 0.0], [0.3, 0.1, 1.0, 9.0, 2.0, 8.0, 3.0, 0.5, 0.0, 0.0]]
    )[None]
    kept = select_kept(scores, text, keep=6, recent=2)
    assert kept[0, 0].tolist() == [0, 1, 2, 4, 8, 9]  # both text, then the two best image tokens of head 0
    assert kept[0, 1].tolist() == [0, 1, 3, 5, 8, 9]  # per head
    assert select_kept(scores, None, keep=6, recent=2)[0, 0].tolist() == [2, 4, 5, 7, 8, 9]
    # more text than heavy slots: only text, best first; the recent window is always kept
    assert select_kept(scores, text, keep=3, recent=2)[0, 0].tolist() == [1, 8, 9]
    assert select_kept(scores, text, keep=2, recent=2)[0, 0].tolist() == [8, 9]


def _merge_oracle(keys, values, kept, how):
    """The merge formulas written out entry by entry (LOOK-M, module docstring of mmfast.accel.lookm)."""
    b, h, s, d = keys.shape
    out_k = keys.gather(2, kept[..., None].expand(-1, -1, -1, d)).clone()
    out_v = values.gather(2, kept[..., None].expand(-1, -1, -1, d)).clone()
    if how == "none":
        return out_k, out_v
    for hd in range(h):
        kk, vv = out_k[0, hd].clone(), out_v[0, hd].clone()
        ev = [j for j in range(s) if j not in kept[0, hd].tolist()]
        sims = [F.cosine_similarity(keys[0, hd, j][None], kk).max(0) for j in ev]
        mean = sum(float(v) for v, _ in sims) / len(sims)
        acc_k, acc_v, cnt = kk.clone(), vv.clone(), torch.ones(kk.shape[0])
        for j, (s_e, c) in zip(ev, sims):
            if how in ("avg", "weighted") and float(s_e) < mean:
                continue
            ke, ve = keys[0, hd, j], values[0, hd, j]
            if how == "pivot":
                ke, ve = (ke + kk[c]) / 2, (ve + vv[c]) / 2
            elif how == "weighted":
                ke, ve = s_e * ke, s_e * ve
            acc_k[c] += ke
            acc_v[c] += ve
            cnt[c] += 1
        out_k[0, hd], out_v[0, hd] = acc_k / cnt[:, None], acc_v / cnt[:, None]
    return out_k, out_v


@pytest.mark.parametrize("how", ["avg", "pivot", "weighted", "none"])
def test_merges_match_their_formulas(how):
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, 12, 4, generator=g), torch.randn(1, 2, 12, 4, generator=g)
    kept = torch.stack([torch.tensor([0, 3, 5, 10, 11]), torch.tensor([1, 2, 7, 10, 11])])[None]
    got = merge_evicted(keys, values, kept, how)
    want = _merge_oracle(keys, values, kept, how)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_merge_small_exact_case():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [0.8, 0.6]])[None, None]
    values = torch.arange(10.0).reshape(1, 1, 5, 2)
    kept = torch.tensor([[[0, 1]]])
    # evicted 2 → key 0, 3 → key 1, 4 → key 0 (cos 0.8 vs 0.6)
    k, v = merge_evicted(keys, values, kept, "pivot")
    assert torch.allclose(
        k[0, 0, 0], (keys[0, 0, 0] + (keys[0, 0, 2] + keys[0, 0, 0]) / 2 + (keys[0, 0, 4] + keys[0, 0, 0]) / 2) / 3
    )
    assert torch.allclose(v[0, 0, 1], (values[0, 0, 1] + (values[0, 0, 3] + values[0, 0, 1]) / 2) / 2)


# ------------------------------------------------------------------------------------------------
# the probe path and sparse prefill
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_probe_path_equals_eager_attention(pipes, family):
    """Recomputed queries + cached keys → the column sums of the attention eager returns (M-RoPE included)."""
    img, _ = pipes[family]
    ad, model = img.adapter, img.model
    inputs = ad.preprocess(Q, images=[make_test_image(0)])
    gen_inputs, _ = ad.build_inputs(inputs, ad.visual_tokens(inputs))
    kwargs = {k: v for k, v in gen_inputs.items() if k != "input_ids"}
    tap = AttentionTap(ad)
    model.set_attn_implementation("eager")
    try:
        cache = DynamicCache()
        with torch.no_grad():
            out = model(**kwargs, past_key_values=cache, use_cache=True, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    for i, attn in enumerate(out.attentions):
        module, hidden, pos = tap.latest(i)
        n = hidden.shape[1]
        rows = torch.tensor([0, 5, n // 2, n - 2, n - 1])
        q = project_queries(module, hidden, pos, rows)
        got = probe_attention(q, cache.layers[i].keys, rows, per_head=True)
        torch.testing.assert_close(got, attn[:, :, rows].sum(2), atol=2e-5, rtol=1e-4)
    tap.remove()
    assert ad.language_model.config._attn_implementation == "sdpa"


class _Attn(torch.nn.Module):
    layer_idx, num_key_value_groups, is_causal = 0, 2, True


def test_sparse_prefill_attends_among_important_tokens_only(pipes):
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 4, 9, 8, generator=g),
        torch.randn(1, 2, 9, 8, generator=g),
        torch.randn(1, 2, 9, 8, generator=g),
    )
    z = PrefillStage(pipes["llava"][0].adapter, [], [])  # the prefill stage's routed attention (ctx.route)
    keep = torch.tensor([0, 2, 3, 7, 8])
    z.routes[0] = keep
    out, _ = z._attention(_Attn(), q, k, v, None, sdpa_attention_forward)
    ref = F.scaled_dot_product_attention(q[:, :, keep], k[:, :, keep], v[:, :, keep], is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out[:, keep], ref.transpose(1, 2))
    assert out[:, [1, 4, 5, 6]].abs().max() == 0  # the rest skip attention in this layer
    z.routes[0] = None  # tau = 1: the stock call
    torch.testing.assert_close(
        z._attention(_Attn(), q, k, v, None, sdpa_attention_forward)[0],
        sdpa_attention_forward(_Attn(), q, k, v, None)[0],
    )


# ------------------------------------------------------------------------------------------------
# inside generate, on every family
# ------------------------------------------------------------------------------------------------
IDENTITY = ["lookm(budget=1.0)", "zipvl(tau=1,mode='evict')", "zipvl(tau=1,bits=(16,2))"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_and_tau_one_are_identical_to_baseline(pipes, family):
    img, vid = pipes[family]
    cases = [(img, {"image": make_test_image(2)})]
    if family in ("llava_onevision", "qwen2_vl"):
        cases.append((vid, {"video": make_test_video(4)}))
    for pipe, kw in cases:
        base = pipe(question=Q, **kw, **GEN)
        for spec in IDENTITY:
            out = _run(pipe, spec, **kw)
            assert out["answer"] == base["answer"], spec
            assert out["stats"]["kv_bytes_end"] == base["stats"]["kv_bytes_end"], spec
            # the generation prompt fed after the compressed prefill: the same tokens when nothing is compressed
            late = type(pipe)(pipe.adapter, mmfast.accel.resolve(spec))(question=Q, **kw, **GEN, answer_from_kv=True)
            assert late["stats"]["new_tokens"] == 6 and late["answer"] == base["answer"], spec


MATRIX = [
    "lookm(budget=0.2)",
    "lookm(budget=0.2,merge=avg)",
    "lookm(budget=0.2,merge=pivot)",
    "lookm(budget=0.2,merge=none)",
    "zipvl",
    "zipvl(mode=evict)",
    "lookm+zipvl",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_lookm_merges_and_zipvl_modes_on_every_family(pipes, family):
    img, vid = pipes[family]
    cases = [(img, {"image": make_test_image(0)}, MATRIX)]
    if family in VIDEO_FAMILIES or family == "llava":
        cases.append((vid, {"video": make_test_video(4)}, ["lookm(budget=0.2)", "zipvl"]))
    for pipe, kw, specs in cases:
        base = pipe(question=Q, **kw, **GEN)["stats"]
        n, bytes0 = base["prompt_tokens"], base["kv_bytes"]
        got = {}
        for spec in specs:
            st = _run(pipe, spec, **kw)["stats"]
            assert st["new_tokens"] == 6, spec
            got[spec] = st["kv_bytes"]
            if spec.startswith("lookm"):
                assert st["kv_tokens"] == round(0.2 * n) and st["kv_bytes"] <= 0.25 * bytes0, spec
            elif spec == "zipvl":
                assert st["kv_tokens"] == n and st["kv_bytes"] < bytes0 / 4  # fp32 baseline, 4/2-bit codes
            elif spec == "zipvl(mode=evict)":
                assert st["kv_tokens"] < n
        if "lookm+zipvl" in got:
            assert got["lookm+zipvl"] < got["lookm(budget=0.2)"] / 2
    ad = img.adapter
    assert not ad.kv_methods and not ad.prefill_methods
    assert ad.language_model.config._attn_implementation == "sdpa"
    assert all(
        not a._forward_pre_hooks and not hasattr(a, "_mmfast_attention")
        for a in (layer.self_attn for layer in ad.decoder_layers)
    )


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_lookm_matches_a_manual_loop(pipes, family):
    """Eviction + merge inside generate == prefill, compress by hand from eager attention, decode with positions."""
    img, _ = pipes[family]
    image, steps, budget = make_test_image(1), GEN["max_new_tokens"], 0.3
    out = _run(img, f"lookm(budget={budget},merge=pivot)", image=image)
    model = img.model
    embeds, visual = prompt_embeds(img, Q, image)
    n, text = embeds.shape[1], ~visual
    with eager_attention(model):
        cache = DynamicCache()
        res = model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, output_attentions=True)
    keep = round(budget * n)
    for layer, attn in zip(cache.layers, res.attentions):
        hkv = layer.keys.shape[1]
        scores = attn.sum(2).reshape(1, hkv, -1, n).sum(2)  # accumulated attention per KV head
        kept = select_kept(scores, text, keep, round(0.5 * keep))
        layer.keys, layer.values = merge_evicted(layer.keys, layer.values, kept, "pivot")
    tokens, logits = [], res.logits
    with torch.no_grad():
        for step in range(steps):
            tok = logits[0, -1].argmax()
            tokens.append(int(tok))
            pos = torch.tensor([[n + step]])
            logits = model(input_ids=tok.view(1, 1), position_ids=pos, past_key_values=cache, use_cache=True).logits
    assert out["answer"] == img.processor.tokenizer.decode(tokens[:steps], skip_special_tokens=True).strip()


def test_zipvl_recompresses_every_n_decoded_tokens(pipes):
    img, _ = pipes["llava_onevision"]
    ad = img.adapter
    caches = []
    make = ad.make_cache
    ad.make_cache = lambda spans: caches.append(make(spans)) or caches[-1]
    try:
        quant = _run(img, "zipvl(every=2)", image=make_test_image(0))["stats"]
        evict = _run(img, "zipvl(every=2,mode=evict,tau=0.9)", image=make_test_image(0))["stats"]
        _run(img, "zipvl(every=2,ratio=0.5)", image=make_test_image(0))
    finally:
        del ad.make_cache
    layer = caches[0].layers[0]
    assert len(layer.segments) == 1 + 5 // 2 and layer.keys.shape[-2] == 5 % 2  # prompt + 2 windows, 1 in the tail
    assert quant["kv_tokens_end"] == quant["prompt_tokens"] + 5
    for seg in caches[2].layers[1].segments[1:]:  # each 2-token window: its more-attended token at 4 bits
        assert [(bits, k.codes.shape[-2]) for bits, _, k, _ in seg.parts] == [(4, 1), (2, 1)]
    ev = caches[1].layers[0]
    assert evict["kv_tokens"] < evict["prompt_tokens"] and ev.stored_length() <= evict["kv_tokens"] + 5


def test_specs_validation_and_stacking():
    z, lm = mmfast.accel.parse_spec('zipvl(tau=0.975, bits=(4,2))+lookm(budget=0.2, merge="weighted")')
    assert (z.tau, z.bits, z.role, lm.budget, lm.merge, lm.role) == (
        0.975,
        (4, 2),
        "quantize",
        0.2,
        "weighted",
        "evict",
    )
    assert mmfast.accel.parse_spec('zipvl(mode="evict")')[0].role == "evict"
    assert mmfast.accel.resolve(z.spec()).spec() == z.spec()
    assert mmfast.accel.parse_spec("lookm(budget=64)")[0].keep_count(300) == 64
    for bad in [
        "lookm(merge=foo)",
        "lookm(budget=0)",
        "lookm(budget=1.5)",
        "zipvl(tau=0)",
        "zipvl(bits=(3,2))",
        "zipvl(mode=x)",
        "zipvl(every=0)",
    ]:
        with pytest.raises(ConfigError):
            mmfast.accel.resolve(bad)
    with pytest.raises(IncompatibleAcceleratorError):
        mmfast.accel.resolve("zipvl(mode=evict)+lookm")
    with pytest.raises(IncompatibleAcceleratorError):
        mmfast.accel.resolve("kv_window+lookm")


def test_stacks_with_vision_and_window_methods(pipes):
    """KV methods compose with a vision method (prompt already reduced) and kv_window with a quantizer."""
    img, vid = pipes["qwen2_vl"]
    base = img(question=Q, image=make_test_image(0), **GEN)["stats"]
    st = _run(img, "turbo(keep=0.5)+lookm(budget=0.2)", image=make_test_image(0))["stats"]
    assert st["visual_tokens_kept"] < base["visual_tokens_kept"] and st["kv_tokens"] == round(0.2 * st["prompt_tokens"])
    st = _run(vid, "pool(factor=2)+lookm+zipvl", video=make_test_video(4))["stats"]
    assert st["new_tokens"] == 6 and st["kv_tokens"] == round(0.2 * st["prompt_tokens"])
    st = _run(img, "kv_window(sink=2,recent=8)+zipvl(every=2)", image=make_test_image(0))["stats"]
    assert st["kv_tokens_end"] == 10


def test_answer_from_kv_feeds_the_generation_prompt_after_compression(pipes):
    """With ``answer_from_kv`` the first answer token is computed over the already compressed cache."""
    img, _ = pipes["llava_onevision"]
    pipe = type(img)(img.adapter, mmfast.accel.resolve("lookm(budget=0.2)"))
    g = img.adapter.generation_prompt_length()
    assert g > 1  # "<|im_start|>assistant\n" in the tiny test tokenizer
    seen: list[tuple[int, int]] = []  # (tokens fed, entries stored in the cache before this forward)

    def pre(_m, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs["input_ids"] if x is None else x
        cache = layer_cache(kwargs)
        seen.append((x.shape[1], cache.layers[0].stored_length() if cache is not None and cache.layers else 0))

    h = img.adapter.language_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        st = pipe(question=Q, image=make_test_image(0), **GEN, answer_from_kv=True)["stats"]
    finally:
        h.remove()
    n = st["prompt_tokens"]
    assert seen[0] == (n - g, 0)
    assert seen[1] == (1, round(0.2 * (n - g)))  # the generation prompt reads the evicted cache ...
    assert [t for t, _ in seen[1:]] == [1] * (g + GEN["max_new_tokens"] - 1)  # ... one token per forward
