"""Speculative decoders: exactness by enumeration (with a power check), LANTERN's TV bound, GSD groups, greedy."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from test_image_gen import chi_square_pvalue

import mmfast.accel as A
from mmfast.accel.eagle import EagleDrafter, EagleHead
from mmfast.accel.gsd import GSDRule
from mmfast.accel.lantern import LanternRule, latent_neighbours
from mmfast.accel.sjd import JacobiDrafter
from mmfast.accel.speculative import StrictRule, speculative_decode
from mmfast.decoding import ar_decode
from mmfast.errors import ConfigError
from mmfast.models.argen import Sampling
from mmfast.pipelines.image_gen import ImageGenPipeline
from mmfast.train.toy import ToyARAdapter

SAMPLING = Sampling(guidance_scale=2.0, temperature=0.9, top_k=5)
N_SAMPLES = 100_000


pytestmark = pytest.mark.usefixtures("one_thread")


def _collect(adapter, drafter_fn, rule, label=1, n=N_SAMPLES, batch=2000, window=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples, steps, runs = [], 0, 0
    for _ in range(n // batch):
        res = speculative_decode(adapter, [label] * batch, SAMPLING, drafter_fn(), rule, window, g, progress=False)
        samples += [tuple(r) for r in res.tokens.tolist()]
        steps, runs = steps + res.steps, runs + 1
    return samples, steps / runs


def _tv(samples, exact):
    emp = collections.Counter(samples)
    return 0.5 * sum(abs(emp.get(s, 0) / len(samples) - p) for s, p in exact.items())


def _tv_floor(exact, n=N_SAMPLES, draws=5):
    """Mean TV between the exact distribution and n EXACT samples of it: the noise floor at this sample size."""
    probs = np.array(list(exact.values()))
    probs = probs / probs.sum()
    rng = np.random.default_rng(0)
    return float(np.mean([0.5 * np.abs(rng.multinomial(n, probs) / n - probs).sum() for _ in range(draws)]))


TV_TOLERANCE = 1.25  # stated tolerance: TV within 25% of the finite-sample noise floor of exact sampling


class _BrokenResidual(StrictRule):
    """Accepts correctly but resamples from p instead of norm(max(0, p - q)): biased towards drafts."""

    def residual(self, p, q, x, adapter):
        return p


@pytest.mark.parametrize("init", ["random", "repeat_horizontal", "sample_horizontal"])
def test_sjd_matches_the_exact_joint_distribution(init):
    toy = ToyARAdapter(vocab=6, grid=(1, 5), seed=1)  # 6^5 = 7776 sequences, enumerated
    exact = toy.joint_distribution(1, SAMPLING)
    samples, _ = _collect(toy, lambda: JacobiDrafter(init), StrictRule())
    assert chi_square_pvalue(samples, exact) > 0.01
    assert _tv(samples, exact) < TV_TOLERANCE * _tv_floor(exact)  # floor ~0.0146 here; measured SJD TV ~0.0146


def _biased_samples(exact, bias, seed=1):
    """N_SAMPLES exact-multinomial samples of ``exact`` with ``bias`` of the mass moved onto its 20 likeliest sequences."""
    keys, probs = list(exact), np.array(list(exact.values()))
    probs = probs / probs.sum()
    top = np.argsort(-probs)[:20]
    biased = probs.copy()
    biased[top] *= 1.0 + bias / probs[top].sum()
    counts = np.random.default_rng(seed).multinomial(N_SAMPLES, biased / biased.sum())
    return [k for k, c in zip(keys, counts) for _ in range(c)]


def test_the_checks_are_not_loose():
    """Chi-square rejects a 5% bias of the exact distribution (measured p ~ 2e-6); the TV tolerance rejects it too."""
    toy = ToyARAdapter(vocab=6, grid=(1, 5), seed=1)
    exact = toy.joint_distribution(1, SAMPLING)
    assert chi_square_pvalue(_biased_samples(exact, 0.05), exact) < 1e-4
    assert _tv(_biased_samples(exact, 0.05), exact) > TV_TOLERANCE * _tv_floor(exact)
    assert _tv(_biased_samples(exact, 0.0), exact) < TV_TOLERANCE * _tv_floor(exact)


def test_the_exactness_test_has_power():
    toy = ToyARAdapter(vocab=6, grid=(1, 5), seed=1)
    exact = toy.joint_distribution(1, SAMPLING)
    samples, _ = _collect(toy, lambda: JacobiDrafter("repeat_horizontal"), _BrokenResidual(), n=20_000)
    assert chi_square_pvalue(samples, exact) < 1e-6


def _tiny_llamagen(seed=0):
    from mmfast.models.llamagen import LlamaGen, LlamaGenAdapter, LlamaGenConfig

    cfg = LlamaGenConfig(dim=32, n_layer=2, n_head=4, vocab_size=6, block_size=4, num_classes=2, class_dropout_prob=0.1,
                         token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, initializer_range=0.5)
    torch.manual_seed(seed)
    gpt = LlamaGen(cfg)
    torch.nn.init.normal_(gpt.output.weight, std=0.5)  # the official init zeroes it
    return LlamaGenAdapter(gpt, None)


def _llamagen_joint(adapter, label, sampling):
    import itertools

    seqs = torch.tensor(list(itertools.product(range(adapter.codebook_size), repeat=adapter.num_tokens)))
    cond = torch.full((len(seqs),), label)
    with torch.no_grad():
        if sampling.cfg:
            logits = adapter.gpt(seqs[:, :-1].repeat(2, 1), torch.cat([cond, adapter.gpt.null_condition(len(seqs))]),
                                 drop=torch.zeros(2 * len(seqs), dtype=torch.bool))
        else:
            logits = adapter.gpt(seqs[:, :-1], cond, drop=torch.zeros(len(seqs), dtype=torch.bool))
    probs = adapter.target_probs(logits, sampling)
    p = probs.gather(-1, seqs[..., None]).squeeze(-1).prod(-1)
    return {tuple(s.tolist()): float(q) for s, q in zip(seqs, p)}


def test_strict_drafter_sd_matches_the_exact_joint_distribution():
    adapter = _tiny_llamagen()
    exact = _llamagen_joint(adapter, 1, SAMPLING)  # 6^4 = 1296 sequences
    torch.manual_seed(3)
    head = EagleHead(adapter)  # an untrained head: arbitrary q, the harder case for exactness
    samples, _ = _collect(adapter, lambda: EagleDrafter(head), StrictRule(), window=3)
    assert chi_square_pvalue(samples, exact) > 0.01
    assert _tv(samples, exact) < TV_TOLERANCE * _tv_floor(exact)
    broken, _ = _collect(adapter, lambda: EagleDrafter(head), _BrokenResidual(), n=20_000, window=3)
    assert chi_square_pvalue(broken, exact) < 1e-6


def test_lantern_relaxed_target_respects_the_tv_budget():
    torch.manual_seed(0)
    v = 50
    nbrs = latent_neighbours(torch.randn(v, 4), k=10)
    p = torch.softmax(torch.randn(3, 7, v) * 2, -1)
    x = torch.randint(0, v, (3, 7))
    for delta in (0.05, 0.1, 0.3):
        pt = LanternRule(nbrs, delta=delta).target(p, x, None)
        tv = 0.5 * (pt - p).abs().sum(-1)
        assert bool((tv <= delta + 1e-6).all()) and float(tv.max()) > 0
        torch.testing.assert_close(pt.sum(-1), torch.ones(3, 7))
        # the moved mass is exactly the neighbours' mass, taken nearest first
        moved = pt.gather(-1, x[..., None]) - p.gather(-1, x[..., None])
        torch.testing.assert_close(moved.squeeze(-1), tv)
    lam = 3.0
    pt = LanternRule(nbrs, delta=None, lam=lam).target(p, x, None)
    assert bool((pt.gather(-1, x[..., None]) <= lam * p.gather(-1, x[..., None]) + 1e-6).all())


def test_lantern_per_step_tv_in_decoding():
    toy = ToyARAdapter(vocab=16, grid=(4, 4), seed=0)
    pipe = ImageGenPipeline(toy, A.resolve("lantern(k=5,delta=0.1,window=6)"))
    out = pipe(labels=[0] * 16, seed=0, guidance_scale=1.5, progress=False)
    assert 0 < out.stats["max_tv"] <= 0.1 + 1e-6


def test_gsd_group_on_hand_built_targets():
    # six ranked tokens, then ten less likely far-away ones (16 >= 2 * rank_window codes: no wrapped slice)
    emb = torch.cat([torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.2], [3.0, 3.0], [0.2, 0.1], [5.0, 0.0]]),
                     torch.full((10, 2), 9.0)])
    p = torch.cat([torch.tensor([0.30, 0.25, 0.20, 0.15, 0.06, 0.04]), torch.linspace(1e-3, 1e-4, 10)])[None, None]
    rule = GSDRule(rank_window=7, prob_threshold=0.15, emb_threshold=0.5)
    g = rule.group(p, torch.tensor([[0]]), emb)[0, 0].tolist()
    # token 3: far in embedding space; token 4, 5: probability gap >= 0.15... token 4 gap 0.24, token 5 gap 0.26 / far
    assert g == [True, True, True] + [False] * 13
    rule2 = GSDRule(rank_window=1, prob_threshold=1.0, emb_threshold=100.0)
    # the reference's ascending slice [c - 1 : c + 1]: x (rank 2) and the next LESS likely token (rank 3)
    assert rule2.group(p, torch.tensor([[2]]), emb)[0, 0].tolist() == [False, False, True, True] + [False] * 12
    assert rule2.group(p, torch.tensor([[15]]), emb)[0, 0].sum() == 1  # the least likely: empty slice, G = {x}

    class _Emb:
        def token_embeddings(self):
            return emb

    acc = rule.accept_probs(p, None, torch.tensor([[0]]), _Emb())
    torch.testing.assert_close(acc, torch.tensor([[0.75]]))  # p(G) = 0.30 + 0.25 + 0.20 over q(G) = 1


@pytest.mark.parametrize("spec", ["sjd(window=5)", "sjd(window=5,init='repeat_vertical')", "lantern(k=3,window=5)", "gsd(window=5)"])
def test_greedy_decoders_reproduce_the_baseline(spec):
    toy = ToyARAdapter(vocab=16, grid=(4, 4), seed=2)
    base = ImageGenPipeline(toy, A.resolve(None))(labels=[0, 1, 1], temperature=0, guidance_scale=2.0, progress=False)
    fast = ImageGenPipeline(toy, A.resolve(spec))(labels=[0, 1, 1], temperature=0, guidance_scale=2.0, progress=False)
    assert torch.equal(base.tokens, fast.tokens)
    assert fast.stats["steps"] <= base.stats["steps"]


def test_janus_greedy_sjd_reproduces_the_baseline(tmp_path):
    from mmfast.models.janus import JanusAdapter
    from mmfast.train.tiny_models import build_tiny_janus

    adapter = JanusAdapter.from_pretrained(build_tiny_janus(tmp_path / "janus"))
    sampling = Sampling(guidance_scale=3.0, temperature=0)
    base = ar_decode(adapter, ["a red square"], sampling, progress=False)
    fast = A.SJD(window=6).decode(adapter, ["a red square"], sampling, None, progress=False)
    assert torch.equal(base.tokens, fast.tokens)


def test_spec_validation():
    for bad in ["sjd(window=1)", "sjd(init='diagonal')", "lantern(delta=2)", "lantern(lam=0.5)", "gsd(rank_window=0)"]:
        with pytest.raises(ConfigError):
            A.resolve(bad)


def test_lantern_default_k_scales_with_the_codebook():
    from mmfast.accel.lantern import default_k

    assert default_k(16384) == 1000 and default_k(512) == 31 and default_k(16) == 1
    toy = ToyARAdapter(vocab=16, grid=(4, 4), seed=0)
    assert A.resolve("lantern()").accelerators[0].neighbour_count(toy) == 1
    assert A.resolve("lantern(k=7)").accelerators[0].neighbour_count(toy) == 7


def test_ar_speed_suite_reports_step_cost_and_projection(tmp_path):
    import json

    from mmfast.bench.ar import ar_speed

    res = tmp_path / "q.json"
    res.write_text(json.dumps({"rows": [{"method": "sjd(window=4)", "step_compression": 1.5}]}))
    rows = ar_speed(["sjd(window=4)", "gsd(window=4)"], repeats=1, preset="tiny", images=1, compression_from=str(res))
    base, sjd, gsd = rows
    assert base["step_cost"] == 1.0 and base["projected_speedup"] == 1.0
    assert base["steps"] == 16  # one forward per token (the first with the prefill)
    assert sjd["steps"] < 16 and sjd["projected_speedup"] == pytest.approx(1.5 / sjd["step_cost"], rel=2e-3)
    assert gsd["projected_speedup"] is None  # no tiny-ar compression for it in the file


def test_gsd_group_equals_the_full_vocabulary_definition():
    """The windowed group equals the definition evaluated over every token (rank window, p gap, distance)."""
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(2, 5, 300, generator=g) * 3, -1)
    x = torch.randint(0, 300, (2, 5), generator=g)
    emb = torch.randn(300, 8, generator=g) * 0.3
    rule = GSDRule(rank_window=7, prob_threshold=0.01, emb_threshold=1.0)
    got = rule.group(p, x, emb)
    order = p.argsort(-1, descending=True)
    rank = order.argsort(-1)
    rx = rank.gather(-1, x[..., None])
    # ranks r-6 .. r+7 (the reference's ascending slice); none when x is among the 7 least likely (empty slice)
    ref = ((rank > rx - 7) & (rank <= rx + 7) & (rx < 300 - 7) & ((p - p.gather(-1, x[..., None])).abs() < 0.01)
           & ((emb[None, None] - emb[x][..., None, :]).square().sum(-1) < 1.0)).scatter(-1, x[..., None], True)
    assert torch.equal(got, ref) and 1 < int(got.sum(-1).max()) < 14
