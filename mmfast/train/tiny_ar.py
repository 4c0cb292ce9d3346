"""tiny-ar: the zoo's LlamaGen-architecture class-to-image model, trained by mmfast on real handwritten digits.

Recipe (``mmfast zoo train tiny-ar``, or ``python -m mmfast.train.tiny_ar train``):

1. **VQ tokenizer** (:class:`~mmfast.models.vq.VQModel`, LlamaGen's architecture at toy width): 32x32 digit
   images (grey replicated to RGB, [-1, 1]) -> 8x8 = 64 tokens from an L2-normalised codebook, trained with pixel
   MSE + codebook + commitment losses (no GAN / LPIPS: the images are blurry 8x8 upsamplings anyway). Dead codes
   are re-seeded from encoder outputs during the first part of training so the whole codebook stays in use.
2. **Tokens**: every ``generator_train`` digit (898, the only digits tiny-ar sees) once as is plus ``aug_copies``
   augmented copies, encoded once.
3. **GPT** (:class:`~mmfast.models.llamagen.LlamaGen` c2i, 10 classes + null class for CFG, label dropout 0.1):
   teacher forcing on the token pool, bf16 autocast, AdamW with warmup + cosine decay.
4. **Sampling sweep**: guidance scale / temperature / top-k measured by class consistency AND Fréchet distance
   against held-out real digits (too much guidance collapses diversity, which Fréchet catches); the chosen
   setting is stored as the adapter's ``recommended`` sampling.

Augmentation happens at the source resolution: the 8x8 digit is resampled (bicubic) through a random affine map
(rotation, scale, aspect, shear, sub-pixel shift) plus a smooth elastic displacement, its ink gamma-jittered and
re-quantised to the 17 grey levels of ``load_digits``; then it is rendered by the same
:func:`mmfast.metrics.digits_to_images` as every real digit. Augmented digits therefore look exactly like real
ones (8x8 information upsampled bilinearly), which keeps the generator on the distribution Fréchet distance is
measured against.

Everything is resumable (``resume=True``): each stage checkpoints (safetensors + JSON, atomic renames) every few
minutes to ``work_dir`` and a finished stage is not re-run. Losses go to ``work_dir/log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmfast.models.llamagen import LlamaGen, LlamaGenAdapter, LlamaGenConfig
from mmfast.models.vq import VQConfig, VQModel

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
OUT_DIR = ZOO_DIR / "tiny_ar"
CURVES_PNG = ZOO_DIR / "tiny_ar_curves.png"
GRID_PNG = ZOO_DIR / "tiny_ar_grid.png"
ID2LABEL = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class TinyARRecipe:
    """Every knob of the recipe (the defaults are the shipped model's)."""

    seed: int = 0
    image_size: int = 32
    # ---- stage 1: VQ (32x32 -> 8x8 tokens)
    vq_ch: int = 16
    vq_ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    vq_res_blocks: int = 1
    vq_z_channels: int = 32
    vq_norm_groups: int = 8
    codebook_size: int = 512
    codebook_dim: int = 8
    vq_steps: int = 2500
    vq_batch: int = 32
    vq_lr: float = 2e-3
    vq_p_augment: float = 0.5  # fraction of each VQ batch that is augmented (the rest: real digits as is)
    vq_restart_every: int = 100  # re-seed codes unused since the last restart ...
    vq_restart_until: float = 0.6  # ... during this fraction of training (then let the codebook settle)
    # ---- stage 2: token pool
    aug_copies: int = 40
    # ---- stage 3: GPT
    dim: int = 192
    n_layer: int = 6
    n_head: int = 6
    dropout: float = 0.1  # token / residual / FFN dropout (the official default)
    class_dropout_prob: float = 0.1
    gpt_steps: int = 3500
    gpt_batch: int = 64
    gpt_lr: float = 1e-3
    gpt_warmup: int = 300
    gpt_weight_decay: float = 0.05
    p_original: float = 0.2  # probability that a GPT training sequence is an un-augmented digit
    bf16: bool = True  # autocast for the GPT (CPU avx512_bf16); weights stay float32
    eval_every: int = 500
    # ---- stage 4: sampling sweep
    sweep: list[dict[str, Any]] = field(default_factory=lambda: [
        {"guidance_scale": g, "temperature": 1.0, "top_k": 0} for g in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    ] + [
        {"guidance_scale": 2.0, "temperature": 0.9, "top_k": 0},
        {"guidance_scale": 2.0, "temperature": 1.0, "top_k": 64},
        {"guidance_scale": 3.0, "temperature": 0.9, "top_k": 0},
        {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 64},
    ])
    sweep_n: int = 500  # samples per setting (50 per class)
    sweep_seed: int = 1000
    min_consistency: float = 0.9  # recommended = lowest Fréchet distance among settings at least this consistent
    eval_n: int = 500
    eval_seed: int = 0  # final numbers use fresh samples, not the sweep's (= `mmfast zoo eval tiny-ar` defaults)
    ckpt_every_s: float = 180.0
    save_bf16: bool = True  # ship the GPT weights in bfloat16 (half the size; evaluated as shipped)

    @classmethod
    def quick(cls) -> TinyARRecipe:
        """A smoke configuration: tiny sizes, a few steps, a 2-setting sweep (about a minute)."""
        return cls(vq_ch=8, vq_z_channels=16, vq_norm_groups=4, codebook_size=64, vq_steps=30, vq_batch=16,
                   vq_restart_every=10, aug_copies=1, dim=64, n_layer=2, n_head=2, gpt_steps=30, gpt_batch=16,
                   gpt_warmup=5, eval_every=15, sweep=[{"guidance_scale": 1.0, "temperature": 1.0, "top_k": 0},
                                                       {"guidance_scale": 2.0, "temperature": 1.0, "top_k": 0}],
                   sweep_n=20, eval_n=20, ckpt_every_s=30.0)

    def vq_config(self) -> VQConfig:
        return VQConfig(codebook_size=self.codebook_size, codebook_embed_dim=self.codebook_dim, codebook_l2_norm=True,
                        codebook_show_usage=False, encoder_ch_mult=list(self.vq_ch_mult),
                        decoder_ch_mult=list(self.vq_ch_mult), z_channels=self.vq_z_channels, ch=self.vq_ch,
                        num_res_blocks=self.vq_res_blocks, norm_groups=self.vq_norm_groups, in_channels=3)

    def gpt_config(self) -> LlamaGenConfig:
        grid = self.image_size // 2 ** (len(self.vq_ch_mult) - 1)
        return LlamaGenConfig(dim=self.dim, n_layer=self.n_layer, n_head=self.n_head, num_classes=10,
                              class_dropout_prob=self.class_dropout_prob, vocab_size=self.codebook_size,
                              block_size=grid * grid, token_dropout_p=self.dropout, resid_dropout_p=self.dropout,
                              ffn_dropout_p=self.dropout, multiple_of=64, max_seq_len=grid * grid + 1)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def augment_digits(x8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random geometric + ink augmentation of raw digits at their own 8x8 resolution.

    Args:
        x8: (N, 8, 8) float raw digits, values 0..16 (as ``load_digits``).
    Returns:
        (N, 8, 8) float, values 0..16 re-quantised to integers (a digit ``load_digits`` could contain).
    """
    n = x8.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    ang = u(-10.0, 10.0) * math.pi / 180
    scale, aspect, shear = u(0.9, 1.1), u(-0.06, 0.06), u(-0.12, 0.12)
    sx, sy = 1 / (scale * (1 + aspect)), 1 / (scale * (1 - aspect))  # output -> input coordinates: inverse scale
    tx, ty = u(-0.5, 0.5) * 2 / 8, u(-0.5, 0.5) * 2 / 8  # up to half a source pixel (2 px at 32x32)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos * sx, (-sin + shear) * sx, tx], 1),
                         torch.stack([sin * sy, cos * sy, ty], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, 8, 8], align_corners=False)
    # smooth elastic displacement: 3x3 random offsets upsampled to the 8x8 grid, ~0.3 source px
    disp = torch.randn(n, 2, 3, 3, generator=gen) * (0.3 * 2 / 8)
    grid = grid + F.interpolate(disp, size=(8, 8), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    out = F.grid_sample(x8[:, None].float() / 16.0, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    out = out.clamp(0.0, 1.0) ** u(0.8, 1.25).view(n, 1, 1, 1)  # ink gamma: thinner / bolder strokes
    return torch.round(out[:, 0] * 16.0)


def render(x8: torch.Tensor | np.ndarray, size: int = 32) -> torch.Tensor:
    """Raw digits (N, 8, 8) 0..16 -> VQ input (N, 3, size, size) in [-1, 1] through THE metrics preprocessing."""
    from mmfast.metrics import digits_to_images

    return digits_to_images(x8, size=size, rgb=True) * 2.0 - 1.0


def generator_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 898 ``generator_train`` digits: (N, 8, 8) float 0..16 and labels (N,) long."""
    from mmfast.metrics import digit_splits

    X, y = digit_splits(0)["generator_train"]
    return torch.from_numpy(X.astype(np.float32)), torch.from_numpy(y)


# --------------------------------------------------------------------------------------------------
# checkpoints: safetensors for tensors, JSON metadata, atomic renames
# --------------------------------------------------------------------------------------------------
def _save_ckpt(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any],
               gens: dict[str, torch.Generator]) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    for i, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
    tensors["rng.global"] = torch.get_rng_state()
    for name, g in gens.items():
        tensors[f"rng.{name}"] = g.get_state()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta), "param_groups": json.dumps(osd["param_groups"])})
    os.replace(tmp, path)


