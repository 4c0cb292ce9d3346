"""The kernels on the runtime hot paths (docs/kernels.md, "Where each kernel runs"), with ``MMFAST_KERNEL_IMPL=triton``
(the Triton interpreter here) against the torch path (``MMFAST_KERNEL_IMPL=torch``).

* Decode attention over compressed caches (:func:`mmfast.models.attention.packed_decode`): greedy answers of tiny
  random VLMs (Llama and Qwen2-VL language models) with ZipVL (4/2-bit segments, re-compressed while decoding),
  LOOK-M, ``kv_window`` and LOOK-M + ZipVL (per-head masked segments) are the torch path's token for token, and the
  ``packed_attention`` kernel ran once per decode step and layer. The quantized caches could in principle flip a
  near-tie between two logits (fp32 kernel vs sdpa over the dequantized copy, ~1e-6 apart); the fixed inputs here do
  not, and the comparison is deterministic. Without the kernel (torch, or ``auto`` on CPU) no packed step is made.
* Speculative verification (``spec_verify`` in :mod:`mmfast.accel.speculative`): greedy SJD / LANTERN / GSD and
  sampled LANTERN (its residual stays in torch) give the torch path's tokens, steps and accepted counts for seeded
  runs (same random stream). Sampled SJD / GSD draw the residual / bonus token with one uniform through the kernel's
  inverse CDF where torch calls ``multinomial``, so their random streams part after the first draw: the first verify
  step of every seed takes the same decision, and the distribution of accepted lengths over seeded runs agrees with
  the torch path's (chi-square test of homogeneity, p > 1e-3, deterministic seeds).
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import mmfast.accel as A
import mmfast.kernels.packed_attention.triton as packed_triton
import mmfast.kernels.spec_verify.triton as verify_triton
from mmfast.accel.gsd import GSDRule
from mmfast.accel.sjd import JacobiDrafter
from mmfast.accel.speculative import StrictRule, speculative_decode
from mmfast.kernels.packed_attention.hf import packed_decode_attention, plain_causal
from mmfast.models.argen import Sampling
from mmfast.models.attention import _routed_attention, cache_kwarg, packed_decode
from mmfast.models.cache import CompressedCache, MixedPrecisionKV, PackedStep, read_entries
from mmfast.pipelines.image_gen import ImageGenPipeline
from mmfast.train.tiny_models import make_test_image
from mmfast.train.toy import ToyARAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

Q = "What is this?"


def _counter(monkeypatch, module, name):
    calls = []
    orig = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return orig(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _answer(adapter, spec, impl, monkeypatch):
    """Greedy answer tokens through ``adapter.generate``, which enters :func:`packed_decode` with a compressed cache."""
    monkeypatch.setenv("MMFAST_KERNEL_IMPL", impl)
    with A.resolve(spec)(adapter):
        return adapter.generate(adapter.preprocess(Q, images=[make_test_image(0)]), max_new_tokens=4).new_tokens


# ------------------------------------------------------------------------------------------------
# decode attention over compressed caches
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "spec"),
    [
        ("llava", "zipvl(ratio=0.5,every=2)"),
        ("llava", "lookm(budget=0.5)"),
        ("llava", "kv_window(sink=4,recent=16)"),
        ("llava", "lookm(budget=0.5)+zipvl(ratio=0.5)"),
        ("qwen2_vl", "zipvl(ratio=0.5)"),
    ],
)
def test_packed_decode_matches_the_torch_path(vlm_pipes, monkeypatch, family, spec):
    adapter = vlm_pipes[family][0].adapter
    base = _answer(adapter, spec, "torch", monkeypatch)
    calls = _counter(monkeypatch, packed_triton, "packed_attention_triton")
    fast = _answer(adapter, spec, "triton", monkeypatch)
    assert fast.tolist() == base.tolist()
    decode_steps = base.numel() - 1  # the first answer token comes from the prefill
    assert len(calls) == decode_steps * adapter.num_layers
    if "lookm" in spec and "zipvl" in spec:  # per-head eviction, then quantization: masked rows read in the kernel
        assert any(part.mask is not None for _, parts in calls for part in parts)
    layers = adapter.decoder_layers
    assert not any(m.self_attn._forward_pre_hooks for m in layers)  # undone
    assert all(not m.self_attn.config._attn_implementation.startswith("mmfast_") for m in layers)


@pytest.mark.parametrize("spec", [None, "videoscan(memory=8)"])
def test_streaming_answers_read_the_stream_cache_in_the_kernel(vlm_pipes, monkeypatch, spec):
    """A streaming question's decode steps attend over the stream cache (full, or VideoScan's carriers) through the
    kernel: the same answer tokens as the torch path, one kernel call per decode step and layer."""
    import numpy as np

    import mmfast

    img = vlm_pipes["llava_onevision"][0]
    frames = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(4)]

    def ask(impl):
        monkeypatch.setenv("MMFAST_KERNEL_IMPL", impl)
        s = mmfast.pipeline("streaming-video-qa", model=(img.model, img.processor), accelerate=spec)
        s.push(frames)
        return s.ask(Q, max_new_tokens=4, min_new_tokens=4)["answer"], s

    base, _ = ask("torch")
    calls = _counter(monkeypatch, packed_triton, "packed_attention_triton")
    fast, s = ask("triton")
    assert fast == base
    assert len(calls) == 4 * s.adapter.num_layers  # every generate forward is a one-token step over the cache


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_no_packed_step_without_the_kernel(vlm_pipes, monkeypatch, impl):
    adapter = vlm_pipes["llava"][0].adapter
    base = _answer(adapter, "zipvl(ratio=0.5)", "torch", monkeypatch)
    made = _counter(monkeypatch, PackedStep, "__init__")
    assert _answer(adapter, "zipvl(ratio=0.5)", impl, monkeypatch).tolist() == base.tolist()
    assert not made


class _QuantizeAll:
    """A quantize policy: the whole prompt into one 4/2-bit segment (every third entry at 4 bits)."""

    role = "quantize"

    def wants_update(self, ctx):
        return ctx.phase == "prefill"

    def quantize(self, keys, values, ctx):
        high = (torch.arange(keys.shape[-2], device=keys.device) % 3 == 0)[None, None]
        return [MixedPrecisionKV(keys, values, high, (4, 2))], keys[:, :, :0], values[:, :, :0]


def _chunk_output(adapter, impl, monkeypatch):
    """The language model's last hidden states for a 3-token chunk after a 17-token prompt in a quantized cache."""
    monkeypatch.setenv("MMFAST_KERNEL_IMPL", impl)
    lm = adapter.language_model
    embeds = torch.randn(1, 20, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cache = CompressedCache(adapter.num_layers, [_QuantizeAll()])
    undo = packed_decode(adapter)
    try:
        with torch.no_grad():
            lm(inputs_embeds=embeds[:, :17], **{cache_kwarg(lm): cache}, use_cache=True)
            return lm(inputs_embeds=embeds[:, 17:], **{cache_kwarg(lm): cache}, use_cache=True).last_hidden_state
    finally:
        undo()


def test_packed_decode_of_a_multi_token_chunk(vlm_pipes, monkeypatch):
    """Three new tokens at once: a causal float tail under a (1, 1, 3, N) causal mask, read by the kernel."""
    adapter = vlm_pipes["llava"][0].adapter
    base = _chunk_output(adapter, "torch", monkeypatch)
    calls = _counter(monkeypatch, packed_triton, "packed_attention_triton")
    fast = _chunk_output(adapter, "triton", monkeypatch)
    assert [q.shape[2] for q, _ in calls] == [3] * adapter.num_layers
    torch.testing.assert_close(fast, base, rtol=1e-4, atol=1e-4)


def _segment_and_tail(attn, seed=0):
    """A packed step of ``attn``'s geometry: a per-head (masked) 4/2-bit segment of 24 entries and a float tail of 3
    entries holding 3 queries; and the queries."""
    h, hkv, d = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, hkv, 24, d, generator=g), torch.randn(1, hkv, 24, d, generator=g)
    high = torch.rand(1, hkv, 24, generator=g) < 0.4  # a different count per head: masked rows
    seg = MixedPrecisionKV(keys, values, high, (4, 2))
    tail_k, tail_v = torch.randn(1, hkv, 3, d, generator=g), torch.randn(1, hkv, 3, d, generator=g)
    return PackedStep([seg], tail_k, tail_v), torch.randn(1, h, 3, d, generator=g)


