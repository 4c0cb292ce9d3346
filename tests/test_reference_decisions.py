"""Decision-level agreement with the reference implementations: SJD's strict rule, GSD's grouped rule, LANTERN /
LANTERN++ (both residual paths).

Each reference rule is re-implemented below from a reading of the released code's semantics (written
independently, one draft at a time in numpy as those loops run): SJD (tyshiwo1/Accelerating-T2I-AR-with-SJD,
``SpeculativeSampler.__call__``), GSD (junhyukso/GSD, the same sampler with the grouped test) and LANTERN
(jadohu/LANTERN, ``evaluate_posterior`` for point-mass drafts and ``evaluate_posterior_v1`` for drafts with a
proposal distribution). On seeded random targets, drafts and injected uniforms, mmfast's rule objects must give
the same acceptance probabilities, GSD groups, accepted counts and residual distributions case by case; a few
cases per rule also go through :func:`speculative_decode` itself (one verification step, uniforms injected).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmfast.accel as A
from mmfast.accel.gsd import GSDRule
from mmfast.accel.lantern import LanternRule, latent_neighbours
from mmfast.accel.speculative import Drafter, StrictRule, speculative_decode
from mmfast.errors import ConfigError
from mmfast.models.argen import ARGenAdapter, ARGenSession, Sampling, target_probs
from mmfast.train.toy import ToyARAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

V, K, CASES, LOOP_CASES = 64, 6, 120, 24  # codebook, drafts per window, rule-level cases, loop-level cases
ATOL = 2e-6


# --------------------------------------------------------------------------------------------------
# reference semantics (numpy, one draft at a time)
# --------------------------------------------------------------------------------------------------
def _onehot(x: int) -> np.ndarray:
    e = np.zeros(V)
    e[x] = 1.0
    return e


def ref_strict(p, q, x):
    """SJD: accept min(1, p(x) / q(x)) (q None: a one-hot proposal); residual norm(max(0, p - q))."""
    qq = _onehot(x) if q is None else q
    resid = np.maximum(p - qq, 0.0)
    return min(1.0, p[x] / qq[x]), resid / resid.sum()


def ref_gsd(logits, p, q, x, emb, w=7, p_thr=0.15, d_thr=0.5):
    """GSD: ascending sort of the processed logits, slice [c - w : c + w] (Python slicing), filter by probability
    gap and squared embedding distance, accept min(1, p(G) / q(G)); an empty slice raises in the reference and
    its fallback is the plain test. Returns (acceptance, group as a set, residual)."""
    qq = _onehot(x) if q is None else q
    asc = np.argsort(logits, kind="stable")
    c = int(np.flatnonzero(asc == x)[0])
    sl = asc[c - w : c + w]
    if len(sl) == 0:
        acc, group = min(1.0, p[x] / qq[x]), {x}
    else:
        keep = (np.abs(p[sl] - p[x]) < p_thr) & (((emb[sl] - emb[x]) ** 2).sum(-1) < d_thr)
        acc, group = min(1.0, p[sl][keep].sum() / qq[sl][keep].sum()), set(sl[keep].tolist())
    resid = np.maximum(p - qq, 0.0)
    return acc, group, resid / resid.sum()


def ref_lantern(p, q, x, nearest, k, delta=None, lam=None):
    """LANTERN: relax p(x) by the nearest neighbours' cumulative mass within the budget; reject → resample the
    ORIGINAL p: point-mass draft (q None) zeroes p at x and, if any neighbour was absorbed, at nearest[x, :k+1];
    a draft with q zeroes q at nearest[x, :k+1] (if absorbed) and takes max(0, p - q); no mass left → uniform;
    q(x) <= 0 → the draft is skipped and p is sampled. A one-hot q (a fresh token among carried Jacobi drafts) is a
    point-mass draft: mmfast maps it to the EAGLE-2 path. Returns (acceptance, residual)."""
    px = p[x]
    cum = np.cumsum(p[nearest[x, :k]])
    ok = np.flatnonzero(cum <= ((lam - 1) * px if lam is not None else delta))
    j = ok[-1] if len(ok) else -1
    relaxed = px + (cum[j] if j >= 0 else 0.0)
    zero = nearest[x, : k + 1]
    if q is None or q[x] >= 1:
        acc = relaxed
        resid = p.copy()
        resid[x] = 0.0
        if j >= 0:
            resid[zero] = 0.0
    else:
        if q[x] <= 0:
            return 0.0, p.copy()
        acc = relaxed / q[x]
        qq = q.copy()
        if j >= 0:
            qq[zero] = 0.0
        resid = np.maximum(p - qq, 0.0)
    if resid.sum() == 0:
        resid = np.ones(V)
    return min(1.0, acc), resid / resid.sum()


def ref_chain(accs, resids, u, p_last, accept_on_equal=False):
    """Left to right until the first rejection: (accepted count, the distribution the next token is drawn from)."""
    for i, (a, r) in enumerate(zip(accs, resids)):
        if not (u[i] <= a if accept_on_equal else u[i] < a):
            return i, r
    return len(accs), p_last


# --------------------------------------------------------------------------------------------------
# seeded cases
# --------------------------------------------------------------------------------------------------
def make_cases(seed, n=CASES, with_q="mixed", top_k=0):
    """n cases of (logits (K+1, V), p (K+1, V), q (K, V) or None, drafts (K,), uniforms (K,)).

    Drafts: a third the target's argmax, a third sampled from it, a third uniform (Jacobi random init); with a proposal q
    (a perturbed target, the Jacobi carry-over) the draft is sampled from q, and a few rows are one-hot
    (fresh tokens mixed into a carried window). Some drafts sit at the edges of the ranking."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        logits = rng.normal(size=(K + 1, V)) * (1.0, 2.5, 4.0, 6.0)[i % 4]
        p = target_probs(torch.tensor(logits, dtype=torch.float32), Sampling(top_k=top_k)).double().numpy()
        use_q = with_q is True or (with_q == "mixed" and i % 2 == 1)
        kind = rng.integers(0, 3, K)
        x = np.select([kind == 0, kind == 1], [p[:K].argmax(-1), [rng.choice(V, p=pi / pi.sum()) for pi in p[:K]]],
                      rng.integers(0, V, K))
        edge = rng.integers(0, 4)
        if edge < 2:  # an extreme of the ranking: among the 7 least likely / the 7 likeliest tokens
            order = np.argsort(logits[0], kind="stable")
            x[0] = order[rng.integers(0, 7)] if edge == 0 else order[V - 1 - rng.integers(0, 7)]
        q = None
        if use_q:
            ql = logits[:K] + rng.normal(size=(K, V)) * 0.7
            q = np.exp(ql - ql.max(-1, keepdims=True))
            q = (q / q.sum(-1, keepdims=True)).astype(np.float32).astype(np.float64)
            x = np.array([rng.choice(V, p=qi / qi.sum()) for qi in q])
            if i % 4 == 3:  # a fresh (one-hot) token among carried drafts
                j = rng.integers(0, K)
                q[j] = _onehot(x[j])
        cases.append((logits, p, q, x.astype(np.int64), rng.uniform(size=K)))
    return cases


