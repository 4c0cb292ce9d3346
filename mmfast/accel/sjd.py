"""Speculative Jacobi Decoding (SJD).

Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative Jacobi
Decoding", ICLR 2025, arXiv 2410.01699.

Jacobi iteration with a probabilistic convergence criterion: a window of L = 16 positions (the last committed
token + 15 drafts) is verified in one forward; draft ``x`` with proposal ``q`` is accepted with probability
``min(1, p(x) / q(x))`` and the first rejection is resampled from ``norm(max(0, p - q))`` — speculative sampling,
so the output distribution is exactly the model's. The samples drawn this step beyond the rejection point, with
the distributions they were drawn from, are the next step's drafts (the Jacobi carry-over); the rest of the
window is filled by an initialisation scheme (paper §3.3):

* ``random``: a uniform random token (the reference default for Lumina-mGPT / Emu3);
* ``repeat_horizontal``: copy the token to the left in the 2-D grid (``test_llamagen.py`` asks for it, but its
  logits processors carry no ``w_latent_dim``, so the reference actually falls back to ``random`` there);
* ``sample_horizontal``: sample from the left neighbour's distribution (the paper's description; the reference's
  ``random_multinomial_sample_from_logits`` keeps only the top-1 logit, i.e. takes the argmax with a one-hot q:
  both are exact, and both compress alike on tiny-ar);
* ``repeat_vertical`` / ``sample_vertical``: the same with the token above. The paper reports vertical repeat as
  the fastest; the reference disabled it for memory. Here the distributions of the last grid row are kept in a
  dict keyed by position (W x V floats per row), so it costs one row of probabilities.

Fresh tokens count as point-mass proposals (q = one-hot), which keeps the test exact whatever produced them
(as in the reference); sampled initialisations use the distribution they were drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmfast.accel.base import DecodeAccelerator, register
from mmfast.accel.speculative import Drafter, StrictRule, speculative_decode
from mmfast.errors import ConfigError

INIT_SCHEMES = ("random", "repeat_horizontal", "sample_horizontal", "repeat_vertical", "sample_vertical")


class JacobiDrafter(Drafter):
    """Drafts = last step's samples beyond the rejection point (with their q), then ``init`` for the rest."""

    def __init__(self, init: str = "random"):
        if init not in INIT_SCHEMES:
            raise ConfigError(f"sjd: init must be one of {', '.join(INIT_SCHEMES)}, got {init!r}.")
        self.init = init

    def reset(self, adapter, batch, sampling, generator) -> None:  # type: ignore[override]
        super().reset(adapter, batch, sampling, generator)
        self.v, self.width = adapter.codebook_size, adapter.grid[1]
        self.carry: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # position -> (token (B,), q (B, V))
        self.known_p: dict[int, torch.Tensor] = {}  # committed position -> target p (B, V), last grid row only

    def commit_probs(self, p: torch.Tensor, n: int) -> None:
        for j in range(p.shape[1]):
            self.known_p[n + j] = p[:, j]
        for pos in [k for k in self.known_p if k < n + p.shape[1] - self.width - 1]:
            del self.known_p[pos]

    def observe(self, p: torch.Tensor, samples: torch.Tensor, n: int, m: int) -> None:
        self.carry = {n + j: (samples[:, j], p[:, j]) for j in range(m + 1, p.shape[1])}

    def _neighbour(self, pos: int) -> int | None:
        """Grid position the init scheme copies / samples from, or None (then: random)."""
        if self.init.endswith("horizontal"):
            return pos - 1 if pos % self.width else (pos - self.width if pos >= self.width else None)
        return pos - self.width if pos >= self.width else (pos - 1 if pos > 0 else None)

    def propose(self, tokens: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = tokens.shape[0]
        toks: dict[int, torch.Tensor] = {}
        qs: dict[int, torch.Tensor | None] = {}
        for pos in range(n, n + k):
            if pos in self.carry:
                toks[pos], qs[pos] = self.carry[pos]
                continue
            src = None if self.init == "random" else self._neighbour(pos)
            if src is None:
                toks[pos], qs[pos] = torch.randint(0, self.v, (b,), generator=self.generator), None
            elif self.init.startswith("repeat"):
                toks[pos], qs[pos] = (tokens[:, src] if src < n else toks[src]), None
            else:  # sample from the neighbour's distribution (its target if committed, its proposal if drafted)
                dist = self.known_p.get(src) if src < n else qs[src]
                if dist is None:  # a point-mass neighbour: sampling from it is repeating it
                    toks[pos], qs[pos] = (tokens[:, src] if src < n else toks[src]), None
                else:
                    toks[pos] = torch.multinomial(dist, 1, generator=self.generator).squeeze(-1)
                    qs[pos] = dist
        if k == 0:
            return torch.zeros(b, 0, dtype=torch.long), None
        draft = torch.stack([toks[pos] for pos in range(n, n + k)], dim=1)
        if all(qs[pos] is None for pos in qs):
            return draft, None
        q = torch.stack(
            [qs[pos] if qs[pos] is not None else torch.nn.functional.one_hot(toks[pos], self.v).float() for pos in range(n, n + k)],
            dim=1,
        )
        return draft, q


def _check_window(name: str, window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(f"{name}: window must be an integer >= 2, got {window!r}.")


@register
@dataclass
class SJD(DecodeAccelerator):
    """Speculative Jacobi Decoding: lossless, training-free, ``window`` positions per forward."""

    name = "sjd"
    window: int = 16
    init: str = "random"

    def validate(self) -> None:
        _check_window("sjd", self.window)
        if self.init not in INIT_SCHEMES:
            raise ConfigError(f"sjd: init must be one of {', '.join(INIT_SCHEMES)}, got {self.init!r}.")

    def decode(self, adapter, conditions, sampling, generator, callback=None, progress=True):  # type: ignore[override]
        return speculative_decode(
            adapter, conditions, sampling, JacobiDrafter(self.init), StrictRule(), self.window, generator, callback, progress
        )
