"""AR image generation benchmark suite ``ar-quality`` (registered with :func:`mmfast.bench.suite`).

On the zoo model tiny-ar (class-conditional digits), for the baseline and each decode method, in one process:
``samples`` images (balanced over the 10 classes, the same seeds for every method), generated ``batch`` at a time
with methods interleaved chunk by chunk (so machine load hits all methods alike). Reported per method:

* ``steps`` (mean model forwards per image, incl. the prefill) and ``step_compression`` (tokens / steps);
* ``speedup``: baseline wall time / method wall time (decode only, same process, interleaved);
* ``accuracy``: class consistency of the shipped digit classifier, with a bootstrap CI;
* ``frechet``: Fréchet distance to held-out real digits in the classifier's feature space, with a CI, beside
  ``frechet_floor`` (real vs real at the same set size);
* ``token_tv``: mean per-position marginal TV between the method's and the baseline's tokens, with the
  permutation noise floor and p-value (lossless methods should sit at the floor).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

from mmfast.bench.harness import row, suite

#: stats every decoder reports (the rest are a method's own figures, averaged over chunks; ``max_*`` maximised)
_COMMON = {"steps", "tokens", "wall_ms", "step_compression", "method", "batch_size", "decode_image_ms"}


@suite("ar-quality", "tiny-ar: class consistency, Fréchet distance, steps, step compression, speed-up per decoder")
def ar_quality(
    methods: list[str], repeats: int, samples: int = 200, batch: int = 1, model: str = "tiny-ar", seed: int = 0,
    top_k: int | None = None, guidance_scale: float | None = None, temperature: float | None = None, **_: Any
) -> list[dict[str, Any]]:
    """``top_k`` / ``guidance_scale`` / ``temperature`` override the model's recommended sampling for every row
    (baseline included); e.g. ``--opt top_k=64`` is LlamaGen's top-k 2000 of 16384 codes scaled to tiny-ar's 512."""
    import mmfast
    from mmfast.metrics import class_consistency_ci, digit_frechet, frechet_floor, token_tv_test

    specs = ["baseline", *methods]
    base_pipe = mmfast.pipeline("class-to-image", model=model)
    pipes = {s: base_pipe if s == "baseline" else mmfast.pipeline("class-to-image", model=base_pipe.adapter, accelerate=s)
             for s in specs}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(samples)]
    sampling = {k: v for k, v in (("top_k", top_k), ("guidance_scale", guidance_scale), ("temperature", temperature))
                if v is not None}
    results: dict[str, dict[str, Any]] = {s: {"tokens": [], "images": [], "steps": 0, "wall": 0.0, "extra": []} for s in specs}
    for _ in range(repeats):  # repeats only re-time (same seeds → same samples for lossless methods)
        for start in range(0, samples, batch):
            chunk = labels[start : start + batch]
            for spec in specs:
                t0 = time.perf_counter()
                out = pipes[spec](labels=chunk, seed=seed + start, progress=False, **sampling)
                r = results[spec]
                r["wall"] += time.perf_counter() - t0 - out.stats.get("decode_image_ms", 0) / 1e3
                if _ == 0:
                    r["tokens"].append(out.tokens)
                    r["images"].extend(out.images)
                    r["steps"] += out.stats["steps"] * len(chunk)
                    r["extra"].append({k: v for k, v in out.stats.items()
                                       if k not in _COMMON and isinstance(v, (int, float)) and not isinstance(v, bool)})
    floor, floor_ci = frechet_floor(n=samples)
    base_tokens = torch.cat(results["baseline"]["tokens"])
    vocab = base_pipe.adapter.codebook_size
    rows = []
    for spec in specs:
        r = results[spec]
        cc, cc_ci = class_consistency_ci(r["images"], labels)
        fd, fd_ci = digit_frechet(r["images"])
        toks = torch.cat(r["tokens"])
        tv = token_tv_test(toks, base_tokens, vocab) if spec != "baseline" else None
        steps = r["steps"] / samples
        extra: dict[str, Any] = {}
        for key in dict.fromkeys(k for e in r["extra"] for k in e):
            vals = [e[key] for e in r["extra"] if key in e]
            extra[key] = max(vals) if key.startswith("max_") else sum(vals) / len(vals)
        rows.append(
            row(
                spec,
                accuracy=cc,
                accuracy_ci=list(cc_ci),
                steps=round(steps, 2),
                step_compression=base_pipe.adapter.num_tokens / steps,
                speedup=results["baseline"]["wall"] / r["wall"],
                wall_ms_per_image=r["wall"] / (samples * repeats) * 1e3,
                frechet=fd,
                frechet_ci=list(fd_ci),
                frechet_floor=floor,
                frechet_floor_ci=list(floor_ci),
                token_tv=None if tv is None else tv.tv,
                token_tv_floor=None if tv is None else tv.floor,
                token_tv_p=None if tv is None else tv.p_value,
                samples=samples,
                batch=batch,
                **({"sampling": sampling} if sampling else {}),
                **extra,
            )
        )
    base_acc = rows[0]["accuracy"]
    for r in rows:
        r["accuracy_retained"] = r["accuracy"] / base_acc if base_acc else None
    return rows


#: ``ar-speed`` rows when no --accelerate is given
AR_SPEED_METHODS: tuple[str, ...] = ("sjd()", "gsd()", "lantern()")


def _compressions(path: str) -> dict[str, float]:
    """method spec -> step_compression of an ``ar-quality`` results file ({} if there is none)."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        return {}
    return {r["method"]: r["step_compression"] for r in json.loads(p.read_text())["rows"] if r.get("step_compression")}


@suite("ar-speed", "per-step cost of each decoder on a random LlamaGen GPT-B (256 tokens, 16384 codes), "
                   "projected wall speed-up at tiny-ar's measured step compression")
