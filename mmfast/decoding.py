"""The baseline AR image decoding loops, reproducible by seed: one token per forward (:func:`ar_decode`) and
one scale per forward for next-scale models (:func:`scale_decode`, VAR).

Accelerated decoders (SJD, LANTERN, GSD) replace :func:`ar_decode` through the decode stage; they share
:meth:`ARGenAdapter.target_probs`, so baseline and accelerated runs sample from the same distribution. CoDe runs
:func:`scale_decode` twice: a drafter up to a scale, a refiner from its draft.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from mmfast.models.argen import ARGenAdapter, Sampling, cfg_combine


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # (B, N) image token ids
    steps: int  # model forwards after the prefill (+1 for the prefill itself)
    stats: dict[str, Any] = field(default_factory=dict)
    draft: Any = None  # scale_decode: the ScaleDraft to hand to another model (CoDe)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) probabilities → (B,) token ids (``generator=None`` uses torch's global RNG, as transformers does)."""
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def ar_decode(
    adapter: ARGenAdapter,
    conditions: list[Any],
    sampling: Sampling,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor], bool | None] | None = None,
    progress: bool | dict[str, Any] = True,
) -> DecodeResult:
    """Plain next-token decoding of ``adapter.num_tokens`` image tokens for every condition.

    ``callback(step, tokens_so_far)`` runs after each step; returning ``False`` stops early (interrupt).
    """
    t0 = time.perf_counter()
    session = adapter.session(conditions, sampling)
    n, b = adapter.num_tokens, session.batch
    tokens = torch.zeros(b, n, dtype=torch.long)
    raw = session.prefill()  # (B', 1, V): predicts position 0
    steps = 1
    bar_cfg = progress if isinstance(progress, dict) else {"disable": not progress}
    bar = tqdm(total=n, desc="decoding", leave=False, **bar_cfg)
    for i in range(n):
        probs = adapter.target_probs(raw[:, -1], sampling)
        tok = sample(probs, generator) if not sampling.greedy else probs.argmax(-1)
        tokens[:, i] = tok.cpu()
        bar.update(1)
        if callback is not None and callback(i, tokens[:, : i + 1]) is False:
            tokens = tokens[:, : i + 1]
            break
        if i + 1 < n:
            raw = session.forward(tok[:, None], torch.tensor([i]))
            steps += 1
    bar.close()
    wall = (time.perf_counter() - t0) * 1e3
    return DecodeResult(tokens=tokens, steps=steps, stats={"steps": steps, "tokens": int(tokens.shape[1]), "wall_ms": wall})


@torch.inference_mode()
def scale_decode(
    adapter: Any,
    conditions: list[Any],
    sampling: Sampling,
    generator: torch.Generator | None = None,
    *,
    stop: int | None = None,
    draft: Any = None,
    callback: Callable[[int, torch.Tensor], bool | None] | None = None,
    progress: bool | dict[str, Any] = True,
) -> DecodeResult:
    """Next-scale decoding (VAR): one forward per scale, scale ``k`` guided with ``adapter.scale_guidance(k)``.

    ``stop`` ends after that many scales (a drafter); ``draft`` (a :class:`~mmfast.models.var.ScaleDraft` from
    another model) is pre-filled in one pass and decoding continues from it (a refiner). ``tokens`` (B, L') are
    the concatenated scales generated so far (the draft's included); ``callback(scale, tokens)`` runs after each
    scale (``False`` stops early).
    """
    t0 = time.perf_counter()
    session = adapter.scale_session(conditions, sampling)
    stop = session.num_scales if stop is None else stop
    plain = dataclasses.replace(sampling, guidance_scale=1.0)  # CFG is applied here, per scale
    raw = session.prefill(draft) if draft is not None and draft.scales > 0 else None
    bar_cfg = progress if isinstance(progress, dict) else {"disable": not progress}
    bar = tqdm(total=stop - session.scale, desc="scales", leave=False, **bar_cfg)
    steps = 0
    while session.scale < stop:
        raw = session.forward() if raw is None else raw  # (B', pn*pn, V)
        steps += 1
        if session.rows != session.batch:
            raw = cfg_combine(raw, adapter.scale_guidance(session.scale, sampling))
        probs = adapter.target_probs(raw, plain)  # (B, pn*pn, V)
        b, n, v = probs.shape
        ids = probs.argmax(-1) if sampling.greedy else sample(probs.reshape(b * n, v), generator).view(b, n)
        session.commit(ids)
        raw = None
        bar.update(1)
        tokens = torch.cat(session.ids, dim=1).cpu()
        if callback is not None and callback(session.scale - 1, tokens) is False:
            break
    bar.close()
    tokens = torch.cat(session.ids, dim=1).cpu() if session.ids else torch.zeros(session.batch, 0, dtype=torch.long)
    wall = (time.perf_counter() - t0) * 1e3
    return DecodeResult(tokens=tokens, steps=steps, draft=session.draft(),
                        stats={"steps": steps, "tokens": int(tokens.shape[1]), "wall_ms": wall})
