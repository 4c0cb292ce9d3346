"""LANTERN: relaxed speculative acceptance over latent-space neighbours (and LANTERN++).

Jang et al., "LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative Decoding", ICLR 2025,
arXiv 2410.03355; Park et al., "LANTERN++", arXiv 2502.06352.

Visual AR models spread probability over many interchangeable tokens ("token selection ambiguity"), so strict
speculative decoding rejects good drafts. LANTERN verifies a draft ``x`` against a relaxed target
``p~ = A_{k,delta}(x)``: with ``n_1..n_k`` the k nearest neighbours of ``x`` in the VQ codebook (Euclidean
distance between the raw codebook vectors, as the reference computes them, precomputed once per model) and
``c_j = p(n_1) + ... + p(n_j)``, take the largest ``j* <= k`` with ``c_j* <= delta`` and move that mass onto ``x``:
``p~(x) = p(x) + c_j*``, ``p~(n_i) = 0`` for ``i <= j*``. Moving mass m changes the distribution by exactly
``TV(p, p~) = m <= delta`` (the paper's bound; asserted in tests). Acceptance is ``min(1, p~(x) / q(x))`` and the
residual after a rejection is ``norm(max(0, p~ - q))``, i.e. ``x`` and its absorbed neighbours are excluded, as
the reference zeroes them before resampling. LANTERN++ replaces the budget by ``c_j* <= (lam - 1) p(x)`` so that
``p~(x) <= lam p(x)`` (static-tree variant; defaults from the reference scripts: k=10, lam=5).

Defaults: ``delta=0.1`` and ``k`` = 1000 / 16384 of the codebook (the paper's k=1000 on LlamaGen's 16384 codes,
about 6%), i.e. 1000 on LlamaGen, 31 on tiny-ar's 512 codes: a fixed k=1000 on a 512-code book would make every
code a neighbour (docs/methods/lantern.md has the rows). Drafts: Jacobi drafts (``sjd``'s drafter, random init) or, with
``drafter=<dir>``, a trained EAGLE-style draft head (see :mod:`mmfast.accel.eagle`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmfast.accel.base import DecodeAccelerator, register
from mmfast.accel.sjd import INIT_SCHEMES, JacobiDrafter, _check_window
from mmfast.accel.speculative import StrictRule, speculative_decode
from mmfast.errors import ConfigError
from mmfast.models.argen import ARGenAdapter


def latent_neighbours(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """(V, D) codebook → (V, k) indices of each entry's k nearest other entries (Euclidean), nearest first."""
    v = codebook.shape[0]
    k = min(k, v - 1)
    out = torch.empty(v, k, dtype=torch.long)
    cb = codebook.float()
    for s in range(0, v, 1024):  # blockwise: V x V distances never held at once for big codebooks
        d = torch.cdist(cb[s : s + 1024], cb)
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")  # not its own neighbour
        out[s : s + 1024] = d.topk(k, dim=-1, largest=False).indices
    return out


class LanternRule(StrictRule):
    """Strict speculative sampling against the relaxed target A_{k,delta}(x)."""

    name = "lantern"

    def __init__(self, neighbours: torch.Tensor, delta: float | None = 0.1, lam: float | None = None):
        self.neighbours, self.delta, self.lam = neighbours, delta, lam
        self.max_tv = 0.0  # largest TV(p, p~) used so far (checked against delta in tests)

    def target(self, p: torch.Tensor, x: torch.Tensor, adapter: ARGenAdapter) -> torch.Tensor:
        """p (B, K, V), drafts x (B, K) → relaxed targets p~ (B, K, V)."""
        nb = self.neighbours.to(x.device)[x]  # (B, K, k)
        pn = p.gather(-1, nb)
        cum = pn.cumsum(-1)
        px = p.gather(-1, x[..., None])
        budget = torch.full_like(px, self.delta) if self.lam is None else (self.lam - 1) * px
        take = cum <= budget  # a prefix of the neighbour list, since cum is non-decreasing
        moved = (pn * take).sum(-1, keepdim=True)
        relaxed = p.scatter(-1, nb, pn * ~take).scatter_add(-1, x[..., None], moved)
        if moved.numel():
            self.max_tv = max(self.max_tv, float(moved.max()))
        return relaxed


PAPER_K, PAPER_CODEBOOK = 1000, 16384  # LANTERN's k on LlamaGen's VQ codebook


def default_k(codebook_size: int) -> int:
    """The paper's k scaled to a codebook of ``codebook_size`` codes (at least 1)."""
    return max(1, round(codebook_size * PAPER_K / PAPER_CODEBOOK))


def neighbours_for(adapter: ARGenAdapter, k: int) -> torch.Tensor:
    """Latent neighbours of the adapter's codebook, computed once per (model, k)."""
    cache = adapter.__dict__.setdefault("_lantern_neighbours", {})
    if k not in cache:
        cache[k] = latent_neighbours(adapter.codebook_embeddings().detach().cpu(), k)
    return cache[k]


@register
@dataclass
class Lantern(DecodeAccelerator):
    """LANTERN relaxed acceptance (``delta``) or LANTERN++ (``lam``) on Jacobi drafts or a trained drafter."""

    name = "lantern"
    k: int | None = None  # None: the paper's k=1000 scaled to the codebook, round(V * 1000 / 16384)
    delta: float = 0.1
    lam: float | None = None
    window: int = 16
    init: str = "random"
    drafter: str | None = None  # directory of a trained draft head (EAGLE-style); None = Jacobi drafts

    def validate(self) -> None:
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ConfigError(f"lantern: k must be an integer >= 1, got {self.k!r}.")
        if not isinstance(self.delta, (int, float)) or not 0 <= self.delta <= 1:
            raise ConfigError(f"lantern: delta must be in [0, 1], got {self.delta!r}.")
        if self.lam is not None and (not isinstance(self.lam, (int, float)) or self.lam < 1):
            raise ConfigError(f"lantern: lam (LANTERN++) must be >= 1, got {self.lam!r}.")
        _check_window("lantern", self.window)
        if self.init not in INIT_SCHEMES:
            raise ConfigError(f"lantern: init must be one of {', '.join(INIT_SCHEMES)}, got {self.init!r}.")

    def neighbour_count(self, adapter: ARGenAdapter) -> int:
        """``k``, or the paper's 1000-of-16384 share of this adapter's codebook."""
        if self.k is not None:
            return self.k
        return default_k(adapter.codebook_embeddings().shape[0])

    def rule(self, adapter: ARGenAdapter) -> LanternRule:
        k = self.neighbour_count(adapter)
        return LanternRule(neighbours_for(adapter, k), None if self.lam is not None else self.delta, self.lam)

    def decode(self, adapter, conditions, sampling, generator, callback=None, progress=True):  # type: ignore[override]
        if self.drafter is not None:
            from mmfast.accel.eagle import load_drafter

            drafter = load_drafter(self.drafter, adapter)
        else:
            drafter = JacobiDrafter(self.init)
        rule = self.rule(adapter)
        res = speculative_decode(adapter, conditions, sampling, drafter, rule, self.window, generator, callback, progress)
        res.stats["max_tv"] = rule.max_tv
        return res
