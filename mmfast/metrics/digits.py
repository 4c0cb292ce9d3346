"""Real handwritten digits and the digit classifier: splits, the one preprocessing path, class consistency.

See :mod:`mmfast.metrics` for the data split, the preprocessing and the classifier card. The classifier is
trained by :func:`mmfast.train.digit_classifier.train_digit_classifier`; this module only loads it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmfast.errors import InvalidInputError, UnsupportedModelError

#: side of the square images the classifier reads
DIGIT_SIZE = 32
#: (generator_train, classifier_train, heldout) fractions of each class
SPLIT_FRACTIONS = (0.5, 0.25, 0.25)
SPLIT_NAMES = ("generator_train", "classifier_train", "heldout")
#: where the shipped classifier lives (config.json + model.safetensors)
CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "zoo" / "digit_classifier"

#: generated images: a list of PIL images, or a tensor (N, C, H, W) / (N, H, W), float in [0, 1] or uint8
Images = Union[Sequence[Image.Image], torch.Tensor, np.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# data: split and the shared preprocessing
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn is in the `eval` extra
        raise UnsupportedModelError("Digit metrics need scikit-learn: pip install 'mmfast[eval]'.") from e
    d = load_digits()
    X = d.images.astype(np.uint8)  # (1797, 8, 8), values 0..16
    y = d.target.astype(np.int64)
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y


@functools.lru_cache(maxsize=8)
def _split_indices(seed: int) -> dict[str, np.ndarray]:
    _, y = _load_digits()
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for c in range(10):  # stratified: each class is split with the same fractions
        idx = rng.permutation(np.flatnonzero(y == c))
        n_gen = int(round(SPLIT_FRACTIONS[0] * len(idx)))
        n_cls = int(round(SPLIT_FRACTIONS[1] * len(idx)))
        parts["generator_train"].append(idx[:n_gen])
        parts["classifier_train"].append(idx[n_gen : n_gen + n_cls])
        parts["heldout"].append(idx[n_gen + n_cls :])
    out = {}
    for name, chunks in parts.items():
        a = np.sort(np.concatenate(chunks))  # sorted: the order carries no class pattern
        a.setflags(write=False)
        out[name] = a
    return out


def digit_splits(seed: int = 0, indices: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Disjoint, class-stratified splits of ``load_digits`` (50% / 25% / 25%).

    Returns ``{"generator_train" | "classifier_train" | "heldout": (X, y)}`` with ``X`` uint8 ``(N, 8, 8)`` in
    0..16 and ``y`` int64 ``(N,)``. With ``indices=True`` the values are the row indices into ``load_digits()``
    instead (an ``(N,)`` int array each). The shipped classifier and the metrics use ``seed=0``.
    """
    idx = _split_indices(int(seed))
    if indices:
        return {k: v.copy() for k, v in idx.items()}
    X, y = _load_digits()
    return {k: (X[v].copy(), y[v].copy()) for k, v in idx.items()}


def digits_to_images(X: np.ndarray | torch.Tensor | None = None, size: int = DIGIT_SIZE, rgb: bool = False) -> torch.Tensor:
    """Raw digits -> float images in [0, 1]: the preprocessing tiny-ar trains on and the metrics assume.

    ``X``: ``(N, 8, 8)`` or ``(N, 64)`` values 0..16 (default: all 1797 digits). Returns ``(N, 1, size, size)``
    (``(N, 3, size, size)`` with ``rgb=True``, grey replicated), float32, ink bright, quantised to k / 255.
    """
    if X is None:
        X = _load_digits()[0]
    x = torch.as_tensor(np.asarray(X), dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    # uint8 quantisation makes real digits exactly representable as PIL images (round trip is lossless)
    x = torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0
    return x.expand(-1, 3, -1, -1).contiguous() if rgb else x


def digits_to_pil(X: np.ndarray | torch.Tensor | None = None, size: int = DIGIT_SIZE) -> list[Image.Image]:
    """Raw digits -> RGB PIL images (``size`` x ``size``), pixel for pixel what :func:`digits_to_images` gives."""
    x = digits_to_images(X, size=size, rgb=True)
    arr = torch.round(x * 255.0).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]  # (H, W, 3) uint8 -> mode RGB