def test_plain_causal_masks():
    causal = torch.ones(2, 7, dtype=torch.bool).tril(diagonal=5)[None, None]  # 2 queries, the last of 7 entries
    assert plain_causal(None, 2) and plain_causal(causal, 2)
    additive = torch.zeros(1, 1, 2, 7).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert plain_causal(additive, 2)
    padded = causal.clone()
    padded[..., 0] = False
    assert not plain_causal(padded, 2) and not plain_causal(causal[..., 0, :][..., None, :], 2)


def test_packed_step_kernel_and_fallback_agree_with_sdpa_over_the_dequantized_view(vlm_pipes, monkeypatch):
    monkeypatch.setenv("MMFAST_KERNEL_IMPL", "triton")
    attn = vlm_pipes["llava"][0].adapter.decoder_layers[0].self_attn
    step, q = _segment_and_tail(attn)
    assert step.segments[0].high is not None  # the masked layout
    k, v = step.dense(torch.float32)
    ref_k, ref_v = read_entries(step.segments, step.keys, step.values, torch.float32)
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
    n = k.shape[-2]
    causal = (torch.arange(n) <= n - 3 + torch.arange(3)[:, None])[None, None]
    expect, _ = sdpa_attention_forward(attn, q, k, v, causal, scaling=0.3, dropout=0.0)
    out, _ = packed_decode_attention(attn, q, step.parts(), None, scaling=0.3, dropout=0.0)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    for extra in ({"sliding_window": 4}, {"softcap": 30.0}, {"s_aux": torch.zeros(4)}, {"dropout": 0.1}):
        assert packed_decode_attention(attn, q, step.parts(), None, **{"scaling": 0.3, **extra}) is None
    padded = causal.clone()
    padded[..., 0] = False
    assert packed_decode_attention(attn, q, step.parts(), padded, scaling=0.3) is None
    undo = packed_decode(vlm_pipes["llava"][0].adapter)  # routed: a padded mask falls back to the dense view
    try:
        got, _ = _routed_attention(attn, q, step, step, padded, scaling=0.3, dropout=0.0)
    finally:
        undo()
    want, _ = sdpa_attention_forward(attn, q, k, v, padded, scaling=0.3, dropout=0.0)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------
