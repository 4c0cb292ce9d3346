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

import time
from typing import Any

import torch

from mmfast.bench import row, suite


@suite("ar-quality", "tiny-ar: class consistency, Fréchet distance, steps, step compression, speed-up per decoder")
def ar_quality(
    methods: list[str], repeats: int, samples: int = 200, batch: int = 1, model: str = "tiny-ar", seed: int = 0, **_: Any
) -> list[dict[str, Any]]:
    import mmfast
    from mmfast.metrics import class_consistency_ci, digit_frechet, frechet_floor, token_tv_test

    specs = ["baseline", *methods]
    base_pipe = mmfast.pipeline("class-to-image", model=model)
    pipes = {s: base_pipe if s == "baseline" else mmfast.pipeline("class-to-image", model=base_pipe.adapter, accelerate=s)
             for s in specs}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(samples)]
    results: dict[str, dict[str, Any]] = {s: {"tokens": [], "images": [], "steps": 0, "wall": 0.0, "extra": []} for s in specs}
    for _ in range(repeats):  # repeats only re-time (same seeds → same samples for lossless methods)
        for start in range(0, samples, batch):
            chunk = labels[start : start + batch]
            for spec in specs:
                t0 = time.perf_counter()
                out = pipes[spec](labels=chunk, seed=seed + start, progress=False)
                r = results[spec]
                r["wall"] += time.perf_counter() - t0 - out.stats.get("decode_image_ms", 0) / 1e3
                if _ == 0:
                    r["tokens"].append(out.tokens)
                    r["images"].extend(out.images)
                    r["steps"] += out.stats["steps"] * len(chunk)
                    r["extra"].append({k: v for k, v in out.stats.items() if k in ("max_tv", "mean_group_size", "mean_accepted")})
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
        for key in ("max_tv", "mean_group_size", "mean_accepted"):
            vals = [e[key] for e in r["extra"] if key in e]
            if vals:
                extra[key] = max(vals) if key == "max_tv" else sum(vals) / len(vals)
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
                **extra,
            )
        )
    base_acc = rows[0]["accuracy"]
    for r in rows:
        r["accuracy_retained"] = r["accuracy"] / base_acc if base_acc else None
    return rows
