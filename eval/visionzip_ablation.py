"""Why VisionZip trails pooling on tiny-vlm: ablations on a validation draw (held-out split, seed 1).

    OMP_NUM_THREADS=1 python eval/visionzip_ablation.py --n 100 --json eval/results/visionzip-ablation.json

Rows (``vlm-quality`` schema, ``accuracy`` = exact-match on the draw's questions): the baseline, ``pool(factor=2)``,
``random(keep=0.25)`` and ``turbo(keep=0.25)`` beside ``visionzip(keep=0.25)`` and three variants of it:

* ``[dominant: random]``: the dominant tokens drawn at random per crop instead of by tower attention;
* ``[dominant: least attended]``: the least attended tokens instead of the most;
* ``[contextual: mean with target]``: a contextual token is the mean of its target and the tokens assigned to it,
  instead of the reference's target + mean of the assigned tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

VARIANTS = ("dominant: random", "dominant: least attended", "contextual: mean with target")


def _patched_crop(orig, variant: str):
    def crop(self, tokens, idx, attn, metric):
        if variant == "dominant: random":
            attn = torch.rand(len(tokens), generator=torch.Generator().manual_seed(int(idx[0])))
        elif variant == "dominant: least attended" and attn is not None:
            attn = -attn
        feats, sizes, anchors = orig(self, tokens, idx, attn, metric)
        if variant == "contextual: mean with target":
            _, c = self.counts(idx.numel())
            ctx = torch.arange(len(anchors)) >= len(anchors) - c  # contextual tokens come last
            target = tokens.features[anchors[ctx]].float()
            n = sizes[ctx].float() - tokens.sizes[anchors[ctx]].float()  # tokens assigned to each target
            feats = feats.clone()
            feats[ctx] = (target + n[:, None] * (feats[ctx].float() - target)) / (1 + n[:, None])
        return feats, sizes, anchors

    return crop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="held-out images (seed 1)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import mmfast
    from mmfast.accel import visionzip as VZ
    from mmfast.bench.harness import provenance, row
    from mmfast.train.evaluate import evaluate_vlm

    orig = VZ.VisionZip._crop
    runs = [(s, None) for s in ("baseline", "pool(factor=2)", "random(keep=0.25)", "turbo(keep=0.25)")]
    runs += [("visionzip(keep=0.25)", v) for v in (None, *VARIANTS)]
    rows, base = [], None
    for spec, variant in runs:
        VZ.VisionZip._crop = orig if variant is None else _patched_crop(orig, variant)
        pipe = mmfast.pipeline("image-qa", model="tiny-vlm", accelerate=None if spec == "baseline" else spec)
        res = evaluate_vlm(pipe, split="heldout", seed=1, n_images=args.n, n_clips=0, progress=False)
        acc = res["image"]["overall"]
        base = acc if spec == "baseline" else base
        name = spec if variant is None else f"{spec} [{variant}]"
        rows.append(row(name, input="image", model="tiny-vlm", accuracy=acc, accuracy_retained=acc / base,
                        questions=res["n"]["image"],
                        per_type={k: round(v, 4) for k, v in res["image"].items() if k != "overall"}))
        print(name, round(acc, 4), rows[-1]["per_type"], flush=True)
    VZ.VisionZip._crop = orig
    if args.json:
        meta = {"split": "heldout", "seed": 1, "n_images": args.n, **provenance()}
        Path(args.json).write_text(json.dumps({"suite": "vlm-quality", "rows": rows, "meta": meta}, indent=2))


if __name__ == "__main__":
    main()
