"""Tests of mmfast/metrics.py: digit splits and preprocessing, the shipped digit classifier, class consistency,
Fréchet distance (with its bootstrap interval and real-vs-real floor) and the token-marginal TV test.

The shipped checkpoint is loaded, never retrained (training is ~30 s: `python -m mmfast.train.digit_classifier`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfast import metrics as M
from mmfast.errors import InvalidInputError

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return M.digit_splits(0)


@pytest.fixture(scope="module")
def heldout(splits) -> tuple[torch.Tensor, np.ndarray]:
    X, y = splits["heldout"]
    return M.digits_to_images(X), y


@pytest.fixture(scope="module")
def gen_train(splits) -> tuple[torch.Tensor, np.ndarray]:
    X, y = splits["generator_train"]
    return M.digits_to_images(X), y


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------


def test_splits_disjoint_stratified_deterministic(splits):
    idx = M.digit_splits(0, indices=True)
    sets = [set(idx[k].tolist()) for k in M.SPLIT_NAMES]
    assert sum(len(s) for s in sets) == 1797 and len(set.union(*sets)) == 1797  # disjoint and complete
    assert [len(splits[k][1]) for k in M.SPLIT_NAMES] == [898, 450, 449]
    for k, frac in zip(M.SPLIT_NAMES, M.SPLIT_FRACTIONS):
        counts = np.bincount(splits[k][1], minlength=10)
        assert np.all(np.abs(counts - frac * 179.7) <= 3), (k, counts)  # every class in every split
    again = M.digit_splits(0)
    assert all(np.array_equal(again[k][0], splits[k][0]) for k in M.SPLIT_NAMES)
    other = M.digit_splits(1, indices=True)
    assert not np.array_equal(other["heldout"], idx["heldout"])
    assert splits["heldout"][0].shape[1:] == (8, 8) and splits["heldout"][0].max() == 16


def test_preprocessing_round_trip_through_pil(heldout):
    x, _ = heldout
    assert x.shape == (449, 1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(torch.round(x * 255) / 255, x)  # uint8 levels
    X = M.digit_splits(0)["heldout"][0][:20]
    pil = M.digits_to_pil(X)
    assert pil[0].mode == "RGB" and pil[0].size == (32, 32)
    assert torch.equal(M.images_to_tensor(pil), x[:20])  # generated-image path == real-image path, bit for bit
    assert torch.equal(M.images_to_tensor(M.digits_to_images(X, rgb=True)), x[:20])
    assert torch.equal(M.images_to_tensor((M.digits_to_images(X, rgb=True) * 255).round().to(torch.uint8)), x[:20])
    small = M.images_to_tensor(M.digits_to_pil(X, size=16))
    assert small.shape == (20, 1, 32, 32)
    assert torch.equal(small, M.images_to_tensor(M.digits_to_images(X, size=16)))


@pytest.mark.parametrize(
    "bad",
    [torch.rand(4, 2, 8, 8), torch.rand(4, 1, 8, 8) * 3, torch.full((2, 1, 8, 8), float("nan")), torch.zeros(0, 1, 8, 8),
     torch.zeros(2, 1, 8, 8, dtype=torch.int64), [], ["not an image"]],
)
def test_images_to_tensor_rejects_bad_input(bad):
    with pytest.raises(InvalidInputError):
        M.images_to_tensor(bad)


# --------------------------------------------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------------------------------------------


def test_shipped_classifier_accuracy_and_card(heldout):
    clf = M.load_digit_classifier()
    assert clf is M.load_digit_classifier()  # cached
    assert not clf.training
    x, y = heldout
    acc = float((M.predict_digits(x) == y).mean())
    assert acc >= 0.95
    assert M.classifier_accuracy() == acc
    cfg = json.loads((M.CLASSIFIER_DIR / "config.json").read_text())
    assert cfg["data"]["trained_on"] == "classifier_train" and abs(cfg["heldout_accuracy"] - acc) < 1e-9
    assert (M.CLASSIFIER_DIR / "model.safetensors").stat().st_size < 500_000
    assert M.digit_features(x[:5]).shape == (5, clf.num_features)


# --------------------------------------------------------------------------------------------------------------
# class consistency
# --------------------------------------------------------------------------------------------------------------


def test_class_consistency(heldout):
    x, y = heldout
    acc = M.classifier_accuracy()
    value, (lo, hi) = M.class_consistency_ci(x, y, n_boot=500)
    assert value == pytest.approx(acc) and lo <= value <= hi and hi - lo < 0.05
    assert M.class_consistency(x, torch.as_tensor(y)) == value
    shuffled = np.random.default_rng(0).permutation(y)
    v, (lo, hi) = M.class_consistency_ci(x, shuffled, n_boot=500)
    assert 0.05 < v < 0.2 and lo <= v <= hi
    assert M.class_consistency_ci(x, shuffled, n_boot=500, seed=3) == M.class_consistency_ci(x, shuffled, n_boot=500, seed=3)
    with pytest.raises(InvalidInputError):
        M.class_consistency(x, y[:-1])


# --------------------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------------------


def _with_moments(n: int, mu: np.ndarray, sd: np.ndarray, seed: int) -> np.ndarray:
    """n samples whose sample mean is exactly mu and sample covariance exactly diag(sd^2)."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(0)
    w, v = np.linalg.eigh(z.T @ z / (n - 1))
    z = z @ v @ np.diag(w**-0.5) @ v.T  # whitened: covariance exactly I
    return z * sd + mu


