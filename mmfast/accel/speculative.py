"""The one speculative decoding loop shared by SJD, LANTERN, GSD and drafter-based speculative decoding.

Each step feeds a window of L positions — the last committed token plus L-1 drafts — in ONE forward and
verifies the drafts left to right against the processed target distribution ``p`` (the same
:meth:`ARGenAdapter.target_probs` the baseline samples from). A draft ``x`` with proposal distribution ``q``
is accepted with probability ``rule.accept_probs(p, q, x)`` (``min(1, p(x)/q(x))`` for exact speculative
sampling); at the first rejection a token is drawn from ``rule.residual(p, q, x)`` (``norm(max(0, p - q))``);
if every draft passes, a bonus token is drawn from the last row. So each forward commits (accepted + 1)
tokens, and the KV cache is truncated back to the committed length.

Drafts come from a :class:`Drafter`; ``q=None`` means a point mass on the draft (deterministic or freshly
initialised drafts), which keeps speculative sampling exact whatever produced the token.

Batch policy (as the SJD reference): every row commits ``m + 1`` tokens with ``m`` the smallest number of
accepted drafts over the rows. A row that accepted more keeps its accepted draft in the last committed slot
(an exact sample too); rows rejected there take their residual sample. All rows keep one cache length.

Kernel: when the ``spec_verify`` kernel is selected (``MMFAST_KERNEL_IMPL=triton``, or CUDA once
``GPU_VERIFIED["spec_verify"]``; see :func:`_kernel_verify`), the accept test, the first rejection and — for a
rule whose residual is the strict ``norm(max(0, p~ - q))`` on ``p`` (SJD, GSD) — the residual / bonus draw run in
one launch. The accept test reads the same uniforms; the draw takes one uniform through the inverse CDF where the
torch path calls ``torch.multinomial``, so sampled runs follow another random stream after the first draw (greedy
runs and LANTERN's torch residual keep the stream, token for token). Otherwise the torch path runs as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from mmfast.decoding import DecodeResult, sample
from mmfast.kernels import GPU_VERIFIED, use_triton
from mmfast.kernels.spec_verify import spec_verify
from mmfast.models.argen import ARGenAdapter, Sampling


# --------------------------------------------------------------------------------------------------
# acceptance rules
# --------------------------------------------------------------------------------------------------
def _point_mass(x: torch.Tensor, v: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(x, v).float()


def _normalise(w: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Rows of ``w`` (..., V) normalised; rows with no mass (p == q exactly) fall back to ``fallback``."""
    s = w.sum(-1, keepdim=True)
    return torch.where(s > 1e-12, w / s.clamp_min(1e-30), fallback)


class StrictRule:
    """Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept min(1, p(x)/q(x))."""

    name = "strict"

    def target(self, p: torch.Tensor, x: torch.Tensor, adapter: ARGenAdapter) -> torch.Tensor:
        """The distribution the draft is verified against (``p`` itself; relaxed rules override)."""
        return p

    def accept_probs(self, p: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor, adapter: ARGenAdapter) -> torch.Tensor:
        """p, q: (B, K, V) (q None = point mass on x); x: (B, K) drafts → (B, K) acceptance probabilities."""
        pt = self.target(p, x, adapter)
        px = pt.gather(-1, x[..., None]).squeeze(-1)
        if q is None:
            return px.clamp(max=1.0)
        qx = q.gather(-1, x[..., None]).squeeze(-1)
        return torch.where(qx > 0, (px / qx.clamp_min(1e-30)).clamp(max=1.0), torch.ones_like(px))

    def residual(self, p: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor, adapter: ARGenAdapter) -> torch.Tensor:
        """p, q: (B, V); x: (B,) → (B, V) the distribution to sample after rejecting x: norm(max(0, p~ - q))."""
        pt = self.target(p[:, None], x[:, None], adapter)[:, 0]
        qq = _point_mass(x, p.shape[-1]) if q is None else q
        return _normalise((pt - qq).clamp_min(0), pt)