def _load_ckpt(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
               gens: dict[str, torch.Generator]) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        md = f.metadata()
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(md["param_groups"])})
    torch.set_rng_state(tensors["rng.global"])
    for name, g in gens.items():
        g.set_state(tensors[f"rng.{name}"])
    return json.loads(md["meta"])


class _Log:
    """Append-only JSON-lines loss log (rows after a resumed checkpoint's step are superseded by later rows)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, **row: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self, stage: str) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out: dict[tuple[int, str], dict[str, Any]] = {}
        for line in self.path.read_text().splitlines():
            r = json.loads(line)
            if r.get("stage") == stage:
                out[(r["step"], r.get("kind", "train"))] = r  # last write wins (a resumed run re-logs some steps)
        return sorted(out.values(), key=lambda r: r["step"])


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak (stateless, so resuming needs no scheduler state)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# --------------------------------------------------------------------------------------------------
# stage 1: VQ
# --------------------------------------------------------------------------------------------------
def _vq_batch(x8: torch.Tensor, r: TinyARRecipe, gen: torch.Generator) -> torch.Tensor:
    """A VQ training batch (vq_batch, 3, 32, 32) in [-1, 1]: real digits, a fraction of them augmented."""
    idx = torch.randint(0, len(x8), (r.vq_batch,), generator=gen)
    b = x8[idx]
    aug = torch.rand(r.vq_batch, generator=gen) < r.vq_p_augment
    if aug.any():
        b[aug] = augment_digits(b[aug], gen)
    return render(b, r.image_size)


@torch.no_grad()
def _restart_dead_codes(vq: VQModel, x: torch.Tensor, used: torch.Tensor, gen: torch.Generator) -> int:
    """Re-seed codes not assigned since the last restart with random (normalised) encoder outputs of batch x."""
    dead = (~used).nonzero().flatten()
    if len(dead) == 0:
        return 0
    z = F.normalize(vq.encode_latents(x).permute(0, 2, 3, 1).reshape(-1, vq.config.codebook_embed_dim), dim=-1)
    pick = torch.randint(0, len(z), (len(dead),), generator=gen)
    noise = 0.02 * torch.randn(len(dead), z.shape[1], generator=gen)
    vq.quantize.embedding.weight[dead] = F.normalize(z[pick] + noise, dim=-1)
    return len(dead)


@torch.no_grad()
def vq_report(vq: VQModel, x8: torch.Tensor, size: int = 32) -> dict[str, float]:
    """Reconstruction of real digits (N, 8, 8): MSE in [-1, 1] units, PSNR on [0, 1], codebook usage."""
    vq.eval()
    x = render(x8, size)
    idx = vq.encode(x)
    rec = vq.decode_code(idx).clamp(-1, 1)
    mse = float(F.mse_loss(rec, x))
    psnr = 10 * math.log10(4.0 / max(mse, 1e-12))  # range 2 in [-1, 1] == range 1 in [0, 1]
    return {"recon_mse": mse, "psnr_db": psnr, "codes_used": int(idx.unique().numel()),
            "codebook_size": vq.config.codebook_size}


def train_vq(r: TinyARRecipe, work: Path, log: _Log, resume: bool) -> VQModel:
    final, ckpt = work / "vq_final.safetensors", work / "vq_ckpt.safetensors"
    torch.manual_seed(r.seed)
    vq = VQModel(r.vq_config())
    if resume and final.is_file():
        from safetensors.torch import load_file

        vq.load_state_dict(load_file(str(final)))
        return vq.eval()
    x8, _ = generator_digits()
    gen = torch.Generator().manual_seed(r.seed + 1)
    opt = torch.optim.AdamW(vq.parameters(), lr=r.vq_lr, betas=(0.9, 0.99), weight_decay=1e-4)
    start, elapsed = 0, 0.0
    if resume and ckpt.is_file():
        meta = _load_ckpt(ckpt, vq, opt, {"data": gen})
        start, elapsed = meta["step"], meta["elapsed"]
    used = torch.zeros(r.codebook_size, dtype=torch.bool)
    t0, last_ckpt = time.perf_counter() - elapsed, time.perf_counter()
    bar = tqdm(range(start, r.vq_steps), desc="tiny-ar 1/3 VQ", initial=start, total=r.vq_steps)
    vq.train()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, r.vq_steps, r.vq_lr, warmup=max(r.vq_steps // 50, 1))
        x = _vq_batch(x8, r, gen)
        out = vq(x)
        used[out.indices.flatten()] = True
        terms = {"recon": F.mse_loss(out.recon, x), **{k: v for k, v in out.losses.items() if torch.is_tensor(v)}}
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        restarted = 0
        if (step + 1) % r.vq_restart_every == 0:
            if step < r.vq_restart_until * r.vq_steps:
                restarted = _restart_dead_codes(vq, x, used, gen)
            row = {k: round(float(v.detach()), 6) for k, v in terms.items()}
            log(stage="vq", step=step + 1, loss=round(float(loss.detach()), 6), usage=float(used.float().mean()),
                restarted=restarted, t=round(time.perf_counter() - t0, 1), **row)
            used.zero_()
        bar.set_postfix(recon=f"{float(terms['recon'].detach()):.4f}", refresh=False)
        if time.perf_counter() - last_ckpt > r.ckpt_every_s:
            _save_ckpt(ckpt, vq, opt, {"step": step + 1, "elapsed": time.perf_counter() - t0}, {"data": gen})
            last_ckpt = time.perf_counter()
    bar.close()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(final))
    _stage_time(work, "vq_seconds", time.perf_counter() - t0)
    return vq.eval()


# --------------------------------------------------------------------------------------------------
# stage 2: token pool
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_pool(r: TinyARRecipe, vq: VQModel, work: Path, resume: bool) -> dict[str, torch.Tensor]:
    """Tokens (M, 64) of every generator_train digit as is (first 898 rows) and ``aug_copies`` augmented copies."""
    from safetensors.torch import load_file, save_file

    path = work / "tokens.safetensors"
    if resume and path.is_file():
        return load_file(str(path))
    t0 = time.perf_counter()
    x8, y = generator_digits()
    gen = torch.Generator().manual_seed(r.seed + 2)
    chunks = [x8] + [augment_digits(x8, gen) for _ in range(r.aug_copies)]
    vq.eval()
    toks = []
    for c in tqdm(chunks, desc="tiny-ar 2/3 tokens"):
        toks += [vq.encode(render(b, r.image_size)).flatten(1) for b in c.split(256)]
    pool = {"tokens": torch.cat(toks).to(torch.int16), "labels": y.repeat(len(chunks)),
            "original": torch.arange(len(chunks) * len(y)) < len(y)}
    save_file(pool, str(path))
    _stage_time(work, "tokens_seconds", time.perf_counter() - t0)
    return pool


@torch.no_grad()
def _encode_split(vq: VQModel, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from mmfast.metrics import digit_splits

    X, y = digit_splits(0)[split]
    return vq.encode(render(X.astype(np.float32), size)).flatten(1), torch.from_numpy(y)


# --------------------------------------------------------------------------------------------------
# stage 3: GPT
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def _eval_loss(gpt: LlamaGen, tokens: torch.Tensor, labels: torch.Tensor, bf16: bool) -> float:
    gpt.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = float(gpt.loss(tokens.long(), labels))
    gpt.train()
    return loss


def train_gpt(r: TinyARRecipe, vq: VQModel, pool: dict[str, torch.Tensor], work: Path, log: _Log,
              resume: bool) -> LlamaGen:
    from safetensors.torch import load_file, save_file

    final, ckpt = work / "gpt_final.safetensors", work / "gpt_ckpt.safetensors"
    torch.manual_seed(r.seed + 3)
    gpt = LlamaGen(r.gpt_config())
    if resume and final.is_file():
        gpt.load_state_dict(load_file(str(final)))
        return gpt.eval()
    # "heldout" loss is monitoring only (no selection is made on it); "train_orig" = the 898 real training digits
    val = _encode_split(vq, "heldout", r.image_size)
    n_orig = int(pool["original"].sum())
    tr_orig = (pool["tokens"][:n_orig], pool["labels"][:n_orig])
    weights = torch.where(pool["original"], r.p_original / n_orig,
                          (1 - r.p_original) / max(int((~pool["original"]).sum()), 1))
    decay = [p for n, p in gpt.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in gpt.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.gpt_weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r.gpt_lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(r.seed + 4)
    start, elapsed = 0, 0.0
    if resume and ckpt.is_file():
        meta = _load_ckpt(ckpt, gpt, opt, {"data": gen})
        start, elapsed = meta["step"], meta["elapsed"]
    t0, last_ckpt = time.perf_counter() - elapsed, time.perf_counter()
    gpt.train()
    bar = tqdm(range(start, r.gpt_steps), desc="tiny-ar 3/3 GPT", initial=start, total=r.gpt_steps)
    run = None
    for step in bar:
        lr = _lr(step, r.gpt_steps, r.gpt_lr, r.gpt_warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.multinomial(weights, r.gpt_batch, replacement=True, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
            loss = gpt.loss(pool["tokens"][idx].long(), pool["labels"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        cur = loss.item()
        run = cur if run is None else 0.98 * run + 0.02 * cur
        bar.set_postfix(loss=f"{run:.3f}", refresh=False)
        if (step + 1) % 50 == 0:
            log(stage="gpt", step=step + 1, loss=round(cur, 5), lr=lr, t=round(time.perf_counter() - t0, 1))
        if (step + 1) % r.eval_every == 0 or step + 1 == r.gpt_steps:
            log(stage="gpt", kind="eval", step=step + 1, heldout=round(_eval_loss(gpt, *val, r.bf16), 5),
                train_orig=round(_eval_loss(gpt, *tr_orig, r.bf16), 5))
        if time.perf_counter() - last_ckpt > r.ckpt_every_s:
            _save_ckpt(ckpt, gpt, opt, {"step": step + 1, "elapsed": time.perf_counter() - t0}, {"data": gen})
            last_ckpt = time.perf_counter()
    bar.close()
    save_file({k: v.contiguous() for k, v in gpt.state_dict().items()}, str(final))
    _stage_time(work, "gpt_seconds", time.perf_counter() - t0)
    return gpt.eval()


# --------------------------------------------------------------------------------------------------
# stage 4: sampling sweep and evaluation
# --------------------------------------------------------------------------------------------------
def balanced_labels(n: int) -> list[int]:
    """n labels cycling 0..9 (n / 10 per class when n is a multiple of 10)."""
    return [i % 10 for i in range(n)]


def evaluate(adapter: LlamaGenAdapter | str = "tiny-ar", n: int = 500, seed: int = 0, batch: int = 250,
             n_boot: int = 500, accelerate: Any = None, progress: bool = False, **sampling: Any) -> dict[str, Any]:
    """Class consistency and Fréchet distance of ``n`` samples (n / 10 per class) through ``class-to-image``.

    Unset ``sampling`` keys (guidance_scale, temperature, top_k, top_p) come from the model's ``recommended``.
    ``accelerate`` is passed to the pipeline (a decoder spec such as SJD is measured the same way). Returns
    consistency and FD (each with a 95% bootstrap interval) and the real-vs-real FD floor at the same n (keep
    n <= 898: beyond, the floor's real digits repeat and its FD is inflated).
    """
    import mmfast
    from mmfast.metrics import class_consistency_ci, digit_frechet, frechet_floor

    pipe = mmfast.pipeline("class-to-image", model=adapter, accelerate=accelerate)
    labels = balanced_labels(n)
    images, t0 = [], time.perf_counter()
    gen = torch.Generator().manual_seed(seed)  # one stream across batches: the n samples are one seeded draw
    for i in tqdm(range(0, n, batch), desc="sampling", disable=not progress):
        images += pipe(labels[i : i + batch], generator=gen, progress=False, **sampling).images
    gen_s = time.perf_counter() - t0
    cc, cc_ci = class_consistency_ci(images, labels)
    fd, fd_ci = digit_frechet(images, n_boot=n_boot)
    floor, floor_ci = frechet_floor(n=n, n_boot=n_boot)
    used = pipe._sampling(**sampling)
    return {"n": n, "seed": seed, "accelerate": pipe.accelerate.spec(), "sampling": asdict(used), "class_consistency": cc, "class_consistency_ci": cc_ci,
            "frechet": fd, "frechet_ci": fd_ci, "frechet_floor": floor, "frechet_floor_ci": floor_ci,
            "sample_seconds": round(gen_s, 1), "images": images}


def format_eval(res: dict[str, Any]) -> str:
    s = res["sampling"]
    return (f"tiny-ar [{res['accelerate']}], {res['n']} samples ({res['n'] // 10} per class), seed {res['seed']}, "
            f"guidance {s['guidance_scale']}, temperature {s['temperature']}, top_k {s['top_k']}, top_p {s['top_p']}\n"
            f"  class consistency      {100 * res['class_consistency']:.1f}%  95% CI "
            f"[{100 * res['class_consistency_ci'][0]:.1f}, {100 * res['class_consistency_ci'][1]:.1f}]\n"
            f"  Frechet vs held-out    {res['frechet']:.2f}  95% CI [{res['frechet_ci'][0]:.2f}, {res['frechet_ci'][1]:.2f}]\n"
            f"  real-vs-real floor     {res['frechet_floor']:.2f}  95% CI "
            f"[{res['frechet_floor_ci'][0]:.2f}, {res['frechet_floor_ci'][1]:.2f}]  (n={res['n']})\n"
            f"  sampling time          {res['sample_seconds']:.1f} s")


def run_sweep(r: Any, adapter: Any, work: Path, resume: bool, desc: str = "tiny-ar sweep") -> list[dict[str, Any]]:
    """Evaluate every ``r.sweep`` setting (``r.sweep_n`` samples, seed ``r.sweep_seed``); rows saved to
    ``work/sweep.json`` as they finish, so a resumed run skips the done ones."""
    path = work / "sweep.json"
    rows = json.loads(path.read_text()) if resume and path.is_file() else []
    done = {json.dumps(row["setting"], sort_keys=True) for row in rows}
    t0 = time.perf_counter()
    for setting in tqdm(r.sweep, desc=desc):
        if json.dumps(setting, sort_keys=True) in done:
            continue
        res = evaluate(adapter, n=r.sweep_n, seed=r.sweep_seed, n_boot=200, **setting)
        rows.append({"setting": setting, **{k: v for k, v in res.items() if k not in ("images", "sampling")}})
        path.write_text(json.dumps(rows, indent=1))
    _stage_time(work, "sweep_seconds", time.perf_counter() - t0, add=True)
    return rows


def choose(rows: Sequence[dict[str, Any]], min_consistency: float) -> dict[str, Any]:
    """Lowest Fréchet distance among settings with consistency >= ``min_consistency`` (else the most consistent)."""
    ok = [row for row in rows if row["class_consistency"] >= min_consistency]
    best = min(ok, key=lambda row: row["frechet"]) if ok else max(rows, key=lambda row: row["class_consistency"])
    return {**best["setting"], "top_p": 1.0}


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------
def plot_curves(log: _Log, sweep: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    vq = log.rows("vq")
    if vq:
        s = [row["step"] for row in vq]
        ax[0].semilogy(s, [row["recon"] for row in vq], label="recon MSE (train batch)")
        ax[0].semilogy(s, [row["commit"] for row in vq], label="commitment")
        tw = ax[0].twinx()
        tw.plot(s, [row["usage"] for row in vq], "g:", label="codebook usage")
        tw.set_ylim(0, 1.05)
        tw.set_ylabel("fraction of codes used / 100 steps")
        ax[0].set_title("stage 1: VQ")
        ax[0].set_xlabel("step")
        ax[0].legend(loc="upper right")
    rows = log.rows("gpt")
    tr = [row for row in rows if row.get("kind", "train") == "train"]
    ev = [row for row in rows if row.get("kind") == "eval"]
    if tr:
        s, v = np.array([row["step"] for row in tr]), np.array([row["loss"] for row in tr])
        k = max(1, len(v) // 40)
        ax[1].plot(s, v, alpha=0.3, color="C0")
        ax[1].plot(s[k - 1 :], np.convolve(v, np.ones(k) / k, mode="valid"), color="C0", label="train (augmented pool)")
    if ev:
        s = [row["step"] for row in ev]
        ax[1].plot(s, [row["train_orig"] for row in ev], "o-", color="C1", label="898 training digits (eval mode)")
        ax[1].plot(s, [row["heldout"] for row in ev], "s-", color="C3", label="449 held-out digits (eval mode)")
    ax[1].set_title("stage 3: GPT next-token cross-entropy")
    ax[1].set_xlabel("step")
    ax[1].legend()
    if sweep:
        for row in sweep:
            st = row["setting"]
            ax[2].errorbar(row["frechet"], 100 * row["class_consistency"],
                           xerr=[[row["frechet"] - row["frechet_ci"][0]], [row["frechet_ci"][1] - row["frechet"]]],
                           fmt="o", capsize=2)
            ax[2].annotate(f"g{st['guidance_scale']:g} T{st['temperature']:g} k{st['top_k']}",
                           (row["frechet"], 100 * row["class_consistency"]), fontsize=7)
        ax[2].axvline(sweep[0]["frechet_floor"], ls="--", color="grey", label=f"real-vs-real floor (n={sweep[0]['n']})")
        ax[2].set_xlabel("Fréchet distance to held-out digits (lower = better)")
        ax[2].set_ylabel("class consistency %")
        ax[2].set_title("stage 4: sampling sweep")
        ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@torch.no_grad()
def save_reconstructions(vq: VQModel, path: Path, n: int = 20) -> None:
    """Top row: n held-out real digits; bottom row: their VQ reconstructions (decode(encode(x)))."""
    from mmfast.metrics import digit_splits
    from mmfast.models.argen import to_pil
    from mmfast.pipelines.image_gen import image_grid

    x = render(digit_splits(0)["heldout"][0][:n].astype(np.float32))
    rec = vq.decode_code(vq.encode(x))
    image_grid(to_pil(torch.cat([x, rec])), cols=n, scale=2).save(path)


def save_grid(adapter: LlamaGenAdapter, path: Path, rows: int = 8, seed: int = 0) -> None:
    """rows x 10 samples at the recommended sampling; column c is class c."""
    import mmfast
    from mmfast.pipelines.image_gen import image_grid

    pipe = mmfast.pipeline("class-to-image", model=adapter)
    images = pipe(list(range(10)) * rows, seed=seed, progress=False).images
    image_grid(images, cols=10, scale=2).save(path)


# --------------------------------------------------------------------------------------------------
# the whole recipe
# --------------------------------------------------------------------------------------------------
def _stage_time(work: Path, key: str, seconds: float, add: bool = False) -> None:
    path = work / "times.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[key] = round(times.get(key, 0.0) * add + seconds, 1)
    path.write_text(json.dumps(times, indent=1))


def _round_bf16(gpt: torch.nn.Module) -> Any:
    """Round the weights to bfloat16 (what ships) but keep float32 modules, so the sweep evaluates the shipped model."""
    with torch.no_grad():
        for p in gpt.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return gpt


_STAGE_FILES = ("vq_ckpt.safetensors", "vq_final.safetensors", "tokens.safetensors", "gpt_ckpt.safetensors",
                "gpt_final.safetensors", "sweep.json")


def _auto_threads() -> int:
    """Both cores on an idle machine, one when it is busy: with more runnable threads than cores, 2-thread
    OpenMP steps of these small convolutions wait at barriers and ran 100x slower than one thread (measured)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        load = 0.0
    return 1 if load >= cores - 0.5 else cores


def train(out_dir: str | Path | None = OUT_DIR, work_dir: str | Path = "mmfast-train/tiny-ar", resume: bool = False,
          steps: int | None = None, quick: bool = False, recipe: TinyARRecipe | None = None,
          log: Callable[[str], None] = print, figures: bool | None = None, threads: int | None = None) -> Path:
    """Run the recipe and save the adapter to ``out_dir`` (``None``: ``work_dir/model``); returns ``out_dir``.

    ``work_dir`` holds the stage checkpoints, ``log.jsonl``, ``sweep.json`` and ``report.json``; ``resume=True``
    continues from them. ``steps`` caps the VQ and GPT steps and shrinks the sweep / final evaluation to 100
    samples (smoke runs); ``quick`` uses :meth:`TinyARRecipe.quick`. ``figures`` (default: for the shipped
    model) writes the loss curves and a sample grid next to the zoo directory, else into ``out_dir``.
    """
    from mmfast.errors import MMFastError

    torch.set_num_threads(threads or _auto_threads())
    r = recipe or (TinyARRecipe.quick() if quick else TinyARRecipe())
    if steps is not None:
        r = TinyARRecipe(**{**asdict(r), "vq_steps": min(r.vq_steps, steps), "gpt_steps": min(r.gpt_steps, steps),
                            "sweep_n": min(r.sweep_n, 100), "eval_n": min(r.eval_n, 100)})
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = work / "recipe.json"
    if not resume and any((work / f).exists() for f in _STAGE_FILES):
        raise MMFastError(f"{work} already holds a tiny-ar run: pass --resume to continue it, or another --work-dir")
    if resume and recipe_path.is_file() and json.loads(recipe_path.read_text()) != asdict(r):
        raise MMFastError(f"{recipe_path} holds a different recipe: resume with the same options or another --work-dir")
    if not resume:
        for name in ("log.jsonl", "times.json", "report.json"):
            (work / name).unlink(missing_ok=True)
    recipe_path.write_text(json.dumps(asdict(r), indent=1))
    log(f"tiny-ar training with {torch.get_num_threads()} CPU thread(s) in {work}")
    losses = _Log(work / "log.jsonl")
    t_all = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        vq = train_vq(r, work, losses, resume)
        from mmfast.metrics import digit_splits

        vq_train = vq_report(vq, generator_digits()[0], r.image_size)
        vq_heldout = vq_report(vq, torch.from_numpy(digit_splits(0)["heldout"][0].astype(np.float32)), r.image_size)
        log(f"VQ reconstruction: generator_train {vq_train}, heldout {vq_heldout}")
        pool = encode_pool(r, vq, work, resume)
        gpt = train_gpt(r, vq, pool, work, losses, resume)
        if r.save_bf16:
            _round_bf16(gpt)
        adapter = LlamaGenAdapter(gpt, vq, ID2LABEL, {"guidance_scale": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0})
        sweep = run_sweep(r, adapter, work, resume)
        adapter.recommended = choose(sweep, r.min_consistency)
        t_eval = time.perf_counter()
        final = evaluate(adapter, n=r.eval_n, seed=r.eval_seed)
        _stage_time(work, "final_eval_seconds", time.perf_counter() - t_eval)
    times = json.loads((work / "times.json").read_text())
    times["this_run_seconds"] = round(time.perf_counter() - t_all, 1)
    report = {"recipe": asdict(r), "threads": torch.get_num_threads(), "times": times,
              "vq_recon": {"generator_train": vq_train, "heldout": vq_heldout},
              "gpt_params": sum(p.numel() for p in gpt.parameters()),
              "vq_params": sum(p.numel() for p in vq.parameters()), "pool_sequences": int(len(pool["tokens"])),
              "sweep": sweep, "recommended": adapter.recommended,
              "final": {k: v for k, v in final.items() if k != "images"}}
    (work / "report.json").write_text(json.dumps(report, indent=1))
    out = Path(out_dir) if out_dir is not None else work / "model"
    save = LlamaGenAdapter(_bf16_copy(gpt) if r.save_bf16 else gpt, vq, ID2LABEL, adapter.recommended)
    save.save_pretrained(out)
    for f in out.glob("*.safetensors"):
        f.chmod(0o644)  # safetensors writes 0600; package data must be world-readable
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    shipped = out.resolve() == OUT_DIR
    if figures if figures is not None else shipped:
        plot_curves(losses, sweep, CURVES_PNG if shipped else out / "curves.png")
        save_grid(adapter, GRID_PNG if shipped else out / "grid.png")
        save_reconstructions(vq, work / "reconstructions.png")
    log(json.dumps({"recommended": adapter.recommended, "times": times}))
    log(format_eval(final))
    return out


def _bf16_copy(gpt: LlamaGen) -> LlamaGen:
    import copy

    return copy.deepcopy(gpt).to(torch.bfloat16)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmfast.train.tiny_ar", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run the recipe")
    t.add_argument("--out", default=str(OUT_DIR))
    t.add_argument("--work-dir", default="mmfast-train/tiny-ar")
    t.add_argument("--quick", action="store_true", help="tiny smoke configuration (about a minute)")
    t.add_argument("--steps", type=int, default=None, help="cap the VQ and GPT steps (smoke run)")
    t.add_argument("--resume", action="store_true", help="continue from the work dir's checkpoints")
    e = sub.add_parser("eval", help="class consistency + Fréchet distance of the shipped (or given) model")
    e.add_argument("--model", default="tiny-ar")
    e.add_argument("-n", type=int, default=500)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--accelerate", default=None)
    e.add_argument("--guidance-scale", type=float, default=None)
    e.add_argument("--temperature", type=float, default=None)
    e.add_argument("--top-k", type=int, default=None)
    a = p.parse_args(argv)
    if a.cmd == "train":
        smoke = a.quick or a.steps is not None
        train(None if smoke and a.out == str(OUT_DIR) else a.out, a.work_dir, resume=a.resume, steps=a.steps,
              quick=a.quick)
    else:
        res = evaluate(a.model, n=a.n, seed=a.seed, accelerate=a.accelerate, progress=True,
                       guidance_scale=a.guidance_scale, temperature=a.temperature, top_k=a.top_k)
        print(format_eval(res))


if __name__ == "__main__":
    main()
