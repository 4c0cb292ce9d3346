"""Next-scale (VAR) generation suites: ``var-quality`` (the zoo pair, CoDe at every hand-off scale) and ``var-speed``
(random pairs shaped like the official VAR-d30 drafter / VAR-d16 refiner).

Rows: the drafter alone (``baseline``), the refiner alone and ``code(draft_scales=N)`` for each N. Each reports
``speedup`` (drafter wall time / this, measured interleaved in one process, VQ decode excluded as the paper does),
``ideal_speedup`` (drafter FLOPs / this: :func:`var_flops`, matmuls only), ``peak_kv_mb`` (the most KV held at once:
CoDe frees the drafter's cache before the refiner builds its own) and, in ``var-quality``, class consistency and
Fréchet distance with 95% intervals beside the real-vs-real floor. ``--opt plot=PATH`` draws quality vs speed-up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from mmfast.bench.harness import row, suite


def var_flops(config: Any, scales: range, rows: int) -> float:
    """Forward FLOPs (2 per multiply-add, matmuls only) of ``config``'s VAR over ``scales`` with a KV cache, for
    ``rows`` sequences (2 x images under CFG): per scale of n tokens with k keys so far, every block costs
    ``12 C^2 n`` (qkv, proj, 4x MLP) + ``2 n k C`` (attention) and the head ``C V n``."""
    C, lens = config.embed_dim, config.scale_lengths
    total, keys = 0.0, sum(lens[: scales.start])
    for si in scales:
        n = lens[si]
        keys += n
        total += config.depth * (12 * C * C * n + 2 * n * keys * C) + C * config.vocab_size * n
    return 2.0 * rows * total


def code_flops(drafter: Any, refiner: Any, n: int, rows: int) -> float:
    """CoDe with ``n`` draft scales: the drafter's first n scales + the refiner over every scale (its one-pass
    prefill of scales 0..n costs what running them one by one does)."""
    k = len(drafter.patch_nums)
    if n >= k:
        return var_flops(drafter, range(k), rows)
    return var_flops(drafter, range(n), rows) + var_flops(refiner, range(k), rows)


def kv_bytes(config: Any, scales: int, rows: int, bytes_per: int = 4) -> int:
    """KV held after ``scales`` scales: depth x (K, V) x rows x tokens x C."""
    return config.depth * 2 * rows * sum(config.scale_lengths[:scales]) * config.embed_dim * bytes_per


def _specs(k: int, draft_scales: Any, refiner: str) -> list[str]:
    if draft_scales is None:
        ns = list(range(1, k))
    elif isinstance(draft_scales, (list, tuple)):
        ns = [int(x) for x in draft_scales]
    else:  # "4,6,8" or 4
        ns = [int(x) for x in str(draft_scales).split(",")]
    return ["baseline", "refiner", *(f"code(refiner={refiner!r},draft_scales={n})" for n in ns)]


def _time_pipes(pipes: dict[str, Any], labels: list[int], batch: int, repeats: int, seed: int,
                keep: bool) -> dict[str, dict[str, Any]]:
    """Interleaved generation, chunk by chunk; wall time excludes the VQ decode."""
    res: dict[str, dict[str, Any]] = {s: {"wall": 0.0, "images": [], "steps": 0} for s in pipes}
    for rep in range(repeats):
        for start in range(0, len(labels), batch):
            chunk = labels[start : start + batch]
            for spec, pipe in pipes.items():
                t0 = time.perf_counter()
                out = pipe(labels=chunk, seed=seed + start, progress=False, output_type="pil" if keep and rep == 0 else "tokens")
                res[spec]["wall"] += time.perf_counter() - t0 - out.stats.get("decode_image_ms", 0) / 1e3
                if rep == 0:
                    res[spec]["images"] += out.images
                    res[spec]["steps"] += out.stats["steps"] * len(chunk)
    return res


def _rows(pipes: dict[str, Any], res: dict[str, dict[str, Any]], drafter: Any, refiner: Any, n_images: int,
          batch: int, repeats: int) -> list[dict[str, Any]]:
    rows, rows_per = [], 2 * batch  # CFG doubles the batch
    k = len(drafter.patch_nums)
    base_flops = var_flops(drafter.model.config, range(k), rows_per)
    for spec in pipes:
        if spec == "baseline":
            fl, kv = base_flops, kv_bytes(drafter.model.config, k, rows_per)
        elif spec == "refiner":
            fl, kv = var_flops(refiner.model.config, range(k), rows_per), kv_bytes(refiner.model.config, k, rows_per)
        else:
            n = next(iter(pipes[spec].accelerate)).draft_scales
            fl = code_flops(drafter.model.config, refiner.model.config, n, rows_per)
            kv = max(kv_bytes(drafter.model.config, n, rows_per), kv_bytes(refiner.model.config, k, rows_per))
        rows.append(row(spec, steps=res[spec]["steps"] / n_images, speedup=res["baseline"]["wall"] / res[spec]["wall"],
                        ideal_speedup=base_flops / fl, ms_per_image=1e3 * res[spec]["wall"] / (n_images * repeats),
                        peak_kv_mb=kv / 2**20))
    return rows


def plot_quality_speed(rows: list[dict[str, Any]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for key, a, label in (("frechet", ax[0], "Fréchet distance (lower is better)"),
                          ("accuracy", ax[1], "class consistency")):
        for r in rows:
            if r.get(key) is None:
                continue
            ci = r.get(f"{key}_ci") or [r[key], r[key]]
            a.errorbar(r["speedup"], r[key], yerr=[[r[key] - ci[0]], [ci[1] - r[key]]], fmt="o", capsize=3)
            a.annotate(r["label"], (r["speedup"], r[key]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        a.set(xlabel="wall speed-up vs the drafter alone", title=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


@suite("var-quality", "tiny-var pair: drafter, refiner and CoDe at every hand-off scale: class consistency, Fréchet, "
                      "wall and FLOP speed-up, peak KV")
def var_quality(methods: list[str], repeats: int, model: str = "tiny-var", refiner: str = "tiny-var-small",
                samples: int = 500, batch: int = 50, seed: int = 0, draft_scales: Any = None, plot: str | None = None,
                **_: Any) -> list[dict[str, Any]]:
    import mmfast
    from mmfast.metrics import class_consistency_ci, digit_frechet, frechet_floor

    drafter = mmfast.pipeline("class-to-image", model=model).adapter
    small = mmfast.pipeline("class-to-image", model=refiner).adapter
    k = len(drafter.patch_nums)
    specs = _specs(k, draft_scales, refiner) + list(methods)
    sampling = dict(drafter.recommended)
    pipes = {}
    for s in specs:
        pipes[s] = mmfast.pipeline("class-to-image", model=small if s == "refiner" else drafter,
                                   accelerate=None if s in ("baseline", "refiner") else s)
        pipes[s].defaults.update(sampling)  # the pair samples alike (the refiner alone too)
    labels = [i % 10 for i in range(samples)]
    res = _time_pipes(pipes, labels, batch, max(1, repeats), seed, keep=True)
    rows = _rows(pipes, res, drafter, small, samples, batch, max(1, repeats))
    floor, floor_ci = frechet_floor(n=samples)
    for r, spec in zip(rows, pipes):
        cc, cc_ci = class_consistency_ci(res[spec]["images"], labels)
        fd, fd_ci = digit_frechet(res[spec]["images"])
        r.update(accuracy=cc, accuracy_ci=cc_ci, frechet=fd, frechet_ci=fd_ci, frechet_floor=floor,
                 frechet_floor_ci=floor_ci, model=model if spec != "refiner" else refiner,
                 label=spec if not spec.startswith("code") else f"CoDe N={spec.rsplit('=', 1)[1].rstrip(')')}")
        r["accuracy_retained"] = cc / rows[0]["accuracy"] if rows[0].get("accuracy") else None
    rows[0]["accuracy_retained"] = 1.0
    if plot:
        plot_quality_speed(rows, plot)
    return rows


def random_pair(width_scale: float = 1.0, patch_nums: tuple[int, ...] | None = None, seed: int = 0) -> tuple[Any, Any]:
    """Random VAR-d30 / VAR-d16-shaped adapters on one random official-shape VQ-VAE (4096 codes, 32 channels).

    ``width_scale`` < 1 shrinks both widths alike (keeping depth, heads, token counts and the width ratio), for
    CPUs where the 2B-parameter d30 would take a minute per image."""
    from mmfast.models.var import OFFICIAL_PATCH_NUMS, VAR, VQVAE, VARAdapter, VARConfig, VQVAEConfig

    pn = list(patch_nums or OFFICIAL_PATCH_NUMS)
    torch.manual_seed(seed)
    # the decoder is never run in timing: a small VQ-VAE with the official codebook / scales is enough
    vae = VQVAE(VQVAEConfig(ch=8, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=1, norm_groups=8, using_sa=False,
                            v_patch_nums=pn))
    out = []
    for depth in (30, 16):
        heads = depth
        width = max(heads, round(64 * depth * width_scale / heads) * heads)
        out.append(VARAdapter(VAR(VARConfig(depth=depth, embed_dim=width, num_heads=heads, patch_nums=pn)).eval(), vae,
                              recommended={"guidance_scale": 1.5, "top_k": 900, "top_p": 0.96}))
    return out[0], out[1]


@suite("var-speed", "random VAR-d30 drafter / VAR-d16 refiner (680 tokens, 4096 codes): CoDe wall and FLOP speed-up "
                    "at every hand-off scale")
def var_speed(methods: list[str], repeats: int, width_scale: float = 1.0, images: int = 2, batch: int = 1, seed: int = 0,
              draft_scales: Any = "4,6,8", **_: Any) -> list[dict[str, Any]]:
    """``width_scale`` (default 1: the official widths 1920 / 1024) shrinks both models alike for CPU runs."""
    import mmfast.accel as A
    from mmfast.pipelines.image_gen import ImageGenPipeline

    drafter, refiner = random_pair(width_scale, seed=seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for a in (drafter, refiner):
        a.model.to(dev)
        a.vae.to(dev)
    k = len(drafter.patch_nums)
    specs = _specs(k, draft_scales, "<random d16>") + list(methods)
    pipes = {}
    for s in specs:
        if s.startswith("code(refiner='<random d16>'"):
            acc = A.resolve([A.CoDe(refiner=refiner, draft_scales=int(s.rsplit("=", 1)[1].rstrip(")")))])
        else:
            acc = A.resolve(None if s in ("baseline", "refiner") else s)
        pipes[s] = ImageGenPipeline(refiner if s == "refiner" else drafter, acc)
        pipes[s].defaults.update(drafter.recommended)
    labels = list(range(images * batch))
    _time_pipes(pipes, labels[:batch], batch, 1, seed, keep=False)  # warm-up
    res = _time_pipes(pipes, labels, batch, max(1, repeats), seed, keep=False)
    rows = _rows(pipes, res, drafter, refiner, len(labels), batch, max(1, repeats))
    n_params = {s: sum(p.numel() for p in m.model.parameters()) for s, m in (("drafter", drafter), ("refiner", refiner))}
    for r in rows:
        r["model"] = (f"random VAR-d30-shaped ({n_params['drafter'] / 1e6:.0f}M, width {drafter.model.config.embed_dim}) + "
                      f"VAR-d16-shaped ({n_params['refiner'] / 1e6:.0f}M, width {refiner.model.config.embed_dim}), "
                      f"{drafter.num_tokens} tokens, {dev.type}")
    return rows
