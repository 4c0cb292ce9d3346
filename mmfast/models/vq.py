"""LlamaGen's VQ image tokenizer (a VQGAN-style conv encoder / decoder around a vector quantizer), own implementation.

Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation", arXiv 2406.06525
(github.com/FoundationVision/LlamaGen, ``tokenizer/tokenizer_image/vq_model.py``). Parameter names and shapes
follow the official module, so its checkpoints load with ``load_state_dict(strict=True)``.

Official defaults (``VQ-16``): codebook 16384 x 8 with L2-normalised codes, ``ch`` 128, ``ch_mult``
(1, 1, 2, 2, 4) (16x downsampling), 2 res blocks per level, ``z_channels`` 256, GroupNorm(32 groups, eps 1e-6),
attention only at the lowest resolution, commitment beta 0.25. ``VQ-8`` uses ``ch_mult`` (1, 2, 2, 4).
``ch``, ``num_res_blocks`` and ``norm_groups`` are hard-coded officially; here they are config fields (defaults
unchanged) so tiny tokenizers can be trained.

With ``codebook_l2_norm`` the quantizer normalises both the latents and the codes before the nearest-neighbour
search and hands the *normalised* code to the decoder; :meth:`VQModel.codebook` gives the raw (pre-normalisation)
embedding weights by default and the normalised ones on request.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.errors import ConfigError, InvalidInputError


@dataclass
class VQConfig:
    """Fields of the official ``ModelArgs`` plus the architecture constants it hard-codes (``ch`` ...)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True  # keeps the official 65536-entry ``quantize.codebook_used`` buffer
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2
    norm_groups: int = 32
    in_channels: int = 3

    def __post_init__(self) -> None:
        self.encoder_ch_mult, self.decoder_ch_mult = list(self.encoder_ch_mult), list(self.decoder_ch_mult)
        widths = [self.ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult]
        if any(w % self.norm_groups for w in widths):
            raise ConfigError(f"every width ch * ch_mult ({sorted(set(widths))}) must divide by norm_groups={self.norm_groups}.")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ConfigError("encoder_ch_mult and decoder_ch_mult must have the same number of levels.")

    @property
    def downsample(self) -> int:
        """Pixels per token side (16 for VQ-16)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown VQ config keys {sorted(unknown)}.")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VQConfig:
        if name not in VQ_PRESETS:
            raise ConfigError(f"unknown VQ preset {name!r}; presets: {', '.join(VQ_PRESETS)}.")
        return cls(**{**VQ_PRESETS[name], **overrides})


#: the official ``VQ_models`` (codebook size / dim are passed separately there: 16384 x 8 by default)
VQ_PRESETS: dict[str, dict[str, Any]] = {
    "VQ-16": {"encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4]},
    "VQ-8": {"encoder_ch_mult": [1, 2, 2, 4], "decoder_ch_mult": [1, 2, 2, 4]},
}


# --------------------------------------------------------------------------------------------------
# building blocks (names follow the official module tree)
# --------------------------------------------------------------------------------------------------
def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # not F.silu: the fused kernel rounds differently from the official expression


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as officially
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad (right / bottom only), as in taming-transformers


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``res`` blocks (each followed by ``attn`` when present) and an optional resampler."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample_name: str | None, resample: nn.Module | None):
        super().__init__()
        self.res, self.attn = nn.ModuleList(res), nn.ModuleList(attn)
        self.resample_name = resample_name
        if resample_name is not None:
            self.add_module(resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return getattr(self, self.resample_name)(h) if self.resample_name else h


def _mid(c: int, groups: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c, groups, dropout), AttnBlock(c, groups), ResnetBlock(c, c, groups, dropout)])


class Encoder(nn.Module):
    """(B, 3, H, W) → (B, z_channels, H / 2^(levels-1), W / 2^(levels-1))."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, g, p = cfg.ch, cfg.encoder_ch_mult, cfg.norm_groups, cfg.dropout_p
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        levels, c = [], ch
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            res = [ResnetBlock(c if j == 0 else ch * m, ch * m, g, p) for j in range(cfg.num_res_blocks)]
            c = ch * m
            attn = [AttnBlock(c, g) for _ in range(cfg.num_res_blocks)] if last else []
            levels.append(_Level(res, attn, None if last else "downsample", None if last else Downsample(c)))
        self.conv_blocks = nn.ModuleList(levels)
        self.mid = _mid(c, g, p)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) → (B, 3, h * 2^(levels-1), w * 2^(levels-1)); levels run from the coarsest up."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, g, p = cfg.ch, cfg.decoder_ch_mult, cfg.norm_groups, cfg.dropout_p
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c, g, p)
        levels = []
        for i in reversed(range(len(mult))):
            top = i == len(mult) - 1  # the coarsest level carries the attention blocks
            res = [ResnetBlock(c if j == 0 else ch * mult[i], ch * mult[i], g, p) for j in range(cfg.num_res_blocks + 1)]
            c = ch * mult[i]
            attn = [AttnBlock(c, g) for _ in range(cfg.num_res_blocks + 1)] if top else []
            levels.append(_Level(res, attn, "upsample" if i else None, Upsample(c) if i else None))
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


