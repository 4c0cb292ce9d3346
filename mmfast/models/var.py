"""VAR: next-scale prediction (the multi-scale residual VQ-VAE and the class-conditional VAR transformer).

Tian et al., "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction", NeurIPS 2024,
arXiv 2404.02905 (code: FoundationVision/VAR). Not in transformers or diffusers; mmfast implements it with the
official parameter names and shapes, so the released ``var_d16..d30.pth`` and ``vae_ch160v4096z32.pth`` convert
with :func:`convert_official_checkpoint` (safe ``torch.load(weights_only=True)`` -> safetensors).

* **VQ-VAE** (:class:`VQVAE`): a conv encoder / decoder (taming layout) around a *multi-scale residual* quantizer
  with one shared codebook: for each scale ``pn`` in ``patch_nums`` (e.g. 1, 2, 3, 4, 5, 6, 8, 10, 13, 16) the
  residual ``f_rest`` is area-downsampled to ``pn x pn``, quantised to the nearest code, upsampled (bicubic) back to
  the last scale, passed through a refiner ``phi_k`` (``(1 - 0.5) h + 0.5 conv3x3(h)``; 4 partially shared convs
  picked by the scale's position in [0, 1]) and added to ``f_hat`` (paper Alg. 1 / 2).
* **VAR transformer** (:class:`VAR`): GPT-2-like blocks with adaptive LayerNorm on the class embedding (6 modulation
  vectors per block), a block-causal mask over scales (a token sees every token of its own and earlier scales),
  absolute position + level embeddings, L2-normalised query / key attention with a learned per-head scale
  (``attn_l2_norm``). Scale ``k``'s input is the accumulated ``f_hat`` area-downsampled to scale ``k``'s size.
* **Inference** (:class:`VARSession`): one forward per scale with a KV cache; classifier-free guidance ramps with
  the scale, ``t = cfg * k / (K - 1)``, ``logits = (1 + t) cond - t uncond``; top-k / top-p as the reference.
  The loop itself is :func:`mmfast.decoding.scale_decode`; CoDe (:mod:`mmfast.accel.code`) hands a drafter's
  next-scale inputs to a refiner through :meth:`VARSession.prefill`.

Departures: the reference's fused / flash kernels are replaced by ``scaled_dot_product_attention``; the VQ-VAE's
GroupNorm group count is configurable (``norm_groups``, official 32) so toy widths work; ``guidance_scale`` is the
reference's ``cfg`` (the ramp's end value), and a temperature (1 in the reference) may divide the logits first.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmfast.errors import ConfigError, InvalidInputError, UnsupportedModelError
from mmfast.models.argen import ARGenAdapter, Sampling, class_label, to_pil

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------
@dataclass
class VQVAEConfig:
    """The multi-scale VQ-VAE (defaults: the official ``vae_ch160v4096z32``)."""

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: code / latent width
    ch: int = 160
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    using_sa: bool = True  # self-attention at the lowest resolution
    using_mid_sa: bool = True
    norm_groups: int = 32
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4  # 0: one phi per scale, 1: one phi for all, K: K partially shared phis
    beta: float = 0.25
    using_znorm: bool = False
    v_patch_nums: list[int] = field(default_factory=lambda: list(OFFICIAL_PATCH_NUMS))
    in_channels: int = 3

    def __post_init__(self) -> None:
        self.ch_mult, self.v_patch_nums = list(self.ch_mult), list(self.v_patch_nums)
        if any(self.ch * m % self.norm_groups for m in self.ch_mult):
            raise ConfigError(f"VQVAE: every width ch * ch_mult must be a multiple of norm_groups={self.norm_groups}.")
        if list(self.v_patch_nums) != sorted(set(self.v_patch_nums)):
            raise ConfigError(f"VQVAE: v_patch_nums must increase strictly, got {self.v_patch_nums}.")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class VARConfig:
    """The VAR transformer (defaults: the official d16, ``build_vae_var(depth=16)``)."""

    num_classes: int = 1000
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    drop_path_rate: float = 0.0  # training only (official: 0.1 * depth / 24)
    patch_nums: list[int] = field(default_factory=lambda: list(OFFICIAL_PATCH_NUMS))
    vocab_size: int = 4096
    z_channels: int = 32

    def __post_init__(self) -> None:
        self.patch_nums = list(self.patch_nums)
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"VAR: embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}.")

    @classmethod
    def from_depth(cls, depth: int, **overrides: Any) -> VARConfig:
        """The official family: ``width = 64 * depth``, ``heads = depth`` (d16 310M ... d30 2.0B)."""
        return cls(**{"depth": depth, "embed_dim": 64 * depth, "num_heads": depth, **overrides})

    @property
    def scale_lengths(self) -> list[int]:
        return [p * p for p in self.patch_nums]

    @property
    def L(self) -> int:
        return sum(self.scale_lengths)

    def exit_points(self) -> list[int]:
        """Cumulative token counts after each scale (official: 1, 5, 14, 30, 55, 91, 155, 255, 424, 680)."""
        return np.cumsum(self.scale_lengths).tolist()


# --------------------------------------------------------------------------------------------------
# VQ-VAE (official names: encoder.*, decoder.*, quantize.*, quant_conv, post_quant_conv)
# --------------------------------------------------------------------------------------------------
def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm, self.qkv, self.proj_out = _norm(c, groups), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        w = torch.softmax(q.transpose(1, 2) @ k * C**-0.5, dim=-1)  # (B, HW_q, HW_k)
        return x + self.proj_out((v @ w.transpose(1, 2)).view(B, C, H, W))


class _Resample(nn.Module):
    def __init__(self, c: int, up: bool):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(c, c, 3, 1 if up else 2, 1 if up else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad + stride 2 (taming)


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return m


class Encoder(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        g, n = c.norm_groups, len(c.ch_mult)
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        cin = c.ch
        for i, m in enumerate(c.ch_mult):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(cin, c.ch * m, g))
                cin = c.ch * m
                if i == n - 1 and c.using_sa:
                    attns.append(AttnBlock(cin, g))
            lvl = _level(blocks, attns)
            if i != n - 1:
                lvl.downsample = _Resample(cin, up=False)
            self.down.append(lvl)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, g)
        self.mid.attn_1 = AttnBlock(cin, g) if c.using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(cin, cin, g)
        self.norm_out, self.conv_out = _norm(cin, g), nn.Conv2d(cin, c.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for lvl in self.down:
            for j, block in enumerate(lvl.block):
                h = block(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        g, n = c.norm_groups, len(c.ch_mult)
        cin = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, cin, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, g)
        self.mid.attn_1 = AttnBlock(cin, g) if c.using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(cin, cin, g)
        ups: list[nn.Module] = []
        for i in reversed(range(n)):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, c.ch * c.ch_mult[i], g))
                cin = c.ch * c.ch_mult[i]
                if i == n - 1 and c.using_sa:
                    attns.append(AttnBlock(cin, g))
            lvl = _level(blocks, attns)
            if i != 0:
                lvl.upsample = _Resample(cin, up=True)
            ups.insert(0, lvl)
        self.up = nn.ModuleList(ups)
        self.norm_out, self.conv_out = _norm(cin, g), nn.Conv2d(cin, c.in_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for lvl in reversed(self.up):
            for j, block in enumerate(lvl.block):
                h = block(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """Scale refiner: ``(1 - r) h + r conv3x3(h)``."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, 1, 1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class _PhiSet(nn.Module):
    """``phi(at)`` for ``at = k / (K - 1)`` in [0, 1]: the member whose tick is nearest (official tick layout)."""

    def __init__(self, phis: list[nn.Module], mode: str):
        super().__init__()
        n = len(phis)
        if mode == "shared":
            self.qresi = phis[0]
        else:
            self.qresi_ls = nn.ModuleList(phis)
        self.mode = mode
        self.ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)

    def __getitem__(self, at: float) -> nn.Module:
        if self.mode == "shared":
            return self.qresi
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at)))]


