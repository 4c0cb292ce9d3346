"""Token-space distribution check: per-position marginal TV between two sets of VQ token sequences, with a
permutation null (see :mod:`mmfast.metrics`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from mmfast.errors import InvalidInputError

# ----------------------------------------------------------------------------------------------------------------
# token-space distribution check
# ----------------------------------------------------------------------------------------------------------------


class TVTestResult(NamedTuple):
    """Outcome of :func:`token_tv_test`."""

    tv: float  #: observed mean per-position TV
    p_value: float  #: permutation p-value, (1 + #{null >= tv}) / (1 + n_perm)
    floor: float  #: mean TV of the permutation null: expected TV of two same-distribution sets of these sizes
    floor_hi: float  #: 95th percentile of the null
    per_position: np.ndarray  #: observed TV per position (L,)


def _as_tokens(t: np.ndarray | torch.Tensor, vocab: int) -> np.ndarray:
    a = np.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t)
    if a.ndim != 2 or a.shape[0] == 0:
        raise InvalidInputError(f"Tokens must be (N >= 1, L), got {a.shape}.")
    if not np.issubdtype(a.dtype, np.integer):
        raise InvalidInputError(f"Tokens must be integers, got {a.dtype}.")
    if a.min() < 0 or a.max() >= vocab:
        raise InvalidInputError(f"Token ids must be in [0, {vocab}), got [{a.min()}, {a.max()}].")
    return a.astype(np.int64)


def _marginals(a: np.ndarray, vocab: int) -> np.ndarray:
    n, L = a.shape
    flat = (np.arange(L) * vocab)[None, :] + a
    return np.bincount(flat.ravel(), minlength=L * vocab).reshape(L, vocab) / n


def token_marginals(tokens: np.ndarray | torch.Tensor, vocab: int) -> np.ndarray:
    """Token sequences ``(N, L)`` -> per-position empirical distributions ``(L, vocab)`` (rows sum to 1)."""
    return _marginals(_as_tokens(tokens, vocab), vocab)


def token_marginal_tv(tokens_a: np.ndarray | torch.Tensor, tokens_b: np.ndarray | torch.Tensor,
                      vocab: int) -> tuple[float, np.ndarray]:
    """Mean over positions of TV between per-position token marginals of ``(N, L)`` and ``(M, L)``.

    Returns ``(mean TV, per-position TV (L,))``. Biased upwards for finite sets: see :func:`token_tv_test`.
    """
    a, b = _as_tokens(tokens_a, vocab), _as_tokens(tokens_b, vocab)
    if a.shape[1] != b.shape[1]:
        raise InvalidInputError(f"Sequence lengths differ: {a.shape[1]} vs {b.shape[1]}.")
    per = 0.5 * np.abs(_marginals(a, vocab) - _marginals(b, vocab)).sum(1)
    return float(per.mean()), per


def token_tv_test(tokens_a: np.ndarray | torch.Tensor, tokens_b: np.ndarray | torch.Tensor, vocab: int,
                  n_perm: int = 200, seed: int = 0) -> TVTestResult:
    """Permutation test of "same distribution" on per-position marginal TV.

    The pooled ``N + M`` sequences are re-split at random ``n_perm`` times into sets of sizes N and M (whole
    sequences move, so within-sequence dependence is kept); the null TVs give the p-value and the noise floor.
    """
    a, b = _as_tokens(tokens_a, vocab), _as_tokens(tokens_b, vocab)
    tv, per = token_marginal_tv(a, b, vocab)
    pooled = np.concatenate([a, b])
    n, L = a.shape
    flat = (np.arange(L) * vocab)[None, :] + pooled
    counts_all = np.bincount(flat.ravel(), minlength=L * vocab)
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    for i in range(n_perm):
        sel = rng.permutation(len(pooled))[:n]
        ca = np.bincount(flat[sel].ravel(), minlength=L * vocab)
        # the second set's counts are the pooled counts minus the first set's
        diff = ca / n - (counts_all - ca) / (len(pooled) - n)
        null[i] = 0.5 * np.abs(diff).sum() / L
    p = (1.0 + float((null >= tv - 1e-12).sum())) / (1.0 + n_perm)
    floor = float(null.mean()) if n_perm else float("nan")
    floor_hi = float(np.quantile(null, 0.95)) if n_perm else float("nan")
    return TVTestResult(tv, p, floor, floor_hi, per)