def _nudge(u, accs):
    """Move uniforms away from their acceptance probabilities (float32 vs float64 rounding is not a decision)."""
    u = u.copy()
    close = np.abs(u - np.asarray(accs)) < 1e-4
    u[close] = (u[close] + 0.5) % 1.0
    return u


def _torch(cases):
    p = torch.tensor(np.stack([c[1] for c in cases]), dtype=torch.float32)
    x = torch.tensor(np.stack([c[3] for c in cases]))
    qs = [c[2] for c in cases]
    q = None if all(qi is None for qi in qs) else torch.tensor(
        np.stack([qi if qi is not None else np.stack([_onehot(t) for t in c[3]]) for qi, c in zip(qs, cases)]),
        dtype=torch.float32)
    return p, q, x


def _mmfast_chain(rule, p, q, x, u, adapter):
    """mmfast's decisions: accept_probs for every draft, the loop's first-rejection count, the rule's residual there."""
    a = rule.accept_probs(p[:, :K], q, x, adapter)
    ok = torch.tensor(u, dtype=torch.float32) < a
    m = torch.where(ok.all(1), torch.full((len(x),), K), (~ok).float().argmax(1))
    dists = []
    for b in range(len(x)):
        mb = int(m[b])
        if mb < K:
            qb = None if q is None else q[b : b + 1, mb]
            dists.append(rule.residual(p[b : b + 1, mb], qb, x[b : b + 1, mb], adapter)[0])
        else:
            dists.append(p[b, K])
    return a, m, dists