def images_to_tensor(images: Images, size: int | None = DIGIT_SIZE) -> torch.Tensor:
    """Generated (or real) images -> grey float tensor ``(N, 1, size, size)`` in [0, 1], the classifier's input.

    Accepts a list of PIL images (any mode, converted to RGB), or a tensor / array ``(N, C, H, W)`` with C in {1, 3}
    or ``(N, H, W)``, float in [0, 1] or uint8. RGB -> grey is the channel mean (the exact inverse of
    :func:`digits_to_images` ``rgb=True``). Resizing (only if H, W != size) is bilinear, antialiased when shrinking;
    ``size=None`` keeps the input size.
    """
    if isinstance(images, (list, tuple)) or isinstance(images, Image.Image):
        imgs = [images] if isinstance(images, Image.Image) else list(images)
        if not imgs:
            raise InvalidInputError("No images given.")
        if not all(isinstance(im, Image.Image) for im in imgs):
            raise InvalidInputError("A list of images must hold PIL images; pass arrays as one (N, C, H, W) tensor.")
        sizes = {im.size for im in imgs}
        if len(sizes) != 1:
            raise InvalidInputError(f"All images must have one size, got {sorted(sizes)}.")
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in imgs])  # (N, H, W, 3)
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    else:
        t = torch.as_tensor(images)
        if t.ndim == 3:
            t = t.unsqueeze(1)
        if t.ndim != 4 or t.shape[1] not in (1, 3) or t.shape[0] == 0:
            raise InvalidInputError(f"Expected images (N, C, H, W) with C in (1, 3) or (N, H, W); got {tuple(t.shape)}.")
        if t.dtype == torch.uint8:
            x = t.float() / 255.0
        elif t.is_floating_point():
            x = t.detach().float().cpu()
            lo, hi = float(x.min()), float(x.max())
            if not torch.isfinite(x).all() or lo < -1e-3 or hi > 1 + 1e-3:
                raise InvalidInputError(f"Float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}].")
            x = x.clamp(0.0, 1.0)
        else:
            raise InvalidInputError(f"Images must be float in [0, 1] or uint8, got dtype {t.dtype}.")
    # mean in float64: (a + a + a) / 3 is then exactly a, so grey -> RGB -> grey is lossless
    x = x.double().mean(dim=1, keepdim=True).float()
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        shrink = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return x.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# the digit classifier
# ----------------------------------------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """Small CNN on ``(N, 1, 32, 32)`` images in [0, 1]: ``forward -> logits (N, 10)``, ``features -> (N, 64)``.

    ``num_features`` lets torchmetrics' ``FrechetInceptionDistance(feature=...)`` use :meth:`feature_module`.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), feature_dim: int = 64, image_size: int = DIGIT_SIZE,
                 num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 1
        for c in channels:
            blocks += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*blocks)
        side = image_size // 2 ** len(channels)
        self.feature = nn.Linear(c_in * side * side, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)
        self.image_size = image_size
        self.num_features = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, S, S)`` in [0, 1] -> penultimate pre-activation features ``(N, feature_dim)``."""
        return self.feature(self.conv((x - 0.5) / 0.5).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.features(x))))

    def feature_module(self) -> nn.Module:
        """An ``nn.Module`` mapping ``(N, 1|3, S, S)`` float images to features, for torchmetrics' FID."""
        return _FeatureModule(self)


class _FeatureModule(nn.Module):
    def __init__(self, clf: DigitClassifier) -> None:
        super().__init__()
        self.clf = clf
        self.num_features = clf.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf.features(images_to_tensor(x, size=self.clf.image_size))



@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> DigitClassifier:
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise UnsupportedModelError(
            f"No digit classifier at {p} (needs config.json + model.safetensors). "
            "Train it with `python -m mmfast.train.digit_classifier`."
        )
    cfg = json.loads((p / "config.json").read_text())
    model = DigitClassifier(channels=cfg["channels"], feature_dim=cfg["feature_dim"], image_size=cfg["image_size"],
                            num_classes=cfg["num_classes"], dropout=cfg.get("dropout", 0.0))
    model.load_state_dict(load_file(str(p / "model.safetensors")))
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


def load_digit_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The shipped digit classifier (or the one in ``path``), in eval mode, loaded once per process."""
    return _load_cached(str(Path(path or CLASSIFIER_DIR).resolve()))


def _classifier(classifier: DigitClassifier | None) -> DigitClassifier:
    return load_digit_classifier() if classifier is None else classifier


@torch.no_grad()
def _run(images: Images, classifier: DigitClassifier, what: str, batch_size: int = 512) -> torch.Tensor:
    x = images_to_tensor(images, size=classifier.image_size)
    was_training = classifier.training
    classifier.eval()
    fn = classifier.features if what == "features" else classifier
    out = torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    classifier.train(was_training)
    return out


def digit_features(images: Images, classifier: DigitClassifier | None = None) -> np.ndarray:
    """Images -> Fréchet features, float64 ``(N, 64)``."""
    return _run(images, _classifier(classifier), "features").double().numpy()


def predict_digits(images: Images, classifier: DigitClassifier | None = None) -> np.ndarray:
    """Images -> predicted classes, int64 ``(N,)``."""
    return _run(images, _classifier(classifier), "logits").argmax(1).numpy()


def classifier_accuracy(split: str = "heldout", classifier: DigitClassifier | None = None) -> float:
    """Accuracy of the classifier on a real-digit split (default: ``heldout``, split seed 0)."""
    X, y = digit_splits(0)[split]
    return float((predict_digits(digits_to_images(X), classifier) == y).mean())


# ----------------------------------------------------------------------------------------------------------------
# class consistency
# ----------------------------------------------------------------------------------------------------------------


def _percentile_ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [a, 1.0 - a])
    return float(lo), float(hi)


def class_consistency(images: Images, labels: Sequence[int] | np.ndarray | torch.Tensor,
                      classifier: DigitClassifier | None = None) -> float:
    """Fraction of ``images`` (N) that the classifier assigns to the requested ``labels`` (N,)."""
    return class_consistency_ci(images, labels, classifier, n_boot=0)[0]


def class_consistency_ci(images: Images, labels: Sequence[int] | np.ndarray | torch.Tensor,
                         classifier: DigitClassifier | None = None, n_boot: int = 2000, level: float = 0.95,
                         seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Class consistency with a percentile bootstrap interval: ``(value, (lo, hi))``.

    ``n_boot`` resamples of the N images with replacement, 95% percentile interval (``n_boot=0``: the interval is
    ``(value, value)``).
    """
    y = np.asarray(torch.as_tensor(np.asarray(labels)).reshape(-1), dtype=np.int64)
    pred = predict_digits(images, classifier)
    if len(pred) != len(y):
        raise InvalidInputError(f"{len(pred)} images but {len(y)} labels.")
    hit = (pred == y).astype(np.float64)
    value = float(hit.mean())
    if n_boot <= 0:
        return value, (value, value)
    # the mean of N hits resampled with replacement is exactly Binomial(N, value) / N: same draws, O(n_boot) memory
    boots = np.random.default_rng(seed).binomial(len(hit), value, size=n_boot) / len(hit)
    return value, _percentile_ci(boots, level)