# speculative verification
# ------------------------------------------------------------------------------------------------
def _generate(toy, spec, impl, monkeypatch, temperature):
    monkeypatch.setenv("MMFAST_KERNEL_IMPL", impl)
    return ImageGenPipeline(toy, A.resolve(spec))(
        labels=[0, 1, 1], temperature=temperature, guidance_scale=2.0, top_k=8, seed=3, progress=False,
        output_type="tokens",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "temperature"),
    [("sjd(window=5)", 0), ("lantern(k=3,window=5)", 0), ("gsd(window=5)", 0), ("lantern(k=3,window=5)", 1.0)],
)
def test_spec_verify_kernel_keeps_tokens_and_counts(monkeypatch, spec, temperature):
    toy = ToyARAdapter(vocab=16, grid=(4, 4), seed=2)
    base = _generate(toy, spec, "torch", monkeypatch, temperature)
    calls = _counter(monkeypatch, verify_triton, "spec_verify_triton")
    fast = _generate(toy, spec, "triton", monkeypatch, temperature)
    assert torch.equal(fast.tokens, base.tokens)
    assert fast.stats["steps"] == base.stats["steps"] and fast.stats["mean_accepted"] == base.stats["mean_accepted"]
    assert len(calls) >= base.stats["steps"] - 2  # every verify step with a draft (the last may have none)


SAMPLED = Sampling(guidance_scale=1.0, temperature=1.0)


def _accepted_lengths(toy, rule_fn, seeds, first_only=False):
    """Accepted drafts of every verify step of seeded runs (window 4), or the first step's commit per seed."""
    out = []
    for seed in seeds:
        lengths = [1]

        def step(_pos, tokens, lengths=lengths):
            lengths.append(tokens.shape[1])
            return not first_only

        g = torch.Generator().manual_seed(seed)
        res = speculative_decode(toy, [seed % 2], SAMPLED, JacobiDrafter("random"), rule_fn(), 4, g, step, False)
        if first_only:
            out.append(res.tokens[0, :-1].tolist())  # the accepted drafts (the last token is the residual draw)
        else:
            out += [b - a - 1 for a, b in zip(lengths, lengths[1:])]
    return out


@pytest.mark.parametrize("rule_fn", [StrictRule, lambda: GSDRule(emb_threshold=50.0)], ids=["sjd", "gsd"])
def test_sampled_spec_verify_kernel_keeps_decisions_and_accepted_lengths(monkeypatch, rule_fn):
    toy = ToyARAdapter(vocab=8, grid=(2, 4), seed=1)
    monkeypatch.setenv("MMFAST_KERNEL_IMPL", "torch")
    first = _accepted_lengths(toy, rule_fn, range(16), first_only=True)
    base = _accepted_lengths(toy, rule_fn, range(100, 140))
    monkeypatch.setenv("MMFAST_KERNEL_IMPL", "triton")
    assert _accepted_lengths(toy, rule_fn, range(16), first_only=True) == first  # same uniforms, same decisions
    fast = _accepted_lengths(toy, rule_fn, range(200, 240))
    table = [[lengths.count(m) for m in range(4)] for lengths in (base, fast)]
    assert min(sum(row[1:]) for row in table) > 20  # drafts do get accepted: the test sees the accept path
    assert stats.chi2_contingency(table).pvalue > 1e-3, table
