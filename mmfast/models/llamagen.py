"""LlamaGen: a Llama-architecture class- / text-conditional AR image generator, own implementation + its adapter.

Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation", arXiv 2406.06525
(github.com/FoundationVision/LlamaGen, ``autoregressive/models/gpt.py`` and ``generate.py``). Parameter names and
shapes follow the official ``Transformer``, so its checkpoints load with ``load_state_dict(strict=True)``
(:func:`convert_official_checkpoint` turns the official ``.pt`` files into mmfast's safetensors directory).

Official defaults: VQ-16 codebook (vocab 16384), ``block_size`` 256 (256 px / 16), RMSNorm eps 1e-5, RoPE base
10000, SwiGLU hidden ``multiple_of``-rounded 8/3 x dim, no biases, untied ``output`` head initialised to zero;
dropouts 0.1 (token / residual / FFN) and label dropout 0.1 for classifier-free guidance. ``c2i``: 1000 classes
plus one null row, 1 condition token. ``t2i``: FLAN-T5-XL caption features (2048-d, 120 tokens, left-padded)
through a 2-layer GELU MLP. Sampling defaults: c2i CFG 4.0, top-k 2000; t2i CFG 7.5, top-k 1000.

Behaviours of the official code reproduced here (tests compare logits with the official module):

* **2-D RoPE.** The head dim is split in two: the first half of the rotary pairs turns with the token's row, the
  second half with its column; each half uses frequencies ``base ** (-2i / (head_dim / 2))``. Pairs are adjacent
  channels ``(2i, 2i+1)``.
* **Condition positions get cos = sin = 0**, not the identity rotation: condition-token queries and keys are
  *zeroed* in every layer. Every query therefore scores every visible condition token at exactly 0 (they still
  contribute their values), and a condition token attends uniformly to the condition tokens it can see.
* **t2i padding.** Caption positions outside the prompt mask are hidden from every query except themselves
  (the diagonal is forced on); under CFG the unconditional rows reuse the *prompt's* mask over
  ``uncond_embedding``. ``uncond_embedding`` (``caption_len`` x ``caption_dim``, 120 rows hard-coded officially)
  is a fixed random buffer: registered with ``register_buffer`` it is never trained.
* **No null row without label dropout**: the label table has ``num_classes + (class_dropout_prob > 0)`` rows.

Deliberately different: the official static ``KVCache`` is allocated with ``n_head`` heads, which breaks cached
generation for grouped-query attention (1 < n_kv_head < n_head); here the cache holds ``n_kv_head`` heads. The
cache is dynamic (append / truncate) and accepts arbitrary absolute image positions, for speculative decoders.
"""

from __future__ import annotations

import argparse
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmfast.errors import ConfigError, InvalidInputError, UnsupportedModelError
from mmfast.models.argen import ARGenAdapter, ARGenSession, Sampling, class_label, to_pil
from mmfast.models.vq import VQ_PRESETS, VQConfig, VQModel


@dataclass
class LlamaGenConfig:
    """The official ``ModelArgs`` fields (same names and defaults) plus ``caption_len``."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"  # "c2i" (class labels) | "t2i" (caption features)
    vocab_size: int = 16384
    cls_token_num: int = 1  # condition tokens in front of the image tokens (t2i: 120)
    block_size: int = 256  # image tokens, a square grid
    max_batch_size: int = 32  # unused (official static-cache sizes), kept for config round trips
    max_seq_len: int = 2048
    caption_len: int = 120  # rows of the t2i ``uncond_embedding`` buffer (hard-coded 120 officially)

    def __post_init__(self) -> None:
        if self.model_type not in ("c2i", "t2i"):
            raise ConfigError(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}.")
        if self.dim % self.n_head or self.head_dim % 4:
            raise ConfigError(f"dim / n_head must be an integer divisible by 4 (2-D RoPE), got {self.dim} / {self.n_head}.")
        if self.n_head % self.n_kv:
            raise ConfigError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv}).")
        if self.grid_size**2 != self.block_size:
            raise ConfigError(f"block_size must be a square number of image tokens, got {self.block_size}.")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            raise ConfigError("class-conditional models use exactly one condition token (cls_token_num=1).")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def n_kv(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def grid_size(self) -> int:
        return round(self.block_size**0.5)

    @property
    def ffn_hidden(self) -> int:
        """Official rule: int(2/3 * 4 * dim), times ``ffn_dim_multiplier``, rounded up to ``multiple_of``."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaGenConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown LlamaGen config keys {sorted(unknown)}.")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaGenConfig:
        if name not in GPT_PRESETS:
            raise ConfigError(f"unknown LlamaGen preset {name!r}; presets: {', '.join(GPT_PRESETS)}.")
        return cls(**{**GPT_PRESETS[name], **overrides})