def _check_cases(cases, rule, ref_fn, adapter=None, accept_on_equal=False):
    """Every case: acceptance probabilities at every draft, accepted count, the next token's distribution."""
    refs = [[ref_fn(c, j) for j in range(K)] for c in cases]
    us = np.stack([_nudge(c[4], [r[0] for r in rr]) for c, rr in zip(cases, refs)])
    p, q, x = _torch(cases)
    a, m, dists = _mmfast_chain(rule, p, q, x, us, adapter)
    for b, (c, rr) in enumerate(zip(cases, refs)):
        np.testing.assert_allclose(a[b].double().numpy(), [r[0] for r in rr], atol=ATOL, err_msg=f"case {b}")
        m_ref, dist_ref = ref_chain([r[0] for r in rr], [r[-1] for r in rr], us[b], c[1][K], accept_on_equal)
        assert int(m[b]) == m_ref, f"case {b}: accepted {int(m[b])} vs reference {m_ref}"
        np.testing.assert_allclose(dists[b].double().numpy(), dist_ref, atol=ATOL, err_msg=f"case {b}")
    return m, us


class _Emb:
    def __init__(self, emb):
        self.emb = torch.tensor(emb, dtype=torch.float32)

    def token_embeddings(self):
        return self.emb


# --------------------------------------------------------------------------------------------------
# rule-level agreement
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_q", [False, True])
def test_sjd_strict_rule_matches_the_reference(with_q):
    cases = make_cases(1 + with_q, with_q=with_q, top_k=(0, 32)[with_q])
    m, _ = _check_cases(cases, StrictRule(), lambda c, j: ref_strict(c[1][j], None if c[2] is None else c[2][j], c[3][j]))
    assert 0 < int((m == 0).sum()) < CASES and int((m > 1).sum()) >= 5  # both outcomes, and chains, are exercised


def test_gsd_groups_acceptance_and_counts_match_the_reference():
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(V, 8)) * 0.2
    emb32 = emb.astype(np.float32).astype(np.float64)
    cases = make_cases(3)
    rule = GSDRule()  # the paper's rank_window=7, 0.15, 0.5
    adapter = _Emb(emb)

    def ref(c, j):
        return ref_gsd(c[0][j], c[1][j], None if c[2] is None else c[2][j], c[3][j], emb32)

    m, _ = _check_cases(cases, rule, ref, adapter)
    # the groups themselves, draft by draft
    p, q, x = _torch(cases)
    g = rule.group(p[:, :K], x, adapter.emb)
    sizes, empty = [], 0
    for b, c in enumerate(cases):
        for j in range(K):
            _, group, _ = ref(c, j)
            assert set(torch.nonzero(g[b, j]).flatten().tolist()) == group, f"case {b}, draft {j}"
            sizes.append(len(group))
            empty += int(np.flatnonzero(np.argsort(c[0][j], kind="stable") == c[3][j])[0] < 7)
    assert empty >= 20 and max(sizes) >= 6 and int((m > 0).sum()) > 20  # empty slices, real groups, accepted drafts


def test_gsd_window_orientation_and_empty_slice_on_a_hand_built_ranking():
    """Target ranked 0 (likeliest) .. 19 by token id; every filter open: the group is the rank window alone."""
    v = 20
    p = torch.softmax(-torch.arange(v, dtype=torch.float32) * 0.01, -1)[None, None]
    emb = torch.zeros(v, 2)
    rule = GSDRule(rank_window=7, prob_threshold=1.0, emb_threshold=1.0)
    got = {r: torch.nonzero(rule.group(p, torch.tensor([[r]]), emb)[0, 0]).flatten().tolist() for r in (0, 3, 10, 12, 13, 19)}
    assert got[10] == list(range(4, 18))  # six more likely, seven less likely
    assert got[3] == list(range(0, 11)) and got[0] == list(range(0, 8))  # cut at the likeliest token
    assert got[12] == list(range(6, 20))  # ascending position 7: the slice starts at 0
    assert got[13] == [13] and got[19] == [19]  # ascending position < 7: the reference's slice is empty