def test_frechet_distance_closed_form_and_numerics():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    sd_a, sd_b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    a, b = _with_moments(200, mu_a, sd_a, 1), _with_moments(300, mu_b, sd_b, 2)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((sd_a - sd_b) ** 2)  # commuting covariances
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # invariant under a common rotation (non-diagonal covariances)
    assert M.frechet_distance(a @ q, b @ q) == pytest.approx(expected, rel=1e-9)
    assert M.frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)
    assert M.frechet_distance(torch.as_tensor(a), torch.as_tensor(b)) == pytest.approx(expected, rel=1e-9)
    # fewer samples than dimensions: singular covariances, still finite, >= 0 and ~0 against itself
    few = rng.normal(size=(10, 64))
    assert M.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-8)
    assert np.isfinite(M.frechet_distance(few, rng.normal(size=(12, 64))))


def test_frechet_matches_torchmetrics(heldout, gen_train):
    pytest.importorskip("torchmetrics")
    (xh, _), (xg, _) = heldout, gen_train
    fid = M.fid_metric()
    fid.update(xh[:250].expand(-1, 3, -1, -1), real=True)
    fid.update(xg[:250], real=False)
    ours = M.frechet_distance(M.digit_features(xh[:250]), M.digit_features(xg[:250]))
    assert float(fid.compute()) == pytest.approx(ours, rel=1e-4)


def _blur(x: torch.Tensor, times: int) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16)[None, None]
    for _ in range(times):
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
    return x


def test_frechet_self_zero_and_grows_with_corruption(heldout, gen_train):
    (xh, _), (xg, yg) = heldout, gen_train
    xg, yg = xg[:450], yg[:450]  # one size for all sets: FD depends on it
    fh = M.digit_features(xh)
    assert M.frechet_distance(fh, fh) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    clean, _ = M.digit_frechet(xg, n_boot=0)
    noise = [M.digit_frechet((xg + s * torch.randn(xg.shape, generator=g)).clamp(0, 1), n_boot=0)[0] for s in (0.1, 0.3)]
    blur = [M.digit_frechet(_blur(xg, t), n_boot=0)[0] for t in (1, 3)]
    wrong = M.digit_frechet(torch.cat([xg[torch.from_numpy(yg < 5)]] * 2)[:450], n_boot=0)[0]  # half the classes
    assert clean < noise[0] < noise[1]
    assert clean < blur[0] < blur[1]
    assert wrong > 10 * clean


def test_real_vs_real_floor_and_interval(gen_train):
    xg, _ = gen_train
    value, (lo, hi) = M.frechet_floor(n_boot=100)
    assert lo <= value <= hi and lo >= 0
    assert (value, (lo, hi)) == M.digit_frechet(xg, n_boot=100)  # the floor is the real generator_train set
    noise = torch.rand(xg.shape, generator=torch.Generator().manual_seed(0))
    v_noise, (lo_noise, _) = M.digit_frechet(noise, n_boot=100)
    assert hi < 0.05 * lo_noise
    # FD is biased upwards for smaller sets (so the floor must be computed at the generated set's size); 16x16
    # images go through the same path as the reference rendered at 16x16 and stay near the floor
    v_small, _ = M.frechet_floor(n=300, size=16, n_boot=0)
    assert value < v_small < 0.05 * v_noise


# --------------------------------------------------------------------------------------------------------------
# token-marginal TV
# --------------------------------------------------------------------------------------------------------------


def _sample_tokens(probs: np.ndarray, n: int, seed: int) -> np.ndarray:
    """probs (L, V) -> n sequences (n, L) with independent positions."""
    rng = np.random.default_rng(seed)
    cdf = probs.cumsum(1)
    u = rng.random((n, probs.shape[0], 1))
    return np.minimum((u > cdf[None]).sum(-1), probs.shape[1] - 1)


def test_token_tv():
    vocab, L = 16, 12
    probs = np.random.default_rng(0).dirichlet(np.ones(vocab), size=L)
    a, b = _sample_tokens(probs, 400, 1), _sample_tokens(probs, 500, 2)
    tv, per = M.token_marginal_tv(a, a, vocab)
    assert tv == 0.0 and per.shape == (L,) and np.all(per == 0)
    tv_ab, per_ab = M.token_marginal_tv(a, b, vocab)
    assert tv_ab > 0 and per_ab.shape == (L,) and tv_ab == pytest.approx(per_ab.mean())
    same = M.token_tv_test(a, b, vocab, n_perm=200, seed=0)
    assert same.tv == tv_ab and same.p_value > 0.05
    assert 0 < same.floor < same.floor_hi and same.tv < 1.5 * same.floor  # finite-sample TV is not 0
    shifted = 0.8 * probs + 0.2 * np.roll(probs, 1, axis=1)  # a small, systematic change of every position
    c = _sample_tokens(shifted, 500, 3)
    diff = M.token_tv_test(a, c, vocab, n_perm=200, seed=0)
    assert diff.p_value < 0.01 and diff.tv > diff.floor_hi
    assert M.token_tv_test(a, c, vocab, n_perm=200, seed=0).p_value == diff.p_value  # deterministic
    m = M.token_marginals(torch.as_tensor(a), vocab)
    assert m.shape == (L, vocab) and np.allclose(m.sum(1), 1.0)


@pytest.mark.parametrize("bad", [np.array([[0, 16]]), np.array([[-1, 0]]), np.zeros((2, 3, 4), int), np.zeros((2, 2))])
def test_token_tv_rejects_bad_tokens(bad):
    with pytest.raises(InvalidInputError):
        M.token_marginal_tv(bad, bad, 16)
