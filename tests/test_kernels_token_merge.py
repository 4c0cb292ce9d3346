"""token_merge: Triton cosine match (row max / argmax) and scatter-mean vs the reference; the bipartite / fold merges
of Turbo through the dispatcher; LOOK-M's and VisionZip's merges expressed with the two primitives."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit decorates: before any kernel module import

import pytest
import torch
import torch.nn.functional as F

from mmfast.kernels import triton_available
from mmfast.kernels.token_merge import bipartite_merge, cosine_match, fold_merge, reference, scatter_mean

pytestmark = pytest.mark.usefixtures("one_thread")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA + triton")


def _same_merge(a, b, atol=1e-6):
    for name in ("anchor", "src", "dst"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("x", "size", "metric", "semantic"):
        u, v = getattr(a, name), getattr(b, name)
        assert (u is None) == (v is None), name
        if u is not None:
            torch.testing.assert_close(u, v, atol=atol, rtol=1e-5)


@needs_triton
def test_cosine_match():
    """Batched (LOOK-M: (B, H, E, D) against (B, H, k, D)), sizes off the block grid, first index on exact ties."""
    from mmfast.kernels.token_merge.triton import cosine_match_triton

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 2, 37, 40, generator=g), torch.randn(1, 2, 45, 40, generator=g)
    b[:, :, 40] = b[:, :, 3] * 2  # same direction: a row matching b[3] must report 3, not 40
    a[:, :, 5] = b[:, :, 3]
    best, idx = cosine_match_triton(a, b, block_a=16, block_b=16, block_c=32)
    ref_best, ref_idx = reference.cosine_match(a, b)
    assert torch.equal(idx, ref_idx) and (idx[:, :, 5] == 3).all()
    torch.testing.assert_close(best, ref_best, atol=1e-6, rtol=1e-6)
    half_best, half_idx = cosine_match_triton(a.half(), b.half())  # fp16 inputs, fp32 scores
    assert torch.equal(half_idx, reference.cosine_match(a.half(), b.half())[1])


@needs_triton
def test_scatter_mean():
    from mmfast.kernels.token_merge.triton import scatter_mean_triton

    g = torch.Generator().manual_seed(1)
    x, idx = torch.randn(2, 30, 24, generator=g), torch.randint(0, 6, (2, 30), generator=g)
    idx[idx == 4] = 5  # slot 4 receives nothing
    w, base, bw = torch.rand(2, 30, generator=g), torch.randn(2, 6, 24, generator=g), torch.rand(2, 6, generator=g)
    for args in ((None, None, None), (w, None, None), (w, base, None), (None, base, bw)):
        mean, tot = scatter_mean_triton(x, idx, 6, *args, block_t=4)
        ref_mean, ref_tot = reference.scatter_mean(x, idx, 6, *args)
        torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tot, ref_tot, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean[:, 4], base[:, 4])  # an empty slot keeps its base row
    assert (scatter_mean_triton(x, idx, 6)[0][:, 4] == 0).all()


@needs_triton
def test_bipartite_and_fold_merge_dispatch(monkeypatch):
    """Turbo's merges (semantic term, class token, separate metric, folds) equal the reference with the kernels."""
    g = torch.Generator().manual_seed(2)
    x, metric = torch.randn(2, 21, 16, generator=g), torch.randn(2, 21, 8, generator=g)
    size, sem = torch.rand(2, 21, generator=g) + 0.5, torch.rand(2, 21, generator=g)
    anchor = torch.arange(21).expand(2, -1)
    cases = [
        dict(metric=None, r=6),
        dict(metric=metric, r=5, semantic=sem, weight=2.0),
        dict(metric=None, r=12, semantic=sem, protect_first=True),  # at most (T - 1) // 2 = 10
    ]
    for i, kw in enumerate(cases):
        monkeypatch.setenv("MMFAST_KERNEL_IMPL", "torch")
        ref = bipartite_merge(x, size, anchor, **kw)
        fold_ref = fold_merge(x, size, anchor, **{**kw, "r": 15}) if i == 1 else None  # 3 rounds: 10, 4, 1
        monkeypatch.setenv("MMFAST_KERNEL_IMPL", "triton")
        _same_merge(bipartite_merge(x, size, anchor, **kw), ref)
        if fold_ref is not None:
            _same_merge(fold_merge(x, size, anchor, **{**kw, "r": 15}), fold_ref)
    assert torch.equal(ref.x, reference.bipartite_merge(x, size, anchor, **cases[-1]).x)  # torch = the reference