@pytest.mark.parametrize("setting", [dict(k=5, delta=0.1), dict(k=5, delta=0.3), dict(k=10, lam=5.0), dict(k=V - 1, delta=0.1)])
@pytest.mark.parametrize("with_q", [False, True])
def test_lantern_matches_the_reference(setting, with_q):
    rng = np.random.default_rng(11)
    cb = rng.normal(size=(V, 4)).astype(np.float32)
    d = np.sqrt(((cb[:, None].astype(np.float64) - cb[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1, kind="stable")[:, : V - 1]  # the reference's table: every other code, nearest first
    k = setting["k"]
    nbrs = latent_neighbours(torch.tensor(cb), k + 1)
    assert torch.equal(nbrs, torch.tensor(nearest[:, : k + 1]))
    delta, lam = setting.get("delta"), setting.get("lam")
    rule = LanternRule(nbrs, delta=delta, lam=lam, k=k)
    cases = make_cases(20 + k, with_q=with_q, top_k=(0, 24)[k % 2])

    def ref(c, j):
        return ref_lantern(c[1][j], None if c[2] is None else c[2][j], c[3][j], nearest, k, delta, lam)

    m, _ = _check_cases(cases, rule, ref, accept_on_equal=True)
    assert 0 < int((m == 0).sum()) < CASES and int((m > 0).sum()) > 10


def test_lantern_reference_edges():
    """Hand-built: the uniform fallback when x and its k+1 neighbours hold all the mass, and q(x) = 0."""
    nearest = torch.tensor([[1, 2, 3], [0, 2, 3], [1, 3, 0], [2, 1, 0]])
    rule = LanternRule(nearest, delta=0.1, k=2)
    p = torch.tensor([[0.2, 0.05, 0.75, 0.0]])  # x = 0: n_1 (0.05) absorbed, n_2 (0.75) not; n_3 has nothing
    torch.testing.assert_close(rule.accept_probs(p[:, None], None, torch.tensor([[0]]), None), torch.tensor([[0.25]]))
    torch.testing.assert_close(rule.residual(p, None, torch.tensor([0]), None), torch.full((1, 4), 0.25))
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    assert float(rule.accept_probs(p[:, None], q[:, None], torch.tensor([[0]]), None)) == 0.0
    torch.testing.assert_close(rule.residual(p, q, torch.tensor([0]), None), p)  # skipped: the plain target
    relaxed = LanternRule(nearest, delta=0.1, k=2, residual="relaxed")
    torch.testing.assert_close(relaxed.residual(p, None, torch.tensor([0]), None), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


def test_lantern_relaxed_residual_is_kept_and_differs_from_the_reference():
    rng = np.random.default_rng(5)
    nbrs = latent_neighbours(torch.tensor(rng.normal(size=(V, 4)), dtype=torch.float32), 11)
    cases = make_cases(9, with_q="mixed")
    p, q, x = _torch(cases)
    ref_rule, rel_rule = LanternRule(nbrs, delta=0.3, k=10), LanternRule(nbrs, delta=0.3, k=10, residual="relaxed")
    tv = []
    for b in range(len(cases)):
        qb = None if q is None else q[b : b + 1, 0]
        r_ref = ref_rule.residual(p[b : b + 1, 0], qb, x[b : b + 1, 0], None)
        r_rel = rel_rule.residual(p[b : b + 1, 0], qb, x[b : b + 1, 0], None)
        pt = rel_rule.target(p[b : b + 1, None, 0], x[b : b + 1, None, 0], None)[:, 0]
        qq = torch.nn.functional.one_hot(x[b : b + 1, 0], V).float() if qb is None else qb
        want = (pt - qq).clamp_min(0)
        torch.testing.assert_close(r_rel, want / want.sum(-1, keepdim=True))  # norm(max(0, p~ - q))
        tv.append(0.5 * float((r_ref - r_rel).abs().sum()))
    assert max(tv) > 0.2  # the two residuals are different rules


def test_lantern_accelerator_lists_k_plus_one_neighbours():
    toy = ToyARAdapter(vocab=16, grid=(4, 4), seed=0)
    rule = A.resolve("lantern(k=5)").accelerators[0].rule(toy)
    assert rule.k == 5 and rule.neighbours.shape[1] == 6 and rule.residual_mode == "reference"
    assert A.resolve("lantern(k=5,residual='relaxed')").accelerators[0].rule(toy).residual_mode == "relaxed"
    with pytest.raises(ConfigError, match="residual"):
        A.resolve("lantern(residual='p')")


# --------------------------------------------------------------------------------------------------
# the same decisions through the speculative loop (one verification step, injected uniforms)
# --------------------------------------------------------------------------------------------------
class _Session(ARGenSession):
    batch, length = 1, 0

    def __init__(self, raw):
        self.raw = raw

    def prefill(self):
        return torch.zeros(1, 1, self.raw.shape[-1])

    def forward(self, tokens, positions):
        assert tokens.shape == (1, K + 1) and int(positions[0]) == 0
        return self.raw[None]

    def truncate(self, n):
        pass


class _Scripted(ARGenAdapter):
    """One scripted verification step: position 0 from a uniform prefill, then K drafts + a bonus position."""

    family = "scripted"

    def __init__(self, raw, emb=None):
        super().__init__()
        self.raw, self.emb = raw, emb
        self.grid, self.codebook_size = (1, K + 2), raw.shape[-1]

    def session(self, conditions, sampling):
        return _Session(self.raw)

    def token_embeddings(self):
        return self.emb


class _Fixed(Drafter):
    def __init__(self, x, q):
        self.x, self.q = x, q

    def propose(self, tokens, n, k):
        assert n == 1 and k == K
        return self.x, self.q


def _loop_agrees(monkeypatch, cases, rule, ref_fn, emb=None, accept_on_equal=False, top_k=0):
    real_rand = torch.rand
    for i, c in enumerate(cases[:LOOP_CASES]):
        refs = [ref_fn(c, j) for j in range(K)]
        u = _nudge(c[4], [r[0] for r in refs])
        m_ref, dist_ref = ref_chain([r[0] for r in refs], [r[-1] for r in refs], u, c[1][K], accept_on_equal)
        monkeypatch.setattr(torch, "rand", lambda *s, generator=None, u=u: (
            torch.tensor(u, dtype=torch.float32)[None] if s == (1, K) else real_rand(*s, generator=generator)))
        used = []
        orig = type(rule).residual.__get__(rule)
        monkeypatch.setattr(rule, "residual", lambda *a, used=used, orig=orig: used.append(orig(*a)) or used[-1])
        q = None if c[2] is None else torch.tensor(c[2], dtype=torch.float32)[None]
        x = torch.tensor(c[3])[None]
        adapter = _Scripted(torch.tensor(c[0], dtype=torch.float32), emb)
        res = speculative_decode(adapter, [0], Sampling(top_k=top_k), _Fixed(x, q), rule, K + 1,
                                 torch.Generator().manual_seed(i), callback=lambda n, t: False, progress=False)
        assert res.stats["mean_accepted"] == m_ref, f"loop case {i}"
        assert torch.equal(res.tokens[0, 1 : 1 + m_ref], x[0, :m_ref])
        if m_ref < K:
            np.testing.assert_allclose(used[0][0].double().numpy(), dist_ref, atol=ATOL)
        else:
            assert not used
        monkeypatch.undo()


def test_the_loop_commits_the_reference_decisions(monkeypatch):
    _loop_agrees(monkeypatch, make_cases(31, with_q="mixed", top_k=32), StrictRule(),
                 lambda c, j: ref_strict(c[1][j], None if c[2] is None else c[2][j], c[3][j]), top_k=32)
    emb = np.random.default_rng(7).normal(size=(V, 8)) * 0.2
    emb32 = emb.astype(np.float32).astype(np.float64)
    _loop_agrees(monkeypatch, make_cases(32), GSDRule(),
                 lambda c, j: ref_gsd(c[0][j], c[1][j], None if c[2] is None else c[2][j], c[3][j], emb32),
                 emb=torch.tensor(emb, dtype=torch.float32))
    cb = np.random.default_rng(11).normal(size=(V, 4)).astype(np.float32)
    nbrs = latent_neighbours(torch.tensor(cb), 6)
    nearest = nbrs.numpy()
    _loop_agrees(monkeypatch, make_cases(33), LanternRule(nbrs, delta=0.2, k=5),
                 lambda c, j: ref_lantern(c[1][j], None if c[2] is None else c[2][j], c[3][j], nearest, 5, 0.2),
                 accept_on_equal=True)