class _PhiNonShared(nn.ModuleList):
    """One phi per scale (``share_quant_resi=0``; official names ``quant_resi.{k}``)."""

    def __init__(self, phis: list[nn.Module]):
        super().__init__(phis)
        n = len(phis)
        self.ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)

    def __getitem__(self, at: Any) -> nn.Module:  # type: ignore[override]
        return super().__getitem__(int(np.argmin(np.abs(self.ticks - at))))


class MultiScaleQuantizer(nn.Module):
    """VectorQuantizer2 of the reference: a shared codebook over ``v_patch_nums`` scales of residuals."""

    def __init__(self, c: VQVAEConfig):
        super().__init__()
        self.vocab_size, self.Cvae, self.v_patch_nums = c.vocab_size, c.z_channels, list(c.v_patch_nums)
        self.using_znorm, self.beta = c.using_znorm, c.beta

        def phi() -> nn.Module:
            return Phi(c.z_channels, c.quant_resi) if abs(c.quant_resi) > 1e-6 else nn.Identity()

        if c.share_quant_resi == 0:
            self.quant_resi: Any = _PhiNonShared([phi() for _ in c.v_patch_nums])
        elif c.share_quant_resi == 1:
            self.quant_resi = _PhiSet([phi()], "shared")
        else:
            self.quant_resi = _PhiSet([phi() for _ in range(c.share_quant_resi)], "partial")
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(c.v_patch_nums), c.vocab_size))
        self.embedding = nn.Embedding(c.vocab_size, c.z_channels)

    def phi(self, si: int) -> nn.Module:
        return self.quant_resi[si / (len(self.v_patch_nums) - 1)]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N,) code ids (L2, or cosine under ``using_znorm``)."""
        w = self.embedding.weight.detach()
        if self.using_znorm:
            return (F.normalize(z, dim=-1) @ F.normalize(w, dim=-1).T).argmax(dim=1)
        d = z.square().sum(1, keepdim=True) + w.square().sum(1) - 2 * z @ w.T
        return d.argmin(dim=1)

    def quantize_scales(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Residual quantisation of ``f`` (B, C, H, W): per-scale ids [(B, pn*pn)], ``f_hat`` (with grad through
        the codebook and phis) and the per-scale residual vectors that were quantised [(B*pn*pn, C)]."""
        B, C, H, W = f.shape
        f_rest, f_hat = f.detach().clone(), torch.zeros_like(f)
        ids, rests, n = [], [], len(self.v_patch_nums)
        for si, pn in enumerate(self.v_patch_nums):
            small = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != n - 1 else f_rest
            z = small.permute(0, 2, 3, 1).reshape(-1, C)
            idx = self.nearest(z)
            h = self.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2)
            h = F.interpolate(h, size=(H, W), mode="bicubic") if si != n - 1 else h
            h = self.phi(si)(h.contiguous())
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            ids.append(idx.view(B, pn * pn))
            rests.append(z)
        return ids, f_hat, rests

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training: straight-through ``f_hat``, the mean VQ loss over scales (codebook + beta * commitment) and
        the per-scale ids.

        The reference accumulates the loss scale by scale on the running ``f_hat``; the sum over scales of
        ``mse(f_hat_k, f)`` is computed here the same way."""
        B, C, H, W = f.shape
        f_rest, f_hat = f.detach().clone(), torch.zeros_like(f)
        loss, n, ids = f.new_zeros(()), len(self.v_patch_nums), []
        for si, pn in enumerate(self.v_patch_nums):
            small = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != n - 1 else f_rest
            idx = self.nearest(small.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn, pn)
            ids.append(idx.view(B, pn * pn))
            h = self.embedding(idx).permute(0, 3, 1, 2)
            h = F.interpolate(h, size=(H, W), mode="bicubic") if si != n - 1 else h
            h = self.phi(si)(h.contiguous())
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + F.mse_loss(f_hat.detach(), f) * self.beta + F.mse_loss(f_hat, f.detach())
        return (f_hat.detach() - f.detach()) + f, loss / n, ids

    def ids_to_fhat(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale ids [(B, pn*pn)] -> accumulated ``f_hat`` (B, C, H, W) at the last scale."""
        H = self.v_patch_nums[-1]
        f_hat = None
        for si, (pn, idx) in enumerate(zip(self.v_patch_nums, ids)):
            h = self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], self.Cvae, pn, pn)
            f_hat = self.add_scale(si, h, f_hat if f_hat is not None else h.new_zeros(h.shape[0], self.Cvae, H, H))
        assert f_hat is not None
        return f_hat

    def add_scale(self, si: int, h: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
        """``f_hat + phi_k(upsample(h))``: scale ``si``'s code map h (B, C, pn, pn) added to ``f_hat`` (new tensor)."""
        H = self.v_patch_nums[-1]
        if si != len(self.v_patch_nums) - 1:
            h = F.interpolate(h, size=(H, H), mode="bicubic")
        return f_hat + self.phi(si)(h)

    def next_input(self, si: int, f_hat: torch.Tensor) -> torch.Tensor:
        """Scale ``si + 1``'s transformer input: ``f_hat`` area-downsampled to its size, as (B, pn*pn, C)."""
        pn = self.v_patch_nums[si + 1]
        return F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    def ids_to_var_input(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing inputs of scales 1..K-1 (B, L - first_l, C) from ground-truth ids (``idxBl_to_var_input``)."""
        H = self.v_patch_nums[-1]
        f_hat = ids[0].new_zeros(ids[0].shape[0], self.Cvae, H, H, dtype=self.embedding.weight.dtype)
        out = []
        for si in range(len(self.v_patch_nums) - 1):
            pn = self.v_patch_nums[si]
            h = self.embedding(ids[si]).transpose(1, 2).reshape(-1, self.Cvae, pn, pn)
            f_hat = self.add_scale(si, h, f_hat)
            out.append(self.next_input(si, f_hat))
        return torch.cat(out, dim=1)


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder (images in [-1, 1])."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.quantize = MultiScaleQuantizer(config)
        ks = config.quant_conv_ks
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, ks, 1, ks // 2)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, ks, 1, ks // 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training: (reconstruction (B, 3, H, W), VQ loss, per-scale ids [(B, pn*pn)])."""
        f_hat, loss, ids = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(f_hat)), loss, ids

    def img_to_ids(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> per-scale ids [(B, pn*pn)] (``img_to_idxBl``)."""
        return self.quantize.quantize_scales(self.quant_conv(self.encoder(x)))[0]

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def ids_to_img(self, ids: list[torch.Tensor]) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.ids_to_fhat(ids))


# --------------------------------------------------------------------------------------------------
# VAR transformer (official names: word_embed, class_emb, pos_start, pos_1LC, lvl_embed, blocks.*, head_nm, head)
# --------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, c: VARConfig):
        super().__init__()
        C, H = c.embed_dim, c.num_heads
        self.num_heads, self.head_dim, self.attn_l2_norm = H, C // H, c.attn_l2_norm
        if c.attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None, cache: list[torch.Tensor] | None) -> torch.Tensor:
        """x (B, L, C); ``cache`` = [k, v] of earlier scales (appended in place) or None (training / no cache)."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            k = F.normalize(k, dim=-1)
        if cache is not None:
            if cache:
                k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
            cache[:] = [k, v]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, c: VARConfig):
        super().__init__()
        hidden = round(c.embed_dim * c.mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(c.embed_dim, hidden), nn.Linear(hidden, c.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, c: VARConfig, drop_path: float):
        super().__init__()
        self.C, self.drop_path = c.embed_dim, drop_path
        self.attn, self.ffn = SelfAttention(c), FFN(c)
        self.ln_wo_grad = nn.LayerNorm(c.embed_dim, eps=c.norm_eps, elementwise_affine=False)
        if c.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c.embed_dim) / c.embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c.embed_dim, 6 * c.embed_dim))

    def _dp(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path == 0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - self.drop_path)
        return x * keep / (1 - self.drop_path)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor | None,
                cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        if hasattr(self, "ada_gss"):
            g1, g2, s1, s2, b1, b2 = (self.ada_gss + cond).unbind(2)
        else:
            g1, g2, s1, s2, b1, b2 = self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)
        x = x + self._dp(self.attn(self.ln_wo_grad(x) * (s1 + 1) + b1, attn_bias, cache) * g1)
        return x + self._dp(self.ffn(self.ln_wo_grad(x) * (s2 + 1) + b2) * g2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, c: VARConfig):
        super().__init__()
        self.C = c.embed_dim
        self.ln_wo_grad = nn.LayerNorm(c.embed_dim, eps=c.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c.embed_dim, 2 * c.embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


class _SharedAdaLin(nn.Linear):
    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


class VAR(nn.Module):
    """Class-conditional next-scale transformer. ``forward`` is teacher forcing; inference is :class:`VARSession`."""

    def __init__(self, config: VARConfig):
        super().__init__()
        c = self.config = config
        C, pn = c.embed_dim, c.patch_nums
        self.first_l, self.L = pn[0] ** 2, c.L
        self.word_embed = nn.Linear(c.z_channels, C)
        std = math.sqrt(1 / C / 3)
        self.class_emb = nn.Embedding(c.num_classes + 1, C)  # the last row is the null class (CFG)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(pn), C)
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, mean=0, std=std)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), _SharedAdaLin(C, 6 * C)) if c.shared_aln else nn.Identity()
        dpr = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]  # linspace (also on meta)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(c, dpr[i]) for i in range(c.depth))
        d = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pn)]).view(1, self.L, 1)
        self.register_buffer("lvl_1L", d.transpose(1, 2)[:, 0].contiguous())
        mask = torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, self.L, self.L)
        self.register_buffer("attn_bias_for_masking", mask.contiguous())  # block-causal over scales
        self.head_nm = AdaLNBeforeHead(c)
        self.head = nn.Linear(C, c.vocab_size)

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> None:
        """The official initialisation (``init_std < 0``: sqrt(1 / C / 3)); used for training from scratch."""
        std = init_std if init_std >= 0 else math.sqrt(1 / self.config.embed_dim / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight.data, std=std)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight.data, std=std)
        self.head.weight.data.mul_(init_head)
        self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        C, depth = self.config.embed_dim, len(self.blocks)
        for b in self.blocks:
            b.attn.proj.weight.data.div_(math.sqrt(2 * depth))
            b.ffn.fc2.weight.data.div_(math.sqrt(2 * depth))
            if hasattr(b, "ada_lin"):
                b.ada_lin[-1].weight.data[2 * C :].mul_(init_adaln)
                b.ada_lin[-1].weight.data[: 2 * C].mul_(init_adaln_gamma)
                b.ada_lin[-1].bias.data.zero_()

    def lvl_pos(self) -> torch.Tensor:
        """(1, L, C) level + absolute position embeddings."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def run_blocks(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor | None,
                   caches: list[list[torch.Tensor]] | None) -> torch.Tensor:
        """Blocks + head: x (B, l, C), cond (B, C) -> logits (B, l, V) (float32)."""
        gss = self.shared_ada_lin(cond)
        for i, b in enumerate(self.blocks):
            x = b(x, gss, attn_bias, None if caches is None else caches[i])
        return self.head(self.head_nm(x.float(), cond).float()).float()

    def forward(self, labels: torch.Tensor, x_wo_first_l: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: labels (B,), next-scale inputs (B, L - first_l, Cvae) -> logits (B, L, V).

        ``drop`` (B,) bool replaces labels by the null class; by default it is drawn with ``cond_drop_rate`` in
        training mode only (the reference draws it in every mode)."""
        B = labels.shape[0]
        if drop is None and self.training and self.config.cond_drop_rate > 0:
            drop = torch.rand(B, device=labels.device) < self.config.cond_drop_rate
        if drop is not None:
            labels = torch.where(drop, self.config.num_classes, labels)
        cond = self.class_emb(labels)
        sos = cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        x = torch.cat((sos, self.word_embed(x_wo_first_l.float())), dim=1) + self.lvl_pos()
        return self.run_blocks(x, cond, self.attn_bias_for_masking, None)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device


