"""tiny-var / tiny-var-small: the zoo's VAR pair (CoDe's drafter and refiner), trained by mmfast on real digits.

Recipe (``mmfast zoo train tiny-var``, or ``python -m mmfast.train.tiny_var train``):

1. **Multi-scale VQ-VAE** (:class:`~mmfast.models.var.VQVAE`, VAR's layout at toy width): 32x32 digits (the same
   rendering as tiny-ar and the metrics) -> an 8x8 latent quantised over scales 1-2-3-4-6-8 (130 tokens) with one
   shared codebook; pixel MSE + VAR's multi-scale VQ loss (no GAN / LPIPS, as tiny-ar); dead codes are re-seeded
   from residual vectors of the batch during the first part of training.
2. **Token pool**: every ``generator_train`` digit (898) as is plus ``aug_copies`` augmented copies (tiny-ar's
   augmentation), encoded once to per-scale ids.
3. **Drafter** (``tiny-var``, the larger) and **refiner** (``tiny-var-small``) VAR transformers, trained the same
   way one after the other: teacher forcing on the pool (inputs = the accumulated ``f_hat`` downsampled to the next
   scale), uniform per-token cross entropy as the reference, class dropout 0.1 for CFG, the reference's
   initialisation, AdamW with warmup + cosine, bf16 autocast.
4. **Sampling sweep** on the drafter (CFG ramp end / top-k): class consistency and Fréchet distance against
   held-out digits; the chosen setting is both models' ``recommended`` sampling.

Both directories carry the same VQ-VAE (CoDe hands latents across, so the pair must share it). Resumable
(``resume=True``): each stage checkpoints every few minutes to ``work_dir``; a finished stage is not re-run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmfast.models.var import VAR, VQVAE, VARAdapter, VARConfig, VQVAEConfig
from mmfast.train.tiny_ar import (
    ID2LABEL,
    _auto_threads,
    _load_ckpt,
    _Log,
    _lr,
    _round_bf16,
    _save_ckpt,
    _stage_time,
    augment_digits,
    choose,
    evaluate,
    generator_digits,
    render,
    run_sweep,
)

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
OUT_DIR, SMALL_DIR = ZOO_DIR / "tiny_var", ZOO_DIR / "tiny_var_small"
CURVES_PNG, GRID_PNG = ZOO_DIR / "tiny_var_curves.png", ZOO_DIR / "tiny_var_grid.png"


@dataclass
class TinyVARRecipe:
    """Every knob of the recipe (the defaults are the shipped pair's)."""

    seed: int = 0
    image_size: int = 32
    patch_nums: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8])
    # ---- stage 1: multi-scale VQ-VAE (32x32 -> 8x8)
    vq_ch: int = 16
    vq_ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    vq_res_blocks: int = 1
    vq_norm_groups: int = 8
    vocab_size: int = 512
    z_channels: int = 16
    vq_steps: int = 1500
    vq_batch: int = 32
    vq_lr: float = 2e-3
    vq_p_augment: float = 0.5
    vq_restart_every: int = 100
    vq_restart_until: float = 0.6
    # ---- stage 2: token pool
    aug_copies: int = 40
    # ---- stage 3: transformers (drafter, refiner)
    drafter: dict[str, int] = field(default_factory=lambda: {"depth": 6, "embed_dim": 128, "num_heads": 4})
    refiner: dict[str, int] = field(default_factory=lambda: {"depth": 3, "embed_dim": 64, "num_heads": 2})
    drafter_steps: int = 1800
    refiner_steps: int = 1800
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.05
    cond_drop_rate: float = 0.1
    p_original: float = 0.2
    bf16: bool = False  # bf16 autocast ran 8x slower than float32 on this CPU (no native bf16 matmul)
    eval_every: int = 500
    # ---- stage 4: sampling sweep (guidance_scale = the reference's cfg: the ramp's end)
    sweep: list[dict[str, Any]] = field(default_factory=lambda: [
        {"guidance_scale": g, "temperature": 1.0, "top_k": 0} for g in (0.0, 1.0, 2.0, 3.0, 4.0, 6.0)
    ] + [{"guidance_scale": 3.0, "temperature": 1.0, "top_k": 64}, {"guidance_scale": 4.0, "temperature": 1.0, "top_k": 64}])
    sweep_n: int = 500
    sweep_seed: int = 1000
    min_consistency: float = 0.9
    eval_n: int = 500
    eval_seed: int = 0
    ckpt_every_s: float = 180.0

    @classmethod
    def quick(cls) -> TinyVARRecipe:
        """A smoke configuration (about a minute)."""
        return cls(vq_ch=8, vq_norm_groups=4, vocab_size=64, z_channels=8, vq_steps=20, vq_batch=8, vq_restart_every=10,
                   aug_copies=1, drafter={"depth": 2, "embed_dim": 32, "num_heads": 2},
                   refiner={"depth": 1, "embed_dim": 16, "num_heads": 2}, drafter_steps=20, refiner_steps=20, batch=8,
                   warmup=5, eval_every=10, sweep=[{"guidance_scale": 0.0, "temperature": 1.0, "top_k": 0},
                                                   {"guidance_scale": 2.0, "temperature": 1.0, "top_k": 0}],
                   sweep_n=20, eval_n=20, ckpt_every_s=30.0)

    def vae_config(self) -> VQVAEConfig:
        return VQVAEConfig(vocab_size=self.vocab_size, z_channels=self.z_channels, ch=self.vq_ch,
                           ch_mult=list(self.vq_ch_mult), num_res_blocks=self.vq_res_blocks, using_sa=False,
                           using_mid_sa=True, norm_groups=self.vq_norm_groups, v_patch_nums=list(self.patch_nums))

    def var_config(self, which: str) -> VARConfig:
        return VARConfig(num_classes=10, vocab_size=self.vocab_size, z_channels=self.z_channels,
                         patch_nums=list(self.patch_nums), cond_drop_rate=self.cond_drop_rate,
                         **(self.drafter if which == "drafter" else self.refiner))