#: the official ``GPT_models`` sizes (B..XXXL class-conditional, 1B/3B/7B text-conditional in the paper)
GPT_PRESETS: dict[str, dict[str, int]] = {
    "GPT-B": {"n_layer": 12, "n_head": 12, "dim": 768},  # 111M (c2i, 256 px)
    "GPT-L": {"n_layer": 24, "n_head": 16, "dim": 1024},  # 343M
    "GPT-XL": {"n_layer": 36, "n_head": 20, "dim": 1280},  # 775M
    "GPT-XXL": {"n_layer": 48, "n_head": 24, "dim": 1536},  # 1.4B
    "GPT-XXXL": {"n_layer": 48, "n_head": 40, "dim": 2560},  # 3.9B
    "GPT-1B": {"n_layer": 22, "n_head": 32, "dim": 2048},  # 1.2B
    "GPT-3B": {"n_layer": 24, "n_head": 32, "dim": 3200},  # 3.1B
    "GPT-7B": {"n_layer": 32, "n_head": 32, "dim": 4096},  # 6.6B
}


# --------------------------------------------------------------------------------------------------
# 2-D rotary positions
# --------------------------------------------------------------------------------------------------
def rope_2d(positions: torch.Tensor, grid: int, head_dim: int, base: float) -> torch.Tensor:
    """(cos, sin) per rotary pair for image positions on a ``grid`` x ``grid`` raster.

    Args:
        positions: (L,) long absolute image positions; negative entries mark condition tokens (cos = sin = 0).
    Returns:
        (L, head_dim // 2, 2) float32.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=positions.device)[: half // 2].float() / half))
    pos = positions.clamp(min=0)
    angles = torch.cat([(pos // grid).float()[:, None] * inv_freq, (pos % grid).float()[:, None] * inv_freq], dim=-1)
    rope = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return rope.masked_fill((positions < 0)[:, None, None], 0.0)  # the official zero "rotation" of condition tokens


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, L, H, head_dim) by rope (L, head_dim // 2, 2); computed in float32."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, head_dim // 2) each
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(3).type_as(x)


# --------------------------------------------------------------------------------------------------
# modules (attribute names follow the official state dict)
# --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LabelEmbedder(nn.Module):
    """Class label → one condition token; row ``num_classes`` is the null class (exists iff label dropout > 0)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """labels (B,) → (B, 1, dim); rows with ``drop`` True use the null class."""
        if drop is not None:
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)[:, None]


class CaptionMLP(nn.Module):
    def __init__(self, c_in: int, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c_in, dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Caption features (B, T, caption_dim) → (B, T, dim); dropped rows use the fixed ``uncond_embedding``."""

    def __init__(self, caption_dim: int, dim: int, caption_len: int):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(caption_len, caption_dim) / caption_dim**0.5)

    def forward(self, caption: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            caption = torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.cap_proj(caption)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


KV = tuple[torch.Tensor, torch.Tensor]  # (B, n_kv_head, S, head_dim) keys, values


class Attention(nn.Module):
    """Causal self-attention with a fused ``wqkv`` projection, grouped-query heads and 2-D RoPE."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.n_kv, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.n_kv) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None, past: KV | None = None
    ) -> tuple[torch.Tensor, KV]:
        """x (B, L, dim) → (B, L, dim), plus this layer's keys / values including ``past``.

        ``mask`` is a boolean (B|1, 1, L, S) "may attend" mask, or None for plain causal attention.
        """
        b, n, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, *(2 * [self.n_kv * self.head_dim])], dim=-1)
        q = apply_rope(q.view(b, n, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(b, n, self.n_kv, self.head_dim), rope).transpose(1, 2)
        v = v.view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        rep = self.n_head // self.n_kv
        keys, values = (k, v) if rep == 1 else (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=mask is None and past is None,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
        )
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, n, -1))), (k, v)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's residual branch with probability p (rescaled by 1 / (1 - p))."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaGenConfig, drop_path: float):
        super().__init__()
        self.attention, self.feed_forward = Attention(cfg), FeedForward(cfg)
        self.attention_norm, self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop_path = drop_path

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None, past: KV | None = None
    ) -> tuple[torch.Tensor, KV]:
        a, kv = self.attention(self.attention_norm(x), rope, mask, past)
        h = x + _drop_path(a, self.drop_path, self.training)
        return h + _drop_path(self.feed_forward(self.ffn_norm(h)), self.drop_path, self.training), kv