# --------------------------------------------------------------------------------------------------
# inference session: one forward per scale, KV cache, hand-off of next-scale inputs (CoDe)
# --------------------------------------------------------------------------------------------------
@dataclass
class ScaleDraft:
    """What a drafter hands a refiner (CoDe): scales generated so far, their ids, the accumulated ``f_hat`` and
    the continuous next-scale inputs (``token_hub`` of the reference). No KV crosses between models."""

    scales: int  # number of scales generated
    ids: list[torch.Tensor]  # [(B, pn*pn)] per generated scale
    f_hat: torch.Tensor  # (B, Cvae, H, W)
    inputs: torch.Tensor  # (B, exit_points[scales] - first_l, Cvae): transformer inputs of scales 1 .. scales


class VARSession:
    """A generation request on :class:`VAR` + :class:`VQVAE` (conditional rows first, unconditional second)."""

    def __init__(self, model: VAR, vae: VQVAE, labels: torch.Tensor, cfg: bool):
        self.model, self.vae, self.batch = model, vae, labels.shape[0]
        rows = torch.cat([labels, torch.full_like(labels, model.config.num_classes)]) if cfg else labels
        self.rows = rows.shape[0]
        self.cond = model.class_emb(rows)  # (B', C): sos and adaLN condition
        self.lvl_pos = model.lvl_pos()
        self.caches: list[list[torch.Tensor]] = [[] for _ in model.blocks]
        H = vae.config.v_patch_nums[-1]
        self.f_hat = self.cond.new_zeros(self.batch, model.config.z_channels, H, H)
        self.scale, self.ids, self.inputs = 0, [], []  # next scale to generate; its history
        fl = model.first_l
        self._next = self.cond.unsqueeze(1).expand(-1, fl, -1) + model.pos_start.expand(self.rows, -1, -1) + self.lvl_pos[:, :fl]

    @property
    def num_scales(self) -> int:
        return len(self.model.config.patch_nums)

    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        """Run the current scale's token map (KV appended) -> raw logits (B', pn*pn, V)."""
        return self.model.run_blocks(self._next, self.cond, None, self.caches)

    @torch.no_grad()
    def prefill(self, draft: ScaleDraft) -> torch.Tensor:
        """Pre-fill another model's draft in one block-causal pass (CoDe's refiner): embed its next-scale inputs
        with this model's ``word_embed``, run sos + them together, keep the KV; -> raw logits of the next scale."""
        if self.scale != 0:
            raise InvalidInputError("prefill() starts a fresh session.")
        m, n = self.model, draft.scales
        end = m.config.exit_points()[n]  # tokens up to and including scale n (the one predicted now)
        x = m.word_embed(draft.inputs.to(self.cond.dtype)) + self.lvl_pos[:, m.first_l : end]
        x = x.repeat(self.rows // self.batch, 1, 1)
        x = torch.cat([self._next, x], dim=1)
        raw = m.run_blocks(x, self.cond, m.attn_bias_for_masking[:, :, :end, :end], self.caches)
        self.scale, self.ids, self.f_hat = n, list(draft.ids), draft.f_hat.clone()
        self.inputs = [draft.inputs]
        return raw[:, end - m.config.scale_lengths[n] :]

    @torch.no_grad()
    def commit(self, ids: torch.Tensor) -> None:
        """Accept scale ``self.scale``'s ids (B, pn*pn): update ``f_hat`` and build the next scale's input."""
        si, pn, q = self.scale, self.model.config.patch_nums[self.scale], self.vae.quantize
        h = q.embedding(ids).transpose(1, 2).reshape(self.batch, q.Cvae, pn, pn)
        self.f_hat = q.add_scale(si, h, self.f_hat)
        self.ids.append(ids)
        self.scale += 1
        if self.scale < self.num_scales:
            nxt = q.next_input(si, self.f_hat)  # (B, pn'^2, Cvae)
            self.inputs.append(nxt)
            ex = self.model.config.exit_points()
            x = self.model.word_embed(nxt.to(self.cond.dtype)) + self.lvl_pos[:, ex[si] : ex[si + 1]]
            self._next = x.repeat(self.rows // self.batch, 1, 1)

    def draft(self) -> ScaleDraft:
        inputs = torch.cat(self.inputs, dim=1) if self.inputs else self.f_hat.new_zeros(self.batch, 0, self.vae.quantize.Cvae)
        return ScaleDraft(self.scale, list(self.ids), self.f_hat.clone(), inputs)


# --------------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------------
class VARAdapter(ARGenAdapter):
    """:class:`ARGenAdapter` over :class:`VAR` + :class:`VQVAE`: next-scale decoding (``order = "scales"``).

    ``guidance_scale`` is the reference's ``cfg``: scale k is guided with ``1 + cfg * k / (K - 1)``; any
    ``guidance_scale > 0`` doubles the batch (the reference always does). Tokens are the concatenated scales,
    (B, L) with L = sum(pn^2).
    """

    family = "var"
    order: ClassVar[str] = "scales"
    conditioning = "class"

    def __init__(self, model: VAR, vae: VQVAE, id2label: list[str] | None = None,
                 recommended: dict[str, Any] | None = None):
        super().__init__()
        if vae.config.vocab_size != model.config.vocab_size or vae.config.z_channels != model.config.z_channels:
            raise ConfigError("VAR and VQVAE disagree on vocab_size / z_channels.")
        if list(vae.config.v_patch_nums) != list(model.config.patch_nums):
            raise ConfigError("VAR patch_nums must equal the VQVAE's v_patch_nums.")
        self.model, self.vae = model.eval(), vae.eval()
        self.id2label = list(id2label) if id2label is not None else None
        self.recommended = dict(recommended or {})
        pn = model.config.patch_nums[-1]
        self.grid, self.codebook_size = (pn, pn), model.config.vocab_size

    @property
    def num_tokens(self) -> int:
        return self.model.config.L

    @property
    def patch_nums(self) -> list[int]:
        return list(self.model.config.patch_nums)

    def parse_conditions(self, conditions: Any) -> list[Any]:
        if torch.is_tensor(conditions):
            conditions = conditions.reshape(-1).tolist()
        conds = super().parse_conditions(conditions)
        if not conds:
            raise InvalidInputError("no conditions given.")
        return [class_label(c, self.model.config.num_classes, self.id2label) for c in conds]

    def scale_session(self, conditions: list[Any], sampling: Sampling) -> VARSession:
        labels = torch.tensor(self.parse_conditions(conditions), dtype=torch.long, device=self.model.device)
        return VARSession(self.model, self.vae, labels, cfg=sampling.guidance_scale > 0)

    def scale_guidance(self, si: int, sampling: Sampling) -> float:
        """The CFG weight ``1 + t`` of scale ``si`` (``t = cfg * si / (K - 1)``)."""
        return 1.0 + sampling.guidance_scale * si / (len(self.patch_nums) - 1)

    def codebook_embeddings(self) -> torch.Tensor:
        return self.vae.quantize.embedding.weight.detach()

    def token_embeddings(self) -> torch.Tensor:
        return self.model.word_embed(self.codebook_embeddings()).detach()

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) -> per-scale ids [(B, pn*pn)]."""
        if tokens.ndim != 2 or tokens.shape[1] != self.num_tokens:
            raise InvalidInputError(f"expected tokens (B, {self.num_tokens}), got {tuple(tokens.shape)}.")
        return list(tokens.long().split(self.model.config.scale_lengths, dim=1))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        return to_pil(self.vae.ids_to_img(self.split(tokens.to(self.model.device))))

    # ---- persistence ------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"architecture": "var", "var": asdict(self.model.config), "vae": asdict(self.vae.config),
                "id2label": self.id2label, "recommended": self.recommended}

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """``config.json`` + ``var.safetensors`` (optionally cast to ``dtype``) + ``vae.safetensors``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config_dict(), indent=2) + "\n")

        def cast(v: torch.Tensor) -> torch.Tensor:
            return v.to(dtype) if dtype is not None and v.is_floating_point() and torch.isfinite(v).all() else v

        save_file({k: cast(v.detach().cpu()).contiguous() for k, v in self.model.state_dict().items()},
                  str(path / "var.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.vae.state_dict().items()}, str(path / "vae.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: Any = None, dtype: Any = None) -> VARAdapter:
        from safetensors.torch import load_file

        path = Path(path)
        try:
            data = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UnsupportedModelError(f"{str(path)!r} has no readable config.json: {e}") from e
        if data.get("architecture") != "var":
            raise UnsupportedModelError(f"{str(path)!r} is not a VAR checkpoint (architecture={data.get('architecture')!r}).")
        model, vae = VAR(VARConfig(**data["var"])), VQVAE(VQVAEConfig(**data["vae"]))
        sd = load_file(str(path / "var.safetensors"))
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        vae.load_state_dict(load_file(str(path / "vae.safetensors")), strict=True)
        device = torch.device(device) if device is not None else torch.device("cpu")
        model = model.to(device=device, dtype=dtype if isinstance(dtype, torch.dtype) else None)
        return cls(model, vae.to(device), data.get("id2label"), data.get("recommended"))


# --------------------------------------------------------------------------------------------------
# official checkpoints
# --------------------------------------------------------------------------------------------------
def convert_official_checkpoint(
    var_pth: str | Path,
    vae_pth: str | Path,
    out_dir: str | Path,
    depth: int = 16,
    *,
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS,
    num_classes: int = 1000,
    vocab_size: int = 4096,
    z_channels: int = 32,
    ch: int = 160,
    share_quant_resi: int = 4,
    attn_l2_norm: bool = True,
    shared_aln: bool = False,
    id2label: list[str] | None = None,
    recommended: dict[str, Any] | None = None,
    var_overrides: dict[str, Any] | None = None,
    vae_overrides: dict[str, Any] | None = None,
) -> Path:
    """Convert official ``var_d{depth}.pth`` + ``vae_ch160v4096z32.pth`` (or CoDe's ``drafter_N.pth`` /
    ``refiner_N.pth``, same layout) to an mmfast directory. Strict loading: a wrong depth or layout raises
    :class:`UnsupportedModelError`. ``recommended`` defaults to the reference's FID sampling (cfg 1.5, top-k 900,
    top-p 0.96). ``var_overrides`` / ``vae_overrides`` change config fields on top of the official family
    (non-standard trainings). Returns ``out_dir``."""
    from mmfast.models.llamagen import load_official_state_dict

    var_sd = load_official_state_dict(var_pth)
    vae_sd = load_official_state_dict(vae_pth)
    vae_cfg = VQVAEConfig(**{"vocab_size": vocab_size, "z_channels": z_channels, "ch": ch,
                             "share_quant_resi": share_quant_resi, "v_patch_nums": list(patch_nums), **(vae_overrides or {})})
    var_cfg = VARConfig.from_depth(depth, **{
        "num_classes": num_classes, "patch_nums": list(patch_nums), "vocab_size": vocab_size, "z_channels": z_channels,
        "attn_l2_norm": attn_l2_norm, "shared_aln": shared_aln, **(var_overrides or {})})
    model, vae = VAR(var_cfg), VQVAE(vae_cfg)
    if vae_sd.get("quantize.ema_vocab_hit_SV") is not None and vae_sd["quantize.ema_vocab_hit_SV"].shape[0] != len(patch_nums):
        vae_sd["quantize.ema_vocab_hit_SV"] = vae.quantize.ema_vocab_hit_SV  # as the reference's load_state_dict
    try:
        model.load_state_dict(var_sd, strict=True)
        vae.load_state_dict(vae_sd, strict=True)
    except RuntimeError as e:
        raise UnsupportedModelError(f"checkpoint does not match VAR-d{depth} / VQVAE ch{ch} v{vocab_size} z{z_channels}: {e}") from e
    if recommended is None:
        recommended = {"guidance_scale": 1.5, "top_k": 900, "top_p": 0.96, "temperature": 1.0}
    VARAdapter(model, vae, id2label, recommended).save_pretrained(out_dir)
    return Path(out_dir)


__all__ = [
    "OFFICIAL_PATCH_NUMS", "VAR", "VARAdapter", "VARConfig", "VARSession", "VQVAE", "VQVAEConfig", "ScaleDraft",
    "convert_official_checkpoint",
]
