"""AR generation core: the shared target distribution, the baseline loop's exactness, the pipeline contract."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    ClassifierFreeGuidanceLogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mmfast.accel.spec import Composed
from mmfast.decoding import ar_decode
from mmfast.errors import ConfigError, InvalidInputError
from mmfast.models.argen import Sampling, target_probs
from mmfast.pipelines.image_gen import ImageGenPipeline
from mmfast.train.toy import ToyARAdapter


def chi_square_pvalue(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float], min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < ``min_expected`` are pooled into one."""
    n = len(samples)
    counts = collections.Counter(samples)
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for seq, p in exact.items():
        if p * n >= min_expected:
            obs.append(counts.get(seq, 0))
            exp.append(p * n)
        else:
            pool_o += counts.get(seq, 0)
            pool_e += p * n
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    exp_arr = np.array(exp) * (n / np.sum(exp))  # exact renormalisation against float error
    return float(stats.chisquare(obs, exp_arr).pvalue)


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(guidance_scale=3.0, temperature=0.7, top_k=3, top_p=0.9),
        Sampling(guidance_scale=1.0, temperature=1.3),
        Sampling(guidance_scale=2.0, top_p=0.5),
    ],
)
def test_target_probs_equals_transformers_processors(sampling):
    torch.manual_seed(0)
    raw = torch.randn(2 * 3 if sampling.cfg else 3, 50) * 3
    procs = LogitsProcessorList()
    if sampling.cfg:
        procs.append(ClassifierFreeGuidanceLogitsProcessor(sampling.guidance_scale))
    if sampling.temperature != 1:
        procs.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        procs.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        procs.append(TopPLogitsWarper(sampling.top_p))
    ref = procs(torch.zeros(3, 1, dtype=torch.long), raw).softmax(-1)
    torch.testing.assert_close(target_probs(raw, sampling), ref, rtol=0, atol=1e-7)


def test_sampling_validation():
    for bad in [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5), dict(guidance_scale=-1)]:
        with pytest.raises(ConfigError):
            Sampling(**bad)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(guidance_scale=2.5, temperature=0.9, top_k=3)])
def test_baseline_loop_samples_the_exact_joint_distribution(sampling):
    toy = ToyARAdapter(vocab=4, grid=(1, 4), seed=1)
    exact = toy.joint_distribution(label=1, sampling=sampling)
    n = 20_000
    res = ar_decode(toy, [1] * n, sampling, torch.Generator().manual_seed(0), progress=False)
    samples = [tuple(r) for r in res.tokens.tolist()]
    assert chi_square_pvalue(samples, exact) > 0.01
    emp = collections.Counter(samples)
    tv = 0.5 * sum(abs(emp.get(s, 0) / n - p) for s, p in exact.items())
    assert tv < 0.05
    # power: the same test rejects a sampler that ignores CFG / temperature
    wrong = ToyARAdapter(vocab=4, grid=(1, 4), seed=1).joint_distribution(label=0, sampling=sampling)
    assert chi_square_pvalue(samples, wrong) < 1e-6


def test_pipeline_contract_and_reproducibility():
    toy = ToyARAdapter(vocab=6, grid=(2, 3))
    pipe = ImageGenPipeline(toy, Composed([]), model_name="toy")
    a = pipe(labels=[0, 1], seed=7, guidance_scale=2.0, progress=False)
    b = pipe(labels=[0, 1], seed=7, guidance_scale=2.0, progress=False)
    c = pipe(labels=[0, 1], seed=8, guidance_scale=2.0, progress=False)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert len(a.images) == 2 and a.images[0].size == (3, 2)
    assert a.stats["steps"] == 6 and a.stats["tokens"] == 6 and a.stats["step_compression"] == 1.0
    images, tokens, st = pipe(labels=[1], seed=0, num_images_per_condition=3, return_dict=False, progress=False)
    assert tokens.shape == (3, 6) and len(images) == 3

    seen = []

    def stop_after_two(p, step, _t, kwargs):
        seen.append(kwargs["tokens"].shape[1])
        if step == 1:
            p._interrupt = True

    out = pipe(labels=[0], seed=0, callback_on_step_end=stop_after_two, output_type="tokens", progress=False)
    assert seen == [1, 2] and out.tokens.shape == (1, 2) and out.images == []
    with pytest.raises(InvalidInputError):
        pipe(labels=[5])
    with pytest.raises(InvalidInputError):
        pipe(labels=None)
    with pytest.raises(ConfigError):
        pipe(labels=[0], top_p=2.0)