def _entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-sample entropy minus entropy of the average assignment (encourages confident yet diverse codes)."""
    a = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = a.softmax(-1)
    avg = probs.mean(0)
    avg_entropy = -(avg * torch.log(avg + 1e-5)).sum()
    sample_entropy = -(probs * F.log_softmax(a + 1e-5, dim=-1)).sum(-1).mean()
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with a straight-through gradient; optional L2-normalised (cosine) codebook."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if cfg.codebook_l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if cfg.codebook_show_usage:  # rolling window of the last 65536 assigned codes (training only)
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codes(self) -> torch.Tensor:
        """(V, D) the vectors the decoder sees (normalised when ``codebook_l2_norm``)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.cfg.codebook_l2_norm else w

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """z (B, D, h, w) → (z_q (B, D, h, w) straight-through, indices (B, h, w), losses; empty in eval)."""
        z = z.permute(0, 2, 3, 1)
        if self.cfg.codebook_l2_norm:
            z = F.normalize(z, dim=-1)
        codes = self.codes()
        flat = z.reshape(-1, z.shape[-1])
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        idx = dist.argmin(1)
        z_q = codes[idx].view(z.shape)
        losses: dict[str, Any] = {}
        if self.training:
            losses["codebook"] = (z_q - z.detach()).pow(2).mean()
            losses["commit"] = self.cfg.commit_loss_beta * (z_q.detach() - z).pow(2).mean()
            losses["entropy"] = self.cfg.entropy_loss_ratio * _entropy_loss(-dist)
            if self.cfg.codebook_show_usage:
                with torch.no_grad():
                    used = torch.cat([self.codebook_used, idx.to(self.codebook_used.dtype)])[-self.codebook_used.numel() :]
                    self.codebook_used.copy_(used)
                losses["usage"] = len(torch.unique(self.codebook_used)) / self.cfg.codebook_size
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), idx.view(z.shape[:3]), losses


@dataclass
class VQOutput:
    recon: torch.Tensor  # (B, 3, H, W) in about [-1, 1]
    indices: torch.Tensor  # (B, h, w)
    losses: dict[str, Any]  # training only: codebook, commit, entropy (+ usage)


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer: ``encode`` images in [-1, 1] to code indices, ``decode_code`` them back."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → continuous latents (B, D, H / ds, W / ds) before quantization."""
        return self.quant_conv(self.encoder(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → code indices (B, H / ds, W / ds)."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise InvalidInputError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}.")
        return self.quantize(self.encode_latents(images))[1]

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, D, h, w) → images (B, 3, H, W)."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Code indices (B, h, w), or (B, h * w) with ``grid=(h, w)``, → images (B, 3, H, W) in about [-1, 1]."""
        if indices.ndim == 2:
            if grid is None:
                raise InvalidInputError("decode_code of flat (B, N) indices needs grid=(h, w).")
            indices = indices.reshape(indices.shape[0], *grid)
        quant = self.quantize.codes()[indices.to(self.quantize.embedding.weight.device)]  # (B, h, w, D)
        return self.decode(quant.permute(0, 3, 1, 2).contiguous())

    def codebook(self, normalized: bool = False) -> torch.Tensor:
        """(V, D) raw embedding weights (pre-normalisation; what latent-neighbour methods such as LANTERN use),
        or the L2-normalised codes the decoder actually receives with ``normalized=True``."""
        return self.quantize.codes() if normalized else self.quantize.embedding.weight

    def forward(self, images: torch.Tensor) -> VQOutput:
        quant, indices, losses = self.quantize(self.encode_latents(images))
        return VQOutput(recon=self.decode(quant), indices=indices, losses=losses)

    def loss(self, images: torch.Tensor, perceptual: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
        """A lean training objective: pixel MSE + codebook + commitment (+ entropy) [+ ``perceptual(recon, x)``].

        The official recipe adds LPIPS and a patch-GAN discriminator; pass a ``perceptual`` callable to add one.
        Returns (scalar loss, float terms for logging).
        """
        out = self(images)
        terms = {"recon": F.mse_loss(out.recon, images)}
        terms.update({k: v for k, v in out.losses.items() if torch.is_tensor(v)})
        if perceptual is not None:
            terms["perceptual"] = perceptual(out.recon, images)
        total = sum(terms.values())
        logs = {k: float(v.detach()) for k, v in terms.items()}
        if "usage" in out.losses:
            logs["usage"] = float(out.losses["usage"])
        return total, logs
