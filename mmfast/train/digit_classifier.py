"""Training of the shipped digit classifier (``python -m mmfast.train.digit_classifier [OUT_DIR]``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.metrics.digits import (
    CLASSIFIER_DIR,
    SPLIT_FRACTIONS,
    SPLIT_NAMES,
    DigitClassifier,
    digit_splits,
    digits_to_images,
)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine (rotation +-12 deg, scale 0.85-1.15, shift +-2.5 px, shear +-0.1) and contrast 0.75-1.1."""
    n, s = x.shape[0], x.shape[-1]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    ang = u(-12.0, 12.0) * math.pi / 180
    scale = u(0.85, 1.15)
    shear = u(-0.1, 0.1)
    tx, ty = u(-2.5, 2.5) * 2 / s, u(-2.5, 2.5) * 2 / s
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out * u(0.75, 1.1).view(n, 1, 1, 1)).clamp(0.0, 1.0)


def train_digit_classifier(out_dir: str | Path | None = CLASSIFIER_DIR, seed: int = 0, epochs: int = 30,
                           batch_size: int = 64, lr: float = 3e-3, verbose: bool = True) -> tuple[DigitClassifier, dict]:
    """Train the digit classifier on ``classifier_train`` (split seed 0) and save it to ``out_dir``.

    Deterministic given ``seed`` on one machine (local generators; the global RNG state is restored afterwards).
    About 20-30 s on 2 free CPU cores (450 images x 30 epochs). Returns ``(model in eval mode, report)``; the report (held-out accuracy,
    parameter count, train time) is also written into ``config.json``. ``out_dir=None`` saves nothing.
    """
    t0 = time.perf_counter()
    splits = digit_splits(0)
    Xtr, ytr = splits["classifier_train"]
    Xho, yho = splits["heldout"]
    xtr = digits_to_images(Xtr)
    ytr_t = torch.from_numpy(ytr)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # parameter init and dropout
        model = DigitClassifier()
        steps_per_epoch = math.ceil(len(xtr) / batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        model.train()
        for epoch in range(epochs):
            perm = torch.randperm(len(xtr), generator=gen)
            total = 0.0
            for i in range(0, len(xtr), batch_size):
                b = perm[i : i + batch_size]
                loss = F.cross_entropy(model(_augment(xtr[b], gen)), ytr_t[b], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(b)
            if verbose and (epoch + 1) % 10 == 0:
                print(f"epoch {epoch + 1:3d}  loss {total / len(xtr):.4f}")
    model.eval()
    with torch.no_grad():
        acc = float((model(digits_to_images(Xho)).argmax(1).numpy() == yho).mean())
    n_params = sum(p.numel() for p in model.parameters())
    report = {"heldout_accuracy": acc, "heldout_n": int(len(yho)), "classifier_train_n": int(len(ytr)),
              "parameters": int(n_params), "train_seconds": round(time.perf_counter() - t0, 1)}
    if verbose:
        print(json.dumps(report))
    if out_dir is not None:
        _save(model, Path(out_dir), seed=seed, epochs=epochs, report=report)
    return model, report


def _save(model: DigitClassifier, out: Path, seed: int, epochs: int, report: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "mmfast-digit-classifier",
        "channels": [m.out_channels for m in model.conv if isinstance(m, nn.Conv2d)],
        "feature_dim": model.num_features,
        "image_size": model.image_size,
        "num_classes": model.head.out_features,
        "dropout": model.dropout.p,
        "preprocessing": "mmfast.metrics.digits_to_images / images_to_tensor: v/16, bilinear to 32x32, uint8 levels,"
                         " ink bright, RGB->grey by channel mean",
        "data": {"dataset": "sklearn.datasets.load_digits", "split_seed": 0, "trained_on": "classifier_train",
                 "split_fractions": dict(zip(SPLIT_NAMES, SPLIT_FRACTIONS))},
        "training": {"recipe": "mmfast.train.digit_classifier.train_digit_classifier", "seed": seed, "epochs": epochs},
        **report,
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; package data must be world-readable



if __name__ == "__main__":  # python -m mmfast.train.digit_classifier [OUT_DIR]
    import sys

    train_digit_classifier(sys.argv[1] if len(sys.argv) > 1 else CLASSIFIER_DIR)
