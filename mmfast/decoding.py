"""The baseline AR image decoding loop: one token per forward, KV cache, reproducible by seed.

Accelerated decoders (SJD, LANTERN, GSD) replace :func:`ar_decode` through the decode stage; they share
:meth:`ARGenAdapter.target_probs`, so baseline and accelerated runs sample from the same distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from mmfast.models.argen import ARGenAdapter, Sampling


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # (B, N) image token ids
    steps: int  # model forwards after the prefill (+1 for the prefill itself)
    stats: dict[str, Any] = field(default_factory=dict)


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