# --------------------------------------------------------------------------------------------------
# drafters
# --------------------------------------------------------------------------------------------------
class Drafter:
    """Proposes drafts for the window. ``propose`` returns tokens (B, K) and q (B, K, V) or None (point mass)."""

    def reset(self, adapter: ARGenAdapter, batch: int, sampling: Sampling, generator: torch.Generator | None) -> None:
        self.adapter, self.batch, self.sampling, self.generator = adapter, batch, sampling, generator

    def propose(self, tokens: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts for positions n..n+k-1 given the committed ``tokens[:, :n]``."""
        raise NotImplementedError  # pragma: no cover

    def observe(self, p: torch.Tensor, samples: torch.Tensor, n: int, m: int) -> None:
        """After a step that verified positions n..n+L-1 with targets ``p`` (B, L, V) and committed m + 1 tokens;
        ``samples`` (B, L) are independent draws from every ``p[:, j]`` (Jacobi drafters keep the tail)."""

    def commit_probs(self, p: torch.Tensor, n: int) -> None:
        """Target distributions (B, j, V) of newly committed positions n..n+j-1 (for sample-init schemes)."""

    def close(self) -> None:
        """Release hooks / buffers (called when decoding ends, also on error)."""


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def speculative_decode(
    adapter: ARGenAdapter,
    conditions: list[Any],
    sampling: Sampling,
    drafter: Drafter,
    rule: StrictRule,
    window: int = 16,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor], bool | None] | None = None,
    progress: bool | dict[str, Any] = True,
    stats_hook: Callable[[dict[str, Any]], None] | None = None,
) -> DecodeResult:
    """Decode ``adapter.num_tokens`` tokens per condition, ``window`` positions verified per forward."""
    try:
        return _speculative_decode(adapter, conditions, sampling, drafter, rule, window, generator, callback, progress, stats_hook)
    finally:
        drafter.close()


def _speculative_decode(
    adapter: ARGenAdapter,
    conditions: list[Any],
    sampling: Sampling,
    drafter: Drafter,
    rule: StrictRule,
    window: int,
    generator: torch.Generator | None,
    callback: Callable[[int, torch.Tensor], bool | None] | None,
    progress: bool | dict[str, Any],
    stats_hook: Callable[[dict[str, Any]], None] | None,
) -> DecodeResult:
    t0 = time.perf_counter()
    session = adapter.session(conditions, sampling)
    big_n, b = adapter.num_tokens, session.batch
    out = torch.zeros(b, big_n, dtype=torch.long)
    p0 = adapter.target_probs(session.prefill()[:, -1], sampling)  # (B, V) for position 0
    out[:, 0] = _draw(p0, sampling, generator)
    drafter.reset(adapter, b, sampling, generator)
    drafter.commit_probs(p0[:, None], 0)
    n, steps, accepted_hist = 1, 1, []
    bar = tqdm(total=big_n, desc="decoding", leave=False, **(progress if isinstance(progress, dict) else {"disable": not progress}))
    bar.update(1)
    while n < big_n:
        length = min(window, big_n - n)  # x_last + (length - 1) drafts; the bonus lands at most on the last position
        drafts, q = drafter.propose(out, n, length - 1)
        feed = torch.cat([out[:, n - 1 : n], drafts], dim=1)
        raw = session.forward(feed, torch.arange(n - 1, n - 1 + length))
        steps += 1
        probs = adapter.target_probs(raw, sampling)
        p = probs.cpu()  # (B, L, V): p[:, j] is the target at position n + j
        k = length - 1
        if k > 0 and use_triton(probs, verified=GPU_VERIFIED["spec_verify"]):
            m, last = _kernel_verify(rule, adapter, probs, p, q, drafts, sampling, generator)
        else:
            if k > 0:
                ok = torch.rand(b, k, generator=generator) < rule.accept_probs(p[:, :k], q, drafts, adapter)
                acc = torch.where(ok.all(1), torch.full((b,), k), (~ok).float().argmax(1))  # accepted drafts per row
            else:
                acc = torch.zeros(b, dtype=torch.long)
            m = int(acc.min())
            slot = drafts[:, m] if m < k else None  # the draft at the last committed slot (rows that accepted it)
            if m < k:
                res = rule.residual(p[:, m], None if q is None else q[:, m], slot, adapter)
                last = torch.where(acc > m, slot, _draw(res, sampling, generator))
            else:
                last = _draw(p[:, k], sampling, generator)  # every draft accepted: bonus token
        out[:, n : n + m] = drafts[:, :m]
        out[:, n + m] = last
        drafter.commit_probs(p[:, : m + 1], n)
        samples = torch.stack([_draw(p[:, j], sampling, generator) for j in range(length)], dim=1)
        drafter.observe(p, samples, n, m)
        session.truncate(n + m)  # cache: image tokens 0..n+m-1 (x_last and the m accepted drafts are valid)
        accepted_hist.append(m)
        n += m + 1
        bar.update(m + 1)
        if callback is not None and callback(n - 1, out[:, :n]) is False:
            out = out[:, :n]
            break
    bar.close()
    stats = {
        "steps": steps,
        "tokens": int(out.shape[1]),
        "wall_ms": (time.perf_counter() - t0) * 1e3,
        "mean_accepted": sum(accepted_hist) / max(len(accepted_hist), 1),
    }
    if stats_hook is not None:
        stats_hook(stats)
    return DecodeResult(tokens=out, steps=steps, stats=stats)


def _kernel_verify(
    rule: StrictRule,
    adapter: ARGenAdapter,
    probs: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor | None,
    drafts: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator | None,
) -> tuple[int, torch.Tensor]:
    """One verify step with the ``spec_verify`` kernel on ``probs``' device (``p``: the same, on the CPU); returns
    what the torch path does: ``m`` and the (B,) tokens of the last committed slot.

    The rule's acceptance probabilities (``min(1, p~(x) / q(x))`` with LANTERN's relaxed target, ``min(1, p(G) /
    q(G))`` with GSD's group masses, and any rule's own edge cases) are computed as in the torch path and passed as
    ``px`` with ``qx = 1``, so the kernel's test ``u < px`` takes the same decisions on the same uniforms. A rule
    whose residual is the strict one on ``p`` (``target`` / ``residual`` not overridden: SJD, GSD) also gets its
    residual / bonus token from the kernel, drawn with one more uniform (none under greedy decoding); LANTERN's
    residual is drawn in torch as before.
    """
    b, k = drafts.shape
    u = torch.rand(b, k, generator=generator)  # the torch path's uniforms, in the same order
    px = rule.accept_probs(p[:, :k], q, drafts, adapter)
    strict = type(rule).residual is StrictRule.residual and type(rule).target is StrictRule.target
    draw = strict and not sampling.greedy
    u_draw = torch.rand(b, generator=generator) if draw else torch.zeros(b)
    dev = probs.device
    verdict = spec_verify(
        probs, drafts.to(dev), u.to(dev), u_draw.to(dev), None if q is None else q.to(dev),
        px=px.to(dev), qx=torch.ones_like(px, device=dev), greedy=not draw,
    )  # fmt: skip
    acc = verdict.accepted.cpu()
    m = int(acc.min())
    slot = drafts[:, m] if m < k else None
    if strict:  # the kernel's draw: residual at each row's first rejection, bonus from p[:, k] if none
        drawn = verdict.token.cpu()
    elif m < k:
        drawn = _draw(rule.residual(p[:, m], None if q is None else q[:, m], slot, adapter), sampling, generator)
    else:
        drawn = _draw(p[:, k], sampling, generator)
    return m, drawn if m == k else torch.where(acc > m, slot, drawn)


def _draw(probs: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    return probs.argmax(-1) if sampling.greedy else sample(probs, generator)