@dataclass
class KVCache:
    """Dynamic per-layer cache: ``n_cond`` condition entries, then image tokens in the order they were fed.

    ``cond_mask`` (B', n_cond) bool marks the caption tokens keys may attend to (t2i padding), or None.
    """

    kv: list[KV]
    n_cond: int
    cond_mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Image tokens held."""
        return self.kv[0][0].shape[2] - self.n_cond

    def truncate(self, n: int) -> None:
        """Keep the condition plus the first ``n`` image tokens."""
        if not 0 <= n <= self.length:
            raise InvalidInputError(f"cannot truncate a cache of {self.length} image tokens to {n}.")
        keep = self.n_cond + n
        self.kv = [(k[:, :, :keep], v[:, :, :keep]) for k, v in self.kv]


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------
class LlamaGen(nn.Module):
    """LlamaGen GPT: ``[condition tokens] + [image tokens]`` → next-image-token logits.

    * training: :meth:`forward` / :meth:`loss` (teacher forcing, label dropout in ``train()`` mode);
    * inference: ``logits, cache = prefill(cond)``, then ``step(tokens, positions, cache)``, ``cache.truncate(n)``.
    """

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.config = cfg = config
        if cfg.model_type == "c2i":
            self.cls_embedding: nn.Module = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        else:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.caption_len)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        # linearly increasing stochastic depth (plain floats: works on the meta device)
        rates = [cfg.drop_path_rate * i / max(cfg.n_layer - 1, 1) for i in range(cfg.n_layer)]
        self.layers = nn.ModuleList(TransformerBlock(cfg, r) for r in rates)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: N(0, initializer_range) for linears and embeddings, zero output head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.config.initializer_range)
        nn.init.zeros_(self.output.weight)

    @property
    def n_cond(self) -> int:
        return self.config.cls_token_num

    @property
    def has_null_condition(self) -> bool:
        """Whether classifier-free guidance is possible (c2i needs the null row)."""
        return self.config.model_type == "t2i" or self.config.class_dropout_prob > 0

    # ---- conditions -------------------------------------------------------------------------------
    def label_dropout(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """Rows to replace by the null condition in training mode (same RNG draw as the official code)."""
        if not self.training or self.config.class_dropout_prob <= 0:
            return None
        return torch.rand(batch, device=device) < self.config.class_dropout_prob

    def embed_condition(self, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """c2i labels (B,) or t2i caption features (B, T, caption_dim) → (B, n_cond, dim)."""
        return self.cls_embedding(cond, drop)[:, : self.n_cond]

    def null_condition(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        """The unconditional input for CFG: null labels (B,) or ``uncond_embedding`` captions (B, caption_len, C)."""
        if self.config.model_type == "c2i":
            if not self.has_null_condition:
                raise ConfigError("this model was built with class_dropout_prob=0: it has no null class for CFG.")
            return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
        return self.cls_embedding.uncond_embedding[None].expand(batch, -1, -1).to(device)

    def _cond_key_mask(self, cond_mask: torch.Tensor | None, q_start: int, n_q: int, n_keys: int) -> torch.Tensor | None:
        """Official t2i mask: causal, padded caption keys hidden, diagonal always visible. (B, 1, n_q, n_keys)."""
        if cond_mask is None:
            return None
        q = torch.arange(q_start, q_start + n_q, device=cond_mask.device)[:, None]
        k = torch.arange(n_keys, device=cond_mask.device)[None]
        visible = torch.ones(cond_mask.shape[0], n_keys, dtype=torch.bool, device=cond_mask.device)
        visible[:, : cond_mask.shape[1]] = cond_mask.bool()
        return (((k <= q)[None] & visible[:, None]) | (k == q)[None])[:, None]

    # ---- training ---------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher forcing.

        Args:
            idx: (B, L) image tokens 0..L-1, L < block_size (feed ``tokens[:, :-1]``).
            cond: (B,) labels or (B, T, caption_dim) caption features.
            cond_mask: (B, T) bool valid caption tokens (t2i, left-padded), or None.
            drop: (B,) bool rows to make unconditional; default: random label dropout in training mode.
        Returns:
            (B, L + 1, V) float32 logits; ``[:, i]`` predicts image token i.
        """
        b, n = idx.shape
        if n >= self.config.block_size:
            raise InvalidInputError(f"feed at most block_size - 1 = {self.config.block_size - 1} tokens, got {n}.")
        drop = self.label_dropout(b, idx.device) if drop is None else drop
        h = torch.cat([self.embed_condition(cond, drop), self.tok_embeddings(idx)], dim=1)
        h = self.tok_dropout(h)
        positions = torch.arange(-self.n_cond, n, device=idx.device).clamp(min=-1)
        rope = rope_2d(positions, self.config.grid_size, self.config.head_dim, self.config.rope_base)
        mask = self._cond_key_mask(cond_mask, 0, h.shape[1], h.shape[1])
        for layer in self.layers:
            h, _ = layer(h, rope, mask)
        return self.output(self.norm(h[:, self.n_cond - 1 :])).float()

    def loss(
        self, tokens: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over all N image tokens of ``tokens`` (B, N) (label dropout if training)."""
        logits = self(tokens[:, :-1], cond, cond_mask)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))

    # ---- cached inference ----------------------------------------------------------------------------
    def prefill(self, cond: torch.Tensor, cond_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """Run the condition tokens. Returns (logits (B, 1, V) for image position 0, a new :class:`KVCache`)."""
        h = self.tok_dropout(self.embed_condition(cond))
        rope = rope_2d(torch.full((h.shape[1],), -1, device=h.device), self.config.grid_size,
                       self.config.head_dim, self.config.rope_base)
        mask = self._cond_key_mask(cond_mask, 0, h.shape[1], h.shape[1])
        kv = []
        for layer in self.layers:
            h, layer_kv = layer(h, rope, mask)
            kv.append(layer_kv)
        cache = KVCache(kv, h.shape[1], None if cond_mask is None else cond_mask.bool())
        return self.output(self.norm(h[:, -1:])).float(), cache

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append image ``tokens`` (B, L) at absolute image ``positions`` (L,) to ``cache``.

        Attention is causal in feed order over the cache. Returns (B, L, V) float32 logits; ``[:, j]`` predicts the
        token after ``positions[j]``.
        """
        b, n = tokens.shape
        positions = positions.to(tokens.device)
        if positions.shape != (n,) or int(positions.min()) < 0 or int(positions.max()) >= self.config.block_size:
            raise InvalidInputError(f"positions must be ({n},) image positions in [0, {self.config.block_size}).")
        past = cache.n_cond + cache.length
        h = self.tok_dropout(self.tok_embeddings(tokens))
        rope = rope_2d(positions, self.config.grid_size, self.config.head_dim, self.config.rope_base)
        mask = self._cond_key_mask(cache.cond_mask, past, n, past + n)
        if mask is None and n > 1:
            mask = torch.ones(n, past + n, dtype=torch.bool, device=h.device).tril(past)[None, None]
        kv = []
        for layer, layer_past in zip(self.layers, cache.kv):
            h, layer_kv = layer(h, rope, mask, layer_past)
            kv.append(layer_kv)
        cache.kv = kv
        return self.output(self.norm(h)).float()

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device


# --------------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------------
class LlamaGenSession(ARGenSession):
    """A generation request on :class:`LlamaGen`: conditional rows first, unconditional rows second under CFG."""

    def __init__(self, model: LlamaGen, cond: torch.Tensor, cond_mask: torch.Tensor | None, batch: int):
        self.model, self.cond, self.cond_mask, self.batch = model, cond, cond_mask, batch
        self.cache: KVCache | None = None

    @property
    def rows(self) -> int:
        """B' (2B under CFG)."""
        return self.cond.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        logits, self.cache = self.model.prefill(self.cond, self.cond_mask)
        return logits

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise InvalidInputError("call prefill() before forward().")
        tokens = tokens.to(self.model.device)
        if tokens.shape[0] == self.batch and self.rows != self.batch:
            tokens = tokens.repeat(self.rows // self.batch, 1)
        return self.model.step(tokens, positions, self.cache)

    def truncate(self, n: int) -> None:
        if self.cache is None:
            raise InvalidInputError("call prefill() before truncate().")
        self.cache.truncate(n)


class LlamaGenAdapter(ARGenAdapter):
    """:class:`ARGenAdapter` over mmfast's :class:`LlamaGen` + :class:`VQModel` (offers EAGLE draft heads).

    Class-conditional models take labels: ints, or prompts resolved through ``id2label`` ("7", "digit 7",
    "seven"). Text-conditional models take caption features ``(T, caption_dim)`` per prompt (the valid tokens,
    left-padded here as in the official sampler), or strings when a ``text_encoder`` (``list[str] -> list[(T, C)]``)
    is given.
    """

    capabilities = frozenset({"draft_head"})

    family = "llamagen"

    def __init__(
        self,
        gpt: LlamaGen,
        vq: VQModel | None,
        id2label: Sequence[str] | None = None,
        recommended: dict[str, Any] | None = None,
        text_encoder: Callable[[list[str]], list[torch.Tensor]] | None = None,
    ):
        super().__init__()
        cfg = gpt.config
        if vq is not None and vq.config.codebook_size != cfg.vocab_size:
            raise ConfigError(f"VQ codebook ({vq.config.codebook_size}) != GPT vocab_size ({cfg.vocab_size}).")
        self.gpt, self.vq = gpt.eval(), None if vq is None else vq.eval()
        self.id2label = list(id2label) if id2label is not None else None
        self.recommended = dict(recommended or {})
        self.text_encoder = text_encoder
        self.conditioning = "class" if cfg.model_type == "c2i" else "text"
        self.grid = (cfg.grid_size, cfg.grid_size)
        self.codebook_size = cfg.vocab_size

    # ---- conditions -------------------------------------------------------------------------------
    def _label(self, c: Any) -> int:
        return class_label(c, self.gpt.config.num_classes, self.id2label)

    def parse_conditions(self, conditions: Any) -> list[Any]:
        if torch.is_tensor(conditions) and self.conditioning == "class":
            conditions = conditions.reshape(-1).tolist()
        conds = super().parse_conditions(conditions)
        if not conds:
            raise InvalidInputError("no conditions given.")
        if self.conditioning == "class":
            return [self._label(c) for c in conds]
        if any(isinstance(c, str) for c in conds):
            if self.text_encoder is None:
                raise InvalidInputError("this text-conditional model has no text_encoder: pass caption features (T, C).")
            encoded = iter(self.text_encoder([c for c in conds if isinstance(c, str)]))
            conds = [next(encoded) if isinstance(c, str) else c for c in conds]
        dim = self.gpt.config.caption_dim
        for c in conds:
            if not torch.is_tensor(c) or c.ndim != 2 or c.shape[1] != dim or c.shape[0] == 0:
                raise InvalidInputError(f"caption features must be tensors (T, {dim}) with T >= 1.")
        return conds

    def _conditions_tensor(self, conds: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        dev = self.gpt.device
        if self.conditioning == "class":
            return torch.tensor(conds, dtype=torch.long, device=dev), None
        t = self.gpt.config.cls_token_num
        emb = torch.zeros(len(conds), t, self.gpt.config.caption_dim, device=dev, dtype=self.gpt.tok_embeddings.weight.dtype)
        mask = torch.zeros(len(conds), t, dtype=torch.bool, device=dev)
        for i, c in enumerate(conds):
            c = c[:t]  # truncated like the text tokenizer; left padding as in the official sampler
            emb[i, t - len(c) :], mask[i, t - len(c) :] = c.to(emb), True
        return emb, mask

    def session(self, conditions: list[Any], sampling: Sampling) -> LlamaGenSession:
        conds = self.parse_conditions(conditions)
        cond, mask = self._conditions_tensor(conds)
        if sampling.cfg:
            cond = torch.cat([cond, self.gpt.null_condition(len(conds), cond.device).to(cond.dtype)])
            mask = None if mask is None else torch.cat([mask, mask])  # official: uncond rows reuse the prompt mask
        return LlamaGenSession(self.gpt, cond, mask, len(conds))

    # ---- codebook / images ------------------------------------------------------------------------
    def _need_vq(self) -> VQModel:
        if self.vq is None:
            raise UnsupportedModelError("this LlamaGen adapter has no VQ tokenizer.")
        return self.vq

    # ---- draft heads (capability "draft_head"): what an EAGLE-style head needs of the target ---------------
    @property
    def feature_dim(self) -> int:
        return self.gpt.config.dim

    def draft_block(self) -> nn.Module:
        """A fresh decoder block of this GPT's shape (the draft head's one layer)."""
        return TransformerBlock(self.gpt.config, 0.0)

    def draft_rope(self, positions: torch.Tensor) -> torch.Tensor:
        """The GPT's 2-D RoPE at image ``positions`` (T,)."""
        cfg = self.gpt.config
        return rope_2d(positions, cfg.grid_size, cfg.head_dim, cfg.rope_base)

    def capture_features(self, fn: Callable[[torch.Tensor], None]) -> Any:
        """Call ``fn(features (B', T, d))`` with the normed hidden states of every forward; returns the hook handle."""
        return self.gpt.norm.register_forward_hook(lambda _m, _i, out: fn(out))

    def draft_embeddings(self) -> torch.Tensor:
        """(V, d) input embeddings of the image tokens."""
        return self.gpt.tok_embeddings.weight

    def feature_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The GPT's output layer on features (..., d) -> raw logits (..., V)."""
        out = self.gpt.output
        return out(feats.to(out.weight.dtype))  # a draft head may run in fp32 beside a bf16 model

    def codebook_embeddings(self) -> torch.Tensor:
        """(V, D) raw VQ codebook vectors (pre-normalisation)."""
        return self._need_vq().codebook().detach()

    def token_embeddings(self) -> torch.Tensor:
        """(V, dim) the GPT's input embeddings of the image tokens."""
        return self.gpt.tok_embeddings.weight.detach()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        vq = self._need_vq()
        if tokens.ndim != 2 or tokens.shape[1] != self.num_tokens:
            raise InvalidInputError(f"expected tokens (B, {self.num_tokens}), got {tuple(tokens.shape)}.")
        return to_pil(vq.decode_code(tokens.long(), self.grid))

    # ---- persistence ------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "architecture": "llamagen",
            "gpt": self.gpt.config.to_dict(),
            "vq": None if self.vq is None else self.vq.config.to_dict(),
            "id2label": self.id2label,
            "recommended": self.recommended,
        }

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json``, ``gpt.safetensors`` and ``vq.safetensors`` to directory ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.gpt.state_dict().items()}, str(path / "gpt.safetensors"))
        if self.vq is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.vq.state_dict().items()}, str(path / "vq.safetensors"))

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: Any = None, dtype: Any = None, text_encoder: Callable[..., Any] | None = None
    ) -> LlamaGenAdapter:
        """Load a directory written by :meth:`save_pretrained` (safetensors only). ``dtype`` applies to the GPT;
        the VQ stays float32."""
        from safetensors.torch import load_file

        path = Path(path)
        try:
            data = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UnsupportedModelError(f"{str(path)!r} has no readable config.json: {e}") from e
        if data.get("architecture") != "llamagen":
            raise UnsupportedModelError(f"{str(path)!r} is not a LlamaGen checkpoint (architecture={data.get('architecture')!r}).")
        gpt = LlamaGen(LlamaGenConfig.from_dict(data["gpt"]))
        gpt.load_state_dict(load_file(str(path / "gpt.safetensors")), strict=True)
        vq = None
        if data.get("vq") is not None:
            vq = VQModel(VQConfig.from_dict(data["vq"]))
            vq.load_state_dict(load_file(str(path / "vq.safetensors")), strict=True)
        device = torch.device(device) if device is not None else torch.device("cpu")
        gpt = gpt.to(device=device, dtype=dtype if isinstance(dtype, torch.dtype) else None)
        vq = None if vq is None else vq.to(device)
        adapter = cls(gpt, vq, data.get("id2label"), data.get("recommended"), text_encoder)
        if (path / "drafter" / "drafter.safetensors").is_file():  # a shipped EAGLE-style draft head (eagle_sd / lantern)
            adapter.drafter_path = path / "drafter"
        return adapter