# --------------------------------------------------------------------------------------------------
# stage 1: VQ-VAE
# --------------------------------------------------------------------------------------------------
def _vq_batch(x8: torch.Tensor, r: TinyVARRecipe, gen: torch.Generator) -> torch.Tensor:
    b = x8[torch.randint(0, len(x8), (r.vq_batch,), generator=gen)]
    aug = torch.rand(r.vq_batch, generator=gen) < r.vq_p_augment
    if aug.any():
        b[aug] = augment_digits(b[aug], gen)
    return render(b, r.image_size)


@torch.no_grad()
def _restart_dead_codes(vae: VQVAE, x: torch.Tensor, used: torch.Tensor, gen: torch.Generator) -> int:
    """Re-seed codes unused since the last restart with residual vectors the quantizer met on batch x."""
    dead = (~used).nonzero().flatten()
    if len(dead) == 0:
        return 0
    rests = torch.cat(vae.quantize.quantize_scales(vae.quant_conv(vae.encoder(x)))[2])
    pick = torch.randint(0, len(rests), (len(dead),), generator=gen)
    vae.quantize.embedding.weight[dead] = rests[pick] + 0.01 * torch.randn(len(dead), rests.shape[1], generator=gen)
    return len(dead)


@torch.no_grad()
def vae_report(vae: VQVAE, x8: torch.Tensor, size: int = 32) -> dict[str, float]:
    """Reconstruction of real digits through all scales: MSE in [-1, 1] units, PSNR on [0, 1], codes used."""
    vae.eval()
    x = render(x8, size)
    ids = vae.img_to_ids(x)
    mse = float(F.mse_loss(vae.ids_to_img(ids), x))
    return {"recon_mse": mse, "psnr_db": float(10 * np.log10(4.0 / max(mse, 1e-12))),
            "codes_used": int(torch.cat(ids, 1).unique().numel()), "codebook_size": vae.config.vocab_size}


