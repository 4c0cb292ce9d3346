"""ZipVL: dynamic-ratio sparse prefill and mixed-precision (or evicted) KV cache.

He et al., "ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification and KV Cache
Compression", arXiv 2410.08584 (v1: mixed-precision KV; v2: eviction), building on ZipCache (arXiv 2405.14256,
normalized attention score and its quantizers). Per decoder layer, at prefill (the adapter's prefill stage calls
:meth:`ZipVL.on_layer` before every layer):

1. probe queries P: the last ``probe`` fraction of positions plus as many seeded-random earlier ones (ZipCache's
   choice; ZipVL's exact probe set is not public), at most ``probe_max`` of each so that scoring stays linear in
   the prompt length on long videos (the cap only binds above 5k tokens). Scores
   ``a_j = sum_{i in P, heads} softmax(q_i K^T / sqrt(d))_ij`` come from the probe path (``ctx.attention``, the
   shared blockwise probe kernel; the layer itself keeps sdpa);
2. dynamic ratio (ZipVL eq. for p): ``p = min{p : sum of the top-p a_j >= tau * sum_j a_j}`` (``tau = 0.975``);
3. important set T: the top-p tokens by *normalized* score ``a_j / #{i in P : i >= j}`` (ZipCache), which removes
   the causal bias toward early tokens;
4. sparse prefill (``ctx.route(T)``): the layer's attention runs on T only, ``O[T] = sdpa(Q[T], K[T], V[T])`` with
   the causal mask among T (one token set per layer, shared by all heads, so the stock sdpa / flash kernel is
   reused);
5. KV: ``mode="quant"`` stores T at ``bits[0]`` and the rest at ``bits[1]`` (4 / 2; keys channel-wise, values
   ZipCache channel-separable token-wise, see :class:`~mmfast.models.cache.MixedPrecisionKV`); ``mode="evict"``
   keeps only T (v2);
6. decoding: every ``every`` (N = 100) new tokens, those tokens are scored by their own queries against the whole
   cache, the same tau rule picks their important ones, and they are quantized (or the rest evicted).

Decisions where the public description is thin (documented departures):

* Non-important positions skip attention in that layer: their attention output is 0, so their hidden state goes on
  through the residual and the MLP; their K/V are still computed and cached (low bits, or evicted). This gives the
  ``p^2 / n^2`` attention cost the paper reports; the MLP still runs on every token.
* The probe window itself (the last ``probe`` fraction: the question and the generation prompt) is always counted
  important, so the tokens that produce the answer never skip attention.
* The normalizer counts the probe queries that can see each key; ZipCache divides by ``n - j`` (all queries)
  even though it sums over probes only.
* ``bits`` may use 16 for "keep in full precision"; ``tau >= 1`` keeps every token (identical to the baseline with
  ``mode="evict"`` or ``bits[0] == 16``).
* ``ratio=r`` replaces the tau rule by a fixed ``p = r * n`` (the paper's fixed-ratio ablation). ``vlm-speed`` uses
  it to time a random-weight model at a chosen ratio: random attention is nearly uniform, so tau would keep almost
  every token there.

Why tau keeps most tokens on the tiny models (docs/methods/zipvl.md): a small model's attention is spread out,
and duplicated frames of a long clip split the attention mass between the copies, so the cumulative-mass rule
needs all of them; ``ratio=`` then times the paper's operating point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mmfast.accel.base import KVAccelerator, PrefillAccelerator, register
from mmfast.errors import ConfigError
from mmfast.kernels.probe_attention import probe_attention, visible_counts
from mmfast.models.attention import AttentionTap, project_queries
from mmfast.models.cache import MixedPrecisionKV
from mmfast.types import KVContext, Stage


def dynamic_count(scores: torch.Tensor, tau: float) -> int:
    """Smallest p whose top-p scores (1-D) hold at least ``tau`` of the total mass."""
    n = scores.numel()
    if tau >= 1.0:
        return n
    c = scores.float().sort(descending=True).values.cumsum(0)
    return min(n, int((c < tau * c[-1]).sum()) + 1)


def important_tokens(
    scores: torch.Tensor,
    counts: torch.Tensor,
    tau: float,
    force: torch.Tensor | None = None,
    ratio: float | None = None,
) -> torch.Tensor:
    """Sorted indices of the important tokens: the top-p by ``scores / counts`` with p from :func:`dynamic_count`
    (or ``p = round(ratio * S)`` with a fixed ``ratio``).

    scores, counts: (S,); force: indices always included (e.g. the probe window).
    """
    p = dynamic_count(scores, tau) if ratio is None else max(1, round(ratio * scores.numel()))
    if p >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    norm = scores.float() / counts.clamp_min(1).float()
    idx = norm.topk(p).indices
    if force is not None:
        idx = torch.cat([idx, force.to(idx.device)]).unique()
    return idx.sort().values


@register
@dataclass
class ZipVL(PrefillAccelerator, KVAccelerator):
    """ZipVL dynamic-ratio sparse prefill + mixed-precision / evicted KV (see the module docstring)."""

    name = "zipvl"
    stages = (Stage.PREFILL, Stage.KV)
    tau: float = 0.975
    bits: tuple = (4, 2)
    mode: str = "quant"  # "quant" | "evict"
    every: int = 100
    probe: float = 0.05
    probe_max: int = 256
    sparse: bool = True
    ratio: float | None = None  # fixed keep ratio instead of the tau rule (the paper's fixed-ratio ablation)
    seed: int = 0

    def validate(self) -> None:
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 < self.tau <= 1:
            raise ConfigError(f"zipvl: tau must be in (0, 1], got {self.tau!r}.")
        if self.mode not in ("quant", "evict"):
            raise ConfigError(f"zipvl: mode must be 'quant' or 'evict', got {self.mode!r}.")
        if (
            not isinstance(self.bits, (tuple, list))
            or len(self.bits) != 2
            or any(b not in (2, 4, 8, 16) for b in self.bits)
        ):
            raise ConfigError(f"zipvl: bits must be (high, low) from 2, 4, 8, 16, got {self.bits!r}.")
        self.bits = tuple(self.bits)
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"zipvl: every must be an integer >= 1, got {self.every!r}.")
        if isinstance(self.probe, bool) or not isinstance(self.probe, (int, float)) or not 0 < self.probe <= 0.5:
            raise ConfigError(f"zipvl: probe must be a fraction in (0, 0.5], got {self.probe!r}.")
        if isinstance(self.probe_max, bool) or not isinstance(self.probe_max, int) or self.probe_max < 1:
            raise ConfigError(f"zipvl: probe_max must be an integer >= 1, got {self.probe_max!r}.")
        r = self.ratio
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1):
            raise ConfigError(f"zipvl: ratio must be None or a fraction in (0, 1], got {r!r}.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._tap: AttentionTap | None = None
        self.plans: dict[int, torch.Tensor | None] = {}  # layer -> important prompt positions (None: all)
        self.ratios: dict[int, float] = {}  # layer -> p / n of the last prefill

    @property
    def role(self) -> str:  # type: ignore[override]
        return "quantize" if self.mode == "quant" else "evict"

    @property
    def routes_attention(self) -> bool:  # type: ignore[override]
        return self.sparse

    def _identity(self) -> bool:
        return (self.tau >= 1 and self.ratio is None) or self.ratio == 1

    # -- hooks -------------------------------------------------------------------------------------
    def attach(self, adapter: Any) -> None:
        super().attach(adapter)
        self._tap = AttentionTap(adapter, history=self.every)  # decode-step inputs, scored at re-compression

    def detach(self, adapter: Any) -> None:
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        self.plans = {}
        super().detach(adapter)

    def extra_stats(self) -> dict[str, Any]:
        if not self.ratios:
            return {}
        return {"important_ratio": sum(self.ratios.values()) / len(self.ratios)}

    # -- prefill stage -----------------------------------------------------------------------------
    def layers(self, num_layers: int) -> range:
        return range(num_layers)

    def on_layer(self, ctx: Any) -> None:
        """Score this layer's prompt by probe attention, pick the important set T, route attention among T."""
        n = ctx.num_tokens
        keep = None
        if self._identity():
            self.ratios[ctx.layer] = 1.0
        else:
            r = min(self.probe_max, max(1, math.ceil(self.probe * n)))
            dev = ctx.hidden.device
            recent = torch.arange(n - r, n, device=dev)
            gen = torch.Generator().manual_seed(self.seed)
            rand = torch.randperm(n - r, generator=gen)[: min(r, n - r)].sort().values.to(dev)
            rows = torch.cat([rand, recent])
            scores = ctx.attention(rows).sum(dim=(0, 1))  # one token set per layer: sum batch and heads
            counts = visible_counts(rows, torch.arange(n, device=dev))
            keep = important_tokens(scores, counts, self.tau, recent, self.ratio)
            self.ratios[ctx.layer] = keep.numel() / n
            if self.sparse:
                ctx.route(keep)
        self.plans[ctx.layer] = keep

    # -- kv stage ----------------------------------------------------------------------------------
    def wants_update(self, ctx: KVContext) -> bool:
        return ctx.phase == "prefill" or (ctx.seen - ctx.prompt_len) % self.every == 0

    def _high(self, keys: torch.Tensor, ctx: KVContext) -> torch.Tensor:
        """(B, kv_heads, S) True where an entry of ``keys`` (the entries handed to this policy) is important."""
        b, h, s = keys.shape[:3]
        if ctx.phase == "prefill":
            keep = self.plans.get(ctx.layer_idx)
            if keep is None or (ctx.positions is None and s != ctx.prompt_len):  # unknown provenance: keep all
                return torch.ones(b, h, s, dtype=torch.bool, device=keys.device)
            return torch.isin(ctx.entry_positions(keys), keep.to(keys.device))
        high = torch.ones(b, h, s, dtype=torch.bool, device=keys.device)
        buf = self._tap.history.get(ctx.layer_idx) if self._tap is not None else None
        if not buf or self._identity():
            return high
        hidden = torch.cat([x for x, _ in buf], dim=1)[:, -self.every :]
        cos = torch.cat([p[0] for _, p in buf], dim=1)[:, -self.every :]
        sin = torch.cat([p[1] for _, p in buf], dim=1)[:, -self.every :]
        self._tap.history[ctx.layer_idx] = []
        n = min(hidden.shape[1], s)
        q = project_queries(self._tap.modules[ctx.layer_idx], hidden[:, -n:], (cos[:, -n:], sin[:, -n:]))
        allk = ctx.keys_all
        q_pos = torch.arange(ctx.seen - n, ctx.seen, device=keys.device)
        k_pos = torch.full((allk.shape[-2],), -1, dtype=torch.long, device=keys.device)  # older entries: seen by all
        k_pos[-n:] = q_pos
        scores = probe_attention(q, allk, q_pos, k_pos).sum(dim=(0, 1))[-n:]
        keep = important_tokens(scores, visible_counts(q_pos, k_pos[-n:]), self.tau, ratio=self.ratio)
        new = torch.zeros(n, dtype=torch.bool, device=keys.device)
        new[keep] = True
        high[:, :, s - n :] = new
        return high

    def quantize(
        self, keys: torch.Tensor, values: torch.Tensor, ctx: KVContext
    ) -> tuple[list[MixedPrecisionKV], torch.Tensor, torch.Tensor]:
        if keys.shape[-2] == 0:
            return [], keys, values
        seg = MixedPrecisionKV(keys, values, self._high(keys, ctx), self.bits)
        return [seg], keys[:, :, :0], values[:, :, :0]

    def compress(self, keys: torch.Tensor, values: torch.Tensor, ctx: KVContext) -> tuple[torch.Tensor, torch.Tensor]:
        high = self._high(keys, ctx)
        if bool(high.all()):
            return keys, values
        idx = high[0, 0].nonzero().flatten()  # token-level set, shared by all heads
        ctx.positions = ctx.entry_positions(keys)[:, :, idx]
        return keys.index_select(-2, idx), values.index_select(-2, idx)