@needs_triton
def test_lookm_and_visionzip_merges_from_primitives(monkeypatch):
    """LOOK-M's ``avg`` merge (nearest kept key, filtered by the mean similarity, scatter-mean around the kept entry)
    and VisionZip's contextual tokens (target + mean of its assigned tokens) from cosine_match + scatter_mean."""
    from mmfast.accel.lookm import merge_evicted

    monkeypatch.setenv("MMFAST_KERNEL_IMPL", "triton")
    g = torch.Generator().manual_seed(3)
    b, h, s, d, k = 1, 2, 30, 16, 12
    keys, values = torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)
    kept = torch.stack([torch.randperm(s, generator=g)[:k].sort().values for _ in range(h)])[None]
    want_k, want_v = merge_evicted(keys, values, kept, "avg")
    is_kept = torch.zeros(b, h, s, dtype=torch.bool).scatter_(-1, kept, True)
    evicted = torch.argsort(is_kept.to(torch.int8), dim=-1, stable=True)[..., : s - k]
    kk, vk = (t.gather(2, kept[..., None].expand(b, h, k, d)) for t in (keys, values))
    ke, ve = (t.gather(2, evicted[..., None].expand(b, h, s - k, d)) for t in (keys, values))
    best, pivot = cosine_match(ke, kk)
    use = (best >= best.mean(-1, keepdim=True)).float()
    torch.testing.assert_close(scatter_mean(ke, pivot, k, use, kk)[0], want_k, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scatter_mean(ve, pivot, k, use, vk)[0], want_v, atol=1e-6, rtol=1e-5)
    # VisionZip: every other token goes to its most similar target (cosine of the metric), target + mean
    feats, m = torch.randn(20, 8, generator=g), torch.randn(20, 6, generator=g)
    tgt, oth = torch.arange(0, 20, 4), torch.tensor([i for i in range(20) if i % 4])
    assign = (F.normalize(m[oth], dim=-1) @ F.normalize(m[tgt], dim=-1).T).argmax(-1)
    count = torch.zeros(5).index_add_(0, assign, torch.ones(15)).clamp_min(1)
    want = feats[tgt] + torch.zeros(5, 8).index_add_(0, assign, feats[oth]) / count[:, None]
    _, got_assign = cosine_match(m[oth][None], m[tgt][None])
    assert torch.equal(got_assign[0], assign)
    torch.testing.assert_close(feats[tgt] + scatter_mean(feats[oth][None], assign[None], 5)[0][0], want)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    """Real sizes (576 tokens, 1024 channels): partners agree wherever the reference's best score leads the runner-up
    by more than float32 noise; scatter-means agree; a whole merge agrees when the partners do."""
    from mmfast.kernels.token_merge.triton import bipartite_merge_triton, cosine_match_triton, scatter_mean_triton

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 576, 1024, generator=g).to("cuda", dtype)
    a, b = x[:, ::2], x[:, 1::2]
    best, idx = cosine_match_triton(a, b)
    ref_best, ref_idx = reference.cosine_match(a, b)
    torch.testing.assert_close(best, ref_best, atol=1e-5, rtol=1e-5)
    scores = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)
    top2 = scores.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-5
    assert torch.equal(idx[clear], ref_idx[clear])
    index = torch.randint(0, 300, (2, 576), generator=g).cuda()
    w = torch.rand(2, 576, generator=g).cuda()
    for got, want in zip(scatter_mean_triton(x, index, 300, w), reference.scatter_mean(x, index, 300, w)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    size, anchor = torch.ones(2, 576, device="cuda"), torch.arange(576, device="cuda").expand(2, -1)
    out, ref = bipartite_merge_triton(x, size, anchor, None, 288), reference.bipartite_merge(x, size, anchor, None, 288)
    if bool(clear.all()):
        _same_merge(out, ref, atol=1e-2)