def ar_speed(
    methods: list[str], repeats: int, preset: str = "GPT-B", images: int = 2, seed: int = 0,
    compression_from: str = "eval/results/ar-quality-jacobi.json", model: str | None = None,
    device: str | None = None, dtype: str | None = None, **_: Any
) -> list[dict[str, Any]]:
    """Why: tiny-ar (2.9M parameters, 64 tokens) is compute-bound on a CPU, so verifying a 16-token window costs
    ~3x a one-token step and the wall speed-up trails the step compression. A real AR generator (LlamaGen GPT-B,
    111M parameters) is closer to memory-bound at one token per step (its weights are read once per forward
    whatever the window), so verification is cheaper relative to a step; this suite measures how much. Random weights are fine for timing but not for acceptance (a near-uniform p accepts almost any
    draft), so each row reports the measured ``ms_per_step`` and ``step_cost`` (÷ the baseline's) and the
    ``projected_speedup`` = tiny-ar's measured ``step_compression`` (from ``compression_from``) / ``step_cost``.
    ``steps`` / ``speedup`` on the random model are listed as measured, not as a quality claim.

    ``--opt model=tiny-ar`` (a zoo name or directory) times that trained model instead of a random preset (its own
    steps are then real acceptances); ``--opt device=cuda --opt dtype=bfloat16`` runs on a GPU in bf16 (the clock
    is read after a device synchronize). A random model gets a random EAGLE draft head for ``eagle_sd`` /
    ``lantern(drafter="default")`` (timing only, like its weights).
    """
    import mmfast.accel as A
    from mmfast.api import _dtype, load_argen
    from mmfast.models.llamagen import LlamaGen, LlamaGenAdapter, LlamaGenConfig
    from mmfast.models.vq import VQConfig, VQModel
    from mmfast.pipelines.image_gen import ImageGenPipeline

    methods = list(methods) or list(AR_SPEED_METHODS)
    specs = ["baseline", *methods]
    torch.manual_seed(seed)
    dt = _dtype(dtype) if dtype is not None else None
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if model is not None:  # a trained model (zoo name or directory): its own steps are real acceptances
        adapter, _name = load_argen(model, device=dev, dtype=dt)
        label, num_tokens = model, adapter.num_tokens
    else:
        if preset == "tiny":  # smoke tests
            cfg = LlamaGenConfig(dim=32, n_layer=1, n_head=4, multiple_of=16, vocab_size=16384, num_classes=10, block_size=16)
        else:
            cfg = LlamaGenConfig.from_preset(preset, vocab_size=16384, num_classes=1000, block_size=256)
        vq = VQModel(VQConfig(codebook_size=16384, codebook_embed_dim=8, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2],
                              z_channels=8, ch=8, num_res_blocks=1, norm_groups=4, codebook_show_usage=False))
        gpt = LlamaGen(cfg).to(device=dev, dtype=dt if isinstance(dt, torch.dtype) else None)
        adapter = LlamaGenAdapter(gpt, vq.to(dev), recommended={"guidance_scale": 4.0, "top_k": 0, "temperature": 1.0})
        label, num_tokens = f"random {preset}", cfg.block_size
    tmp = tempfile.TemporaryDirectory()
    if getattr(adapter, "drafter_path", None) is None and any(
        getattr(acc, "drafter", None) == "default" for s in methods for acc in A.resolve(s)
    ):  # eagle_sd() / lantern(drafter="default") on a random model: a random draft head (timing only)
        from mmfast.accel.eagle import EagleHead, save_drafter

        save_drafter(EagleHead(adapter), tmp.name)
        adapter.drafter_path = tmp.name
    pipes = {s: ImageGenPipeline(adapter, A.resolve(None if s == "baseline" else s)) for s in specs}
    params = sum(p.numel() for p in adapter.gpt.parameters())
    wall = {s: 0.0 for s in specs}
    steps = {s: 0 for s in specs}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    errors: dict[str, str] = {}
    for s in specs:  # warm-up: first-call allocations and per-model tables (LANTERN's latent neighbours)
        try:
            pipes[s](labels=[0], seed=seed, output_type="tokens", progress=False)
        except Exception as e:  # a method that fails here gets an error row; the others are still timed
            if s == "baseline":
                raise
            errors[s] = f"{type(e).__name__}: {e}"
    specs = [s for s in specs if s not in errors]
    for _ in range(repeats):
        for i in range(images):  # interleaved image by image
            for s in specs:
                sync()
                t0 = time.perf_counter()
                out = pipes[s](labels=[i], seed=seed + i, output_type="tokens", progress=False)
                sync()
                wall[s] += time.perf_counter() - t0
                steps[s] += out.stats["steps"]
    tmp.cleanup()
    comp = _compressions(compression_from)
    base_ms = wall["baseline"] / steps["baseline"] * 1e3
    rows = []
    for s in specs:
        ms = wall[s] / steps[s] * 1e3
        cost = ms / base_ms
        c = 1.0 if s == "baseline" else comp.get(s)
        rows.append(row(
            s,
            steps=steps[s] / (images * repeats),
            step_compression=num_tokens * images * repeats / steps[s],
            speedup=wall["baseline"] / wall[s],
            ms_per_step=round(ms, 2),
            step_cost=round(cost, 3),
            tiny_ar_step_compression=c,
            projected_speedup=None if c is None else round(c / cost, 3),
            model=f"{label} ({params / 1e6:.1f}M), {num_tokens} tokens"
            + (f", {str(dt).removeprefix('torch.')}" if isinstance(dt, torch.dtype) else "")
            + (f", {dev.type}" if dev.type != "cpu" else ""),
        ))
    rows += [row(s, error=msg) for s, msg in errors.items()]
    return rows
