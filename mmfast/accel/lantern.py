"""LANTERN: relaxed speculative acceptance over latent-space neighbours (and LANTERN++).

Jang et al., "LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative Decoding", ICLR 2025,
arXiv 2410.03355; Park et al., "LANTERN++", arXiv 2502.06352.

Visual AR models spread probability over many interchangeable tokens ("token selection ambiguity"), so strict
speculative decoding rejects good drafts. LANTERN verifies a draft ``x`` against a relaxed target
``p~ = A_{k,delta}(x)``: with ``n_1..n_k`` the k nearest neighbours of ``x`` in the VQ codebook (Euclidean
distance between the raw codebook vectors, as the reference computes them, precomputed once per model) and
``c_j = p(n_1) + ... + p(n_j)``, take the largest ``j* <= k`` with ``c_j* <= delta`` and move that mass onto ``x``:
``p~(x) = p(x) + c_j*``, ``p~(n_i) = 0`` for ``i <= j*``. Moving mass m changes the distribution by exactly
``TV(p, p~) = m <= delta`` (the paper's bound; asserted in tests). Acceptance is ``min(1, p~(x) / q(x))``
(``p~(x)`` for a point-mass draft). LANTERN++ replaces the budget by ``c_j* <= (lam - 1) p(x)`` so that
``p~(x) <= lam p(x)`` (static-tree variant; defaults from the reference scripts: k=10, lam=5).

What a rejection resamples (``residual=``):

* ``"reference"`` (default): the reference's decisions (jadohu/LANTERN, ``evaluate_posterior`` and
  ``evaluate_posterior_v1``), which resample from the ORIGINAL target ``p``, not from ``p~``. A point-mass draft
  (``q`` = one-hot, the EAGLE-2 dynamic-tree path: Jacobi random init, repeat init) zeroes ``p`` at ``x`` and, when
  any neighbour was absorbed (``j* >= 1``), at the first ``k + 1`` neighbours ``n_1..n_{k+1}`` of ``x`` (absorbed
  or not), then renormalises. A draft with a proposal distribution ``q`` (the EAGLE-1 path: carried-over Jacobi
  drafts, a trained drafter) zeroes ``q`` at those ``k + 1`` neighbours (without renormalising it) and takes
  ``norm(max(0, p - q))``. A residual with no mass left becomes uniform over the codebook, as in the reference; a
  draft with ``q(x) = 0`` is never accepted and the target ``p`` itself is sampled (the reference skips its test).
  This removes the unabsorbed neighbours ``n_{j*+1}..n_{k+1}`` too, so the committed token's distribution can be
  further than ``delta`` from ``p`` (up to the mass of x's k+1 neighbours): ``max_tv`` reports ``TV(p, p~)`` of
  the acceptance target only. Zero-mass neighbours count as absorbed (the reference tests ``j* >= 1``, not a
  moved mass), so even ``delta=0`` is not lossless under top-k: a rejected draft whose nearest neighbour has no
  mass removes its k+1 neighbours from the residual (and a one-hot target may leave only the uniform fallback).
* ``"relaxed"``: ``norm(max(0, p~ - q))``, speculative sampling against ``p~`` itself (x and its absorbed
  neighbours excluded). For a point-mass draft a step then commits a token distributed exactly as
  ``p~ = A_{k,delta}(x)``, so the per-step bound ``TV <= delta`` holds for what is committed (the paper's
  guarantee); with ``delta=0`` it is exact speculative sampling. With a proposal ``q`` the relaxed target depends
  on the draft, and neither residual gives a distribution with a stated bound.

Under greedy decoding (``temperature=0``) both residuals reduce to the target's argmax: mmfast's greedy target is
one-hot, so a draft is accepted only if it is the argmax (a neighbour with all the mass is never absorbed for
``delta < 1``) and the argmax is taken after a rejection, i.e. greedy LANTERN reproduces the greedy baseline (the
reference's greedy path, an argmax over the relaxed softmax, is not reproduced).

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


RESIDUALS = ("reference", "relaxed")


class LanternRule(StrictRule):
    """Speculative acceptance against the relaxed target A_{k,delta}(x); the residual as the reference or as p~.

    ``neighbours`` (V, >= k) lists each code's nearest codes, nearest first; the first ``k`` (default: every column)
    are the relaxation's candidates, and the reference residual zeroes the first ``k + 1`` (as many as there are).
    """

    name = "lantern"

    def __init__(self, neighbours: torch.Tensor, delta: float | None = 0.1, lam: float | None = None,
                 k: int | None = None, residual: str = "reference"):
        if residual not in RESIDUALS:
            raise ConfigError(f"lantern: residual must be one of {', '.join(RESIDUALS)}, got {residual!r}.")
        self.neighbours, self.delta, self.lam, self.residual_mode = neighbours, delta, lam, residual
        self.k = neighbours.shape[1] if k is None else min(k, neighbours.shape[1])
        self.greedy = False  # set by Lantern.decode: a one-hot target, the argmax after a rejection
        self.max_tv = 0.0  # largest TV(p, p~) used so far (checked against delta in tests)

    def relax(self, p: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """p (..., V), x (...) → neighbours (..., k), absorbed (..., k) bool (a prefix), moved mass c_j* (..., 1)
        (0 if none) and whether any neighbour was absorbed (..., 1) (the reference's ``j* >= 1``)."""
        nb = self.neighbours.to(x.device)[x][..., : self.k]
        cum = p.gather(-1, nb).cumsum(-1)
        px = p.gather(-1, x[..., None])
        budget = torch.full_like(px, self.delta) if self.lam is None else (self.lam - 1) * px
        take = cum <= budget  # a prefix of the neighbour list, since cum is non-decreasing
        j = take.sum(-1, keepdim=True)
        moved = torch.where(j > 0, cum.gather(-1, (j - 1).clamp_min(0)), torch.zeros_like(px))
        return nb, take, moved, j > 0

    def target(self, p: torch.Tensor, x: torch.Tensor, adapter: ARGenAdapter) -> torch.Tensor:
        """p (B, K, V), drafts x (B, K) → relaxed targets p~ (B, K, V)."""
        nb, take, moved, _ = self.relax(p, x)
        relaxed = p.scatter(-1, nb, p.gather(-1, nb) * ~take).scatter_add(-1, x[..., None], moved)
        if moved.numel():
            self.max_tv = max(self.max_tv, float(moved.max()))
        return relaxed

    def accept_probs(self, p, q, x, adapter: ARGenAdapter) -> torch.Tensor:  # type: ignore[override]
        acc = super().accept_probs(p, q, x, adapter)
        if q is None or self.residual_mode != "reference":
            return acc
        return acc.masked_fill(q.gather(-1, x[..., None]).squeeze(-1) <= 0, 0.0)  # the reference skips such drafts

    def residual(self, p, q, x, adapter: ARGenAdapter) -> torch.Tensor:  # type: ignore[override]
        """p, q: (B, V); x: (B,) → (B, V) the distribution sampled after rejecting x (see the module docstring)."""
        if self.residual_mode == "relaxed":
            return super().residual(p, q, x, adapter)
        if self.greedy:
            return p
        v = p.shape[-1]
        _, _, _, absorbed = self.relax(p, x)  # (B, 1)
        zero_nb = self.neighbours.to(x.device)[x][:, : self.k + 1]  # n_1..n_{k+1}
        point = p.scatter(-1, x[:, None], 0.0)
        point = point.scatter(-1, zero_nb, point.gather(-1, zero_nb) * ~absorbed)
        res = point
        if q is not None:
            qx = q.gather(-1, x[:, None])
            drafted = (p - q.scatter(-1, zero_nb, q.gather(-1, zero_nb) * ~absorbed)).clamp_min(0)
            res = torch.where(qx >= 1, point, drafted)  # a one-hot proposal is a point-mass draft
            res = torch.where(qx <= 0, p, res)
        total = res.sum(-1, keepdim=True)  # the reference renormalises any mass left, uniform if none
        return torch.where(total > 0, res / total.clamp_min(1e-30), torch.full_like(res, 1.0 / v))


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
    residual: str = "reference"  # after a rejection: "reference" (resample p, as jadohu/LANTERN) or "relaxed" (p~)

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
        if self.residual not in RESIDUALS:
            raise ConfigError(f"lantern: residual must be one of {', '.join(RESIDUALS)}, got {self.residual!r}.")

    def neighbour_count(self, adapter: ARGenAdapter) -> int:
        """``k``, or the paper's 1000-of-16384 share of this adapter's codebook."""
        if self.k is not None:
            return self.k
        return default_k(adapter.codebook_embeddings().shape[0])

    def rule(self, adapter: ARGenAdapter) -> LanternRule:
        k = self.neighbour_count(adapter)  # k + 1 neighbours listed: the reference residual zeroes n_1..n_{k+1}
        delta = None if self.lam is not None else self.delta
        return LanternRule(neighbours_for(adapter, k + 1), delta, self.lam, k=k, residual=self.residual)

    def decode(self, adapter, conditions, sampling, generator, callback=None, progress=True):  # type: ignore[override]
        if self.drafter is not None:
            from mmfast.accel.eagle import load_drafter

            drafter = load_drafter(self.drafter, adapter)
        else:
            drafter = JacobiDrafter(self.init)
        rule = self.rule(adapter)
        rule.greedy = sampling.greedy
        res = speculative_decode(adapter, conditions, sampling, drafter, rule, self.window, generator, callback, progress)
        res.stats["max_tv"] = rule.max_tv
        return res
