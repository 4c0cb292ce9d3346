"""spec_verify: the Triton verify step equals the reference draw for draw (strict rule with proposals or point
masses, bonus row or not, greedy; LANTERN's relaxed target and GSD's group masses passed in); the reference is the
speculative loop's strict rule and is exact (the committed token is distributed as p)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit decorates: before any kernel module import

import pytest
import torch

from mmfast.kernels import triton_available
from mmfast.kernels.spec_verify import acceptance, make_case, spec_verify, spec_verify_reference

pytestmark = pytest.mark.usefixtures("one_thread")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA + triton")


def _kernel(**case):
    from mmfast.kernels.spec_verify.triton import spec_verify_triton

    return spec_verify_triton(**case, block_v=64)


def _same(a, b):
    assert torch.equal(a.accepted, b.accepted) and torch.equal(a.token, b.token)
    torch.testing.assert_close(a.accept_prob, b.accept_prob, atol=0, rtol=0)


def _force(case):
    """Row 0 accepts every draft (u = 0), row 1 rejects the first (u = 1): the bonus and the residual at 0."""
    case["u_accept"][0] = 0.0
    case["u_accept"][1] = 1.0
    return case


@needs_triton
@pytest.mark.parametrize("proposal", [True, False])
@pytest.mark.parametrize("bonus", [True, False])
def test_strict_rule_matches_reference(proposal, bonus):
    case = make_case(batch=8, window=6, vocab=150, proposal=proposal, bonus=bonus, seed=int(proposal) + 2 * int(bonus))
    if not proposal:  # point masses: accept with probability p(x), make that likelier
        case["u_accept"] *= 0.2
    _force(case)
    for greedy in (False, True):
        got, want = _kernel(**case, greedy=greedy), spec_verify_reference(**case, greedy=greedy)
        _same(got, want)
    assert want.accepted[0] == 5 and want.accepted[1] == 0 and 0 < want.accepted[2:].float().mean() < 5
    assert (want.token[want.accepted == 5] == -1).all() != bonus


@needs_triton
def test_relaxed_rules_and_degenerate_residual(monkeypatch):
    """LANTERN: a relaxed target (neighbour mass moved onto the draft) as p rows; GSD: group masses as px / qx;
    p == q exactly: the residual has no mass and falls back to p; the dispatcher with MMFAST_KERNEL_IMPL=triton."""
    case = make_case(batch=6, window=5, vocab=120, seed=7)
    p, x = case["p"], case["x"]
    nb = (x[..., None] + torch.arange(1, 4)) % 120  # three "latent neighbours" of each draft
    relaxed = p[:, :4].scatter(-1, nb, 0.0)
    relaxed = relaxed.scatter_add(-1, x[..., None], p[:, :4].gather(-1, nb).sum(-1, keepdim=True))
    lantern = {**case, "p": torch.cat([relaxed, p[:, 4:]], 1)}
    _same(_kernel(**lantern), spec_verify_reference(**lantern))
    group = torch.zeros_like(case["q"], dtype=torch.bool).scatter(-1, nb, True).scatter(-1, x[..., None], True)
    pg, qg = (p[:, :4] * group).sum(-1), (case["q"] * group).sum(-1)
    gsd = {**case, "px": pg, "qx": qg}
    got = _kernel(**gsd)
    _same(got, spec_verify_reference(**gsd))
    torch.testing.assert_close(got.accept_prob, (pg / qg).clamp(max=1))
    same = {**case, "q": p[:, :4].clone(), "u_accept": torch.ones(6, 4)}  # p == q, everything rejected
    got = _kernel(**same)
    _same(got, spec_verify_reference(**same))
    assert (got.accepted == 0).all() and (got.accept_prob == 1).all()
    monkeypatch.setenv("MMFAST_KERNEL_IMPL", "triton")
    _same(spec_verify(**case), spec_verify_reference(**case))


def test_reference_is_the_strict_rule_and_exact():
    """Acceptance = the loop's StrictRule; by enumeration over drafts x ~ q and a fine grid of uniforms, the
    committed token (x if accepted, else the residual draw) is distributed as p."""
    from mmfast.accel.speculative import StrictRule

    g = torch.Generator().manual_seed(0)
    v = 5
    p, q = torch.softmax(torch.randn(1, 2, v, generator=g), -1), torch.softmax(torch.randn(1, 1, v, generator=g), -1)
    x = torch.tensor([[2]])
    torch.testing.assert_close(acceptance(p, x, q), StrictRule().accept_probs(p[:, :1], q, x, None))
    torch.testing.assert_close(acceptance(p, x), StrictRule().accept_probs(p[:, :1], None, x, None))
    n = 4000
    u = (torch.arange(n) + 0.5) / n
    total = torch.zeros(v)
    for xi in range(v):
        out = spec_verify_reference(
            p.expand(n, -1, -1), torch.full((n, 1), xi), torch.ones(n, 1), u, q.expand(n, -1, -1)
        )  # all rejected: the residual draws
        residual = torch.bincount(out.token, minlength=v).float() / n
        a = float(out.accept_prob[0, 0])
        total += q[0, 0, xi] * (a * torch.eye(v)[xi] + (1 - a) * residual)
    torch.testing.assert_close(total, p[0, 0], atol=2e-3, rtol=0)


@needs_cuda
@pytest.mark.parametrize("proposal", [True, False])
def test_cuda_matches_reference(proposal):
    """Real sizes (window 16, V = 16384): identical acceptances; draws identical but for uniforms landing within
    float32 rounding of a CDF step (tolerated: at most one row in the batch)."""
    from mmfast.kernels.spec_verify.triton import spec_verify_triton

    case = make_case(batch=16, window=16, vocab=16384, proposal=proposal, device="cuda", seed=3)
    for greedy in (False, True):
        got, want = spec_verify_triton(**case, greedy=greedy), spec_verify_reference(**case, greedy=greedy)
        assert torch.equal(got.accepted, want.accepted)
        torch.testing.assert_close(got.accept_prob, want.accept_prob)
        assert int((got.token != want.token).sum()) <= (0 if greedy else 1)