def train_vae(r: TinyVARRecipe, work: Path, log: _Log, resume: bool) -> VQVAE:
    from safetensors.torch import load_file, save_file

    final, ckpt = work / "vae_final.safetensors", work / "vae_ckpt.safetensors"
    torch.manual_seed(r.seed)
    vae = VQVAE(r.vae_config())
    if resume and final.is_file():
        vae.load_state_dict(load_file(str(final)))
        return vae.eval()
    x8, _ = generator_digits()
    gen = torch.Generator().manual_seed(r.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vq_lr, betas=(0.9, 0.99), weight_decay=1e-4)
    start, elapsed = 0, 0.0
    if resume and ckpt.is_file():
        meta = _load_ckpt(ckpt, vae, opt, {"data": gen})
        start, elapsed = meta["step"], meta["elapsed"]
    used = torch.zeros(r.vocab_size, dtype=torch.bool)
    t0, last = time.perf_counter() - elapsed, time.perf_counter()
    vae.train()
    bar = tqdm(range(start, r.vq_steps), desc="tiny-var 1/4 VQ-VAE", initial=start, total=r.vq_steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, r.vq_steps, r.vq_lr, warmup=max(r.vq_steps // 50, 1))
        x = _vq_batch(x8, r, gen)
        rec, vq_loss, ids = vae(x)
        used[torch.cat(ids, 1).flatten()] = True
        recon = F.mse_loss(rec, x)
        loss = recon + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % r.vq_restart_every == 0:
            restarted = _restart_dead_codes(vae, x, used, gen) if step < r.vq_restart_until * r.vq_steps else 0
            log(stage="vq", step=step + 1, loss=round(loss.item(), 6), recon=round(recon.item(), 6),
                vq=round(vq_loss.item(), 6), usage=float(used.float().mean()), restarted=restarted,
                t=round(time.perf_counter() - t0, 1))
            used.zero_()
        bar.set_postfix(recon=f"{recon.item():.4f}", refresh=False)
        if time.perf_counter() - last > r.ckpt_every_s:
            _save_ckpt(ckpt, vae, opt, {"step": step + 1, "elapsed": time.perf_counter() - t0}, {"data": gen})
            last = time.perf_counter()
    bar.close()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(final))
    _stage_time(work, "vq_seconds", time.perf_counter() - t0)
    return vae.eval()


# --------------------------------------------------------------------------------------------------
# stage 2: token pool
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_pool(r: TinyVARRecipe, vae: VQVAE, work: Path, resume: bool) -> dict[str, torch.Tensor]:
    """Per-scale ids concatenated (M, L) of every generator_train digit (first 898 rows) + augmented copies."""
    from safetensors.torch import load_file, save_file

    path = work / "tokens.safetensors"
    if resume and path.is_file():
        return load_file(str(path))
    t0 = time.perf_counter()
    x8, y = generator_digits()
    gen = torch.Generator().manual_seed(r.seed + 2)
    chunks = [x8] + [augment_digits(x8, gen) for _ in range(r.aug_copies)]
    toks = [torch.cat(vae.img_to_ids(render(b, r.image_size)), 1) for c in tqdm(chunks, desc="tiny-var 2/4 tokens")
            for b in c.split(256)]
    pool = {"tokens": torch.cat(toks).to(torch.int16), "labels": y.repeat(len(chunks)),
            "original": torch.arange(len(chunks) * len(y)) < len(y)}
    save_file(pool, str(path))
    _stage_time(work, "tokens_seconds", time.perf_counter() - t0)
    return pool


# --------------------------------------------------------------------------------------------------
# stage 3: VAR transformers
# --------------------------------------------------------------------------------------------------
def var_loss(model: VAR, vae: VQVAE, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross entropy over all L tokens (uniform weights, as the reference)."""
    ids = list(tokens.long().split(model.config.scale_lengths, dim=1))
    with torch.no_grad():
        inputs = vae.quantize.ids_to_var_input(ids)
    logits = model(labels, inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.long().reshape(-1))


@torch.no_grad()
def _eval_loss(model: VAR, vae: VQVAE, tokens: torch.Tensor, labels: torch.Tensor, bf16: bool) -> float:
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = float(var_loss(model, vae, tokens, labels))
    model.train()
    return loss


def train_var(which: str, r: TinyVARRecipe, vae: VQVAE, pool: dict[str, torch.Tensor], work: Path, log: _Log,
              resume: bool) -> VAR:
    from safetensors.torch import load_file, save_file

    from mmfast.metrics import digit_splits

    total = r.drafter_steps if which == "drafter" else r.refiner_steps
    final, ckpt = work / f"{which}_final.safetensors", work / f"{which}_ckpt.safetensors"
    torch.manual_seed(r.seed + (3 if which == "drafter" else 5))
    model = VAR(r.var_config(which))
    model.init_weights()
    if resume and final.is_file():
        model.load_state_dict(load_file(str(final)))
        return model.eval()
    X, y = digit_splits(0)["heldout"]
    with torch.no_grad():
        val = (torch.cat(vae.img_to_ids(render(X.astype(np.float32), r.image_size)), 1), torch.from_numpy(y))
    n_orig = int(pool["original"].sum())
    weights = torch.where(pool["original"], r.p_original / n_orig, (1 - r.p_original) / max(int((~pool["original"]).sum()), 1))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=r.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(r.seed + (4 if which == "drafter" else 6))
    start, elapsed = 0, 0.0
    if resume and ckpt.is_file():
        meta = _load_ckpt(ckpt, model, opt, {"data": gen})
        start, elapsed = meta["step"], meta["elapsed"]
    t0, last = time.perf_counter() - elapsed, time.perf_counter()
    model.train()
    stage = f"tiny-var 3/4 {which}"
    bar, run = tqdm(range(start, total), desc=stage, initial=start, total=total), None
    for step in bar:
        lr = _lr(step, total, r.lr, r.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.multinomial(weights, r.batch, replacement=True, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
            loss = var_loss(model, vae, pool["tokens"][idx], pool["labels"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        bar.set_postfix(loss=f"{run:.3f}", refresh=False)
        if (step + 1) % 50 == 0:
            log(stage=which, step=step + 1, loss=round(loss.item(), 5), lr=lr, t=round(time.perf_counter() - t0, 1))
        if (step + 1) % r.eval_every == 0 or step + 1 == total:
            log(stage=which, kind="eval", step=step + 1, heldout=round(_eval_loss(model, vae, *val, r.bf16), 5))
        if time.perf_counter() - last > r.ckpt_every_s:
            _save_ckpt(ckpt, model, opt, {"step": step + 1, "elapsed": time.perf_counter() - t0}, {"data": gen})
            last = time.perf_counter()
    bar.close()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(final))
    _stage_time(work, f"{which}_seconds", time.perf_counter() - t0)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# stage 4 + the whole recipe
# --------------------------------------------------------------------------------------------------
def plot_curves(log: _Log, sweep: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    vq = log.rows("vq")
    ax[0].plot([x["step"] for x in vq], [x["recon"] for x in vq])
    ax[0].set(yscale="log", xlabel="step", title="VQ-VAE reconstruction MSE")
    for which in ("drafter", "refiner"):
        tr = [x for x in log.rows(which) if x.get("kind", "train") == "train"]
        ev = [x for x in log.rows(which) if x.get("kind") == "eval"]
        ax[1].plot([x["step"] for x in tr], [x["loss"] for x in tr], label=f"{which} train")
        ax[1].plot([x["step"] for x in ev], [x["heldout"] for x in ev], "o-", label=f"{which} held-out")
    ax[1].set(xlabel="step", title="VAR cross entropy")
    ax[1].legend()
    ax[2].scatter([s["frechet"] for s in sweep], [s["class_consistency"] for s in sweep])
    for s in sweep:
        ax[2].annotate(f"cfg {s['setting']['guidance_scale']} k{s['setting']['top_k']}", (s["frechet"], s["class_consistency"]),
                       fontsize=7)
    ax[2].set(xlabel="Fréchet distance", ylabel="class consistency", title="tiny-var sampling sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save(adapter: VARAdapter, out: Path, report: dict[str, Any]) -> None:
    adapter.save_pretrained(out, dtype=torch.bfloat16)
    for f in out.glob("*.safetensors"):
        f.chmod(0o644)  # safetensors writes 0600; package data must be world-readable
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")


_STAGE_FILES = ("vae_ckpt.safetensors", "vae_final.safetensors", "tokens.safetensors", "drafter_ckpt.safetensors",
                "drafter_final.safetensors", "refiner_final.safetensors", "sweep.json")


def train(out_dir: str | Path | None = OUT_DIR, small_dir: str | Path | None = SMALL_DIR,
          work_dir: str | Path = "mmfast-train/tiny-var", resume: bool = False, quick: bool = False,
          recipe: TinyVARRecipe | None = None, log: Callable[[str], None] = print, figures: bool | None = None,
          threads: int | None = None) -> Path:
    """Run the recipe; save the drafter to ``out_dir`` and the refiner to ``small_dir`` (``None``: under
    ``work_dir``). ``resume=True`` continues from ``work_dir``'s checkpoints. Returns ``out_dir``."""
    from mmfast.errors import MMFastError
    from mmfast.metrics import digit_splits

    torch.set_num_threads(threads or _auto_threads())
    r = recipe or (TinyVARRecipe.quick() if quick else TinyVARRecipe())
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = work / "recipe.json"
    if not resume and any((work / f).exists() for f in _STAGE_FILES):
        raise MMFastError(f"{work} already holds a tiny-var run: pass --resume to continue it, or another --work-dir")
    if resume and recipe_path.is_file() and json.loads(recipe_path.read_text()) != asdict(r):
        raise MMFastError(f"{recipe_path} holds a different recipe: resume with the same options or another --work-dir")
    if not resume:
        for name in ("log.jsonl", "times.json", "report.json"):
            (work / name).unlink(missing_ok=True)
    recipe_path.write_text(json.dumps(asdict(r), indent=1))
    log(f"tiny-var training with {torch.get_num_threads()} CPU thread(s) in {work}")
    losses = _Log(work / "log.jsonl")
    t_all = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        vae = train_vae(r, work, losses, resume)
        recon = {"generator_train": vae_report(vae, generator_digits()[0], r.image_size),
                 "heldout": vae_report(vae, torch.from_numpy(digit_splits(0)["heldout"][0].astype(np.float32)), r.image_size)}
        log(f"VQ-VAE reconstruction: {recon}")
        pool = encode_pool(r, vae, work, resume)
        drafter = _round_bf16(train_var("drafter", r, vae, pool, work, losses, resume))
        refiner = _round_bf16(train_var("refiner", r, vae, pool, work, losses, resume))
        big = VARAdapter(drafter, vae, ID2LABEL, {"guidance_scale": 0.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0})
        sweep = run_sweep(r, big, work, resume, desc="tiny-var 4/4 sweep")
        big.recommended = choose(sweep, r.min_consistency)
        small = VARAdapter(refiner, vae, ID2LABEL, big.recommended)
        t_eval = time.perf_counter()
        finals = {name: {k: v for k, v in evaluate(a, n=r.eval_n, seed=r.eval_seed).items() if k != "images"}
                  for name, a in (("tiny-var", big), ("tiny-var-small", small))}
        _stage_time(work, "final_eval_seconds", time.perf_counter() - t_eval)
    times = json.loads((work / "times.json").read_text())
    times["this_run_seconds"] = round(time.perf_counter() - t_all, 1)
    report = {"recipe": asdict(r), "threads": torch.get_num_threads(), "times": times, "vae_recon": recon,
              "params": {"drafter": sum(p.numel() for p in drafter.parameters()),
                         "refiner": sum(p.numel() for p in refiner.parameters()),
                         "vae": sum(p.numel() for p in vae.parameters())},
              "pool_sequences": int(len(pool["tokens"])), "sweep": sweep, "recommended": big.recommended, "final": finals}
    (work / "report.json").write_text(json.dumps(report, indent=1))
    out = Path(out_dir) if out_dir is not None else work / "tiny-var"
    out_small = Path(small_dir) if small_dir is not None else work / "tiny-var-small"
    _save(big, out, report)
    _save(small, out_small, report)
    shipped = out.resolve() == OUT_DIR
    if figures if figures is not None else shipped:
        import mmfast
        from mmfast.pipelines.image_gen import image_grid

        plot_curves(losses, sweep, CURVES_PNG if shipped else out / "curves.png")
        images = mmfast.pipeline("class-to-image", model=big)(list(range(10)) * 6, seed=0, progress=False).images
        image_grid(images, cols=10, scale=2).save(GRID_PNG if shipped else out / "grid.png")
    log(json.dumps({"recommended": big.recommended, "times": times,
                    "final": {k: {m: v[m] for m in ("class_consistency", "frechet", "frechet_ci")} for k, v in finals.items()}}))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmfast.train.tiny_var", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run the recipe")
    t.add_argument("--out", default=str(OUT_DIR))
    t.add_argument("--out-small", default=str(SMALL_DIR))
    t.add_argument("--work-dir", default="mmfast-train/tiny-var")
    t.add_argument("--quick", action="store_true", help="tiny smoke configuration (about a minute)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    smoke = a.quick and a.out == str(OUT_DIR)
    train(None if smoke else a.out, None if smoke else a.out_small, a.work_dir, resume=a.resume, quick=a.quick,
          threads=a.threads)


if __name__ == "__main__":
    main()