# --------------------------------------------------------------------------------------------------
# official checkpoints
# --------------------------------------------------------------------------------------------------
_DROP_KEYS = ("freqs_cis", "causal_mask")


def load_official_state_dict(path: str | Path, key: str = "model") -> dict[str, torch.Tensor]:
    """Weights from an official LlamaGen ``.pt`` with the safe loader (``torch.load(weights_only=True)``).

    Official training checkpoints are ``{"model": sd, "optimizer": ..., "steps": n, "args": Namespace}`` (+ ``"ema"``
    when trained with EMA); released ones may also use ``"module"`` / ``"state_dict"`` or be a bare state dict.
    ``argparse.Namespace`` is the only non-tensor class allowed through the unpickler. Prefixes left by
    ``torch.compile`` / DDP (``_orig_mod.``, ``module.``) and non-weight entries (static KV caches) are removed.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsupportedModelError(f"{str(path)!r} holds objects the safe loader refuses to unpickle: {e}") from e
    sd = None
    for k in (key, "model", "module", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict):
            sd = ckpt[k]
            break
    if sd is None and isinstance(ckpt, dict) and all(torch.is_tensor(v) for v in ckpt.values()):
        sd = ckpt
    if sd is None:
        raise UnsupportedModelError(f"{str(path)!r}: no state dict under {key!r}, 'model', 'module' or 'state_dict'.")
    out = {}
    for name, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            name = name.removeprefix(prefix)
        if name in _DROP_KEYS or ".kv_cache." in name:
            continue
        out[name] = v
    return out


def convert_official_checkpoint(
    gpt_pt: str | Path,
    vq_pt: str | Path,
    out_dir: str | Path,
    gpt_preset: str = "GPT-B",
    vq_preset: str = "VQ-16",
    *,
    model_type: str = "c2i",
    image_size: int = 256,
    num_classes: int = 1000,
    codebook_size: int = 16384,
    codebook_embed_dim: int = 8,
    use_ema: bool = False,
    id2label: Sequence[str] | None = None,
    recommended: dict[str, Any] | None = None,
    gpt_overrides: dict[str, Any] | None = None,
    vq_overrides: dict[str, Any] | None = None,
) -> Path:
    """Convert official LlamaGen ``.pt`` files (e.g. ``c2i_B_256.pt`` + ``vq_ds16_c2i.pt``) to an mmfast directory.

    ``block_size = (image_size / VQ downsampling)^2``; t2i models get 120 condition tokens. ``use_ema`` reads the
    GPT's ``"ema"`` weights instead of ``"model"``. ``recommended`` defaults to the official sampling settings
    (c2i: CFG 4.0, top-k 2000; t2i: CFG 7.5, top-k 1000; temperature 1). ``gpt_overrides`` / ``vq_overrides``
    change config fields on top of the presets (non-standard trainings). Loading is strict: a key or shape
    mismatch (wrong preset, image size ...) raises :class:`UnsupportedModelError`. Returns ``out_dir``.
    """
    vq_sd = load_official_state_dict(vq_pt)
    vq_cfg = VQConfig.from_preset(vq_preset, **{
        "codebook_size": codebook_size, "codebook_embed_dim": codebook_embed_dim,
        "codebook_show_usage": "quantize.codebook_used" in vq_sd, **(vq_overrides or {}),
    })
    if image_size % vq_cfg.downsample:
        raise ConfigError(f"image_size {image_size} is not a multiple of the VQ downsampling {vq_cfg.downsample}.")
    gpt_cfg = LlamaGenConfig.from_preset(gpt_preset, **{
        "model_type": model_type, "vocab_size": codebook_size, "num_classes": num_classes,
        "block_size": (image_size // vq_cfg.downsample) ** 2, "cls_token_num": 1 if model_type == "c2i" else 120,
        **(gpt_overrides or {}),
    })
    gpt_sd = load_official_state_dict(gpt_pt, key="ema" if use_ema else "model")
    gpt, vq = LlamaGen(gpt_cfg), VQModel(vq_cfg)
    try:
        gpt.load_state_dict(gpt_sd, strict=True)
        vq.load_state_dict(vq_sd, strict=True)
    except RuntimeError as e:
        raise UnsupportedModelError(f"checkpoint does not match {gpt_preset} / {vq_preset} at {image_size}px: {e}") from e
    if recommended is None:
        recommended = {"guidance_scale": 4.0, "top_k": 2000} if model_type == "c2i" else {"guidance_scale": 7.5, "top_k": 1000}
        recommended.update(temperature=1.0, top_p=1.0)
    LlamaGenAdapter(gpt, vq, id2label, recommended).save_pretrained(out_dir)
    return Path(out_dir)


__all__ = [
    "GPT_PRESETS",
    "VQ_PRESETS",
    "KVCache",
    "LlamaGen",
    "LlamaGenAdapter",
    "LlamaGenConfig",
    "LlamaGenSession",
    "apply_rope",
    "convert_official_checkpoint",
    "load_official_state_dict",
    "rope_2d",
]
