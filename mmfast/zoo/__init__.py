"""The zoo: small models mmfast trains itself, shipped inside the package as Hugging Face checkpoints.

``zoo_path("tiny-vlm")`` returns the local directory of a shipped model; pipelines resolve zoo names
before trying a local path or a hub id, and load them with the same ``from_pretrained`` code.
"""

from __future__ import annotations

from pathlib import Path

from mmfast.errors import UnsupportedModelError

ROOT = Path(__file__).resolve().parent

#: zoo name → (sub-directory, what it is)
MODELS: dict[str, tuple[str, str]] = {
    "tiny-vlm": ("tiny_vlm", "LLaVA-OneVision-format image + video QA / captioning model trained on mmfast's synthetic scenes"),
    "tiny-vlm-flex": ("tiny_vlm_flex", "tiny-vlm fine-tuned with a TokenFLEX projector (tokenflex(keep=...) picks the count)"),
    "tiny-vlm-scan": ("tiny_vlm_scan", "tiny-vlm fine-tuned to read streamed video through VideoScan carriers (videoscan())"),
    "tiny-ar": ("tiny_ar", "LlamaGen-architecture class-conditional digit generator + VQ tokenizer, trained on sklearn digits"),
    "tiny-var": ("tiny_var", "VAR-architecture next-scale digit generator + multi-scale VQ-VAE (CoDe's drafter, the larger)"),
    "tiny-var-small": ("tiny_var_small", "the smaller VAR sharing tiny-var's VQ-VAE (CoDe's refiner)"),
}


def is_zoo_name(name: str) -> bool:
    return name in MODELS


def zoo_path(name: str) -> Path:
    """Directory of zoo model ``name``; a clear error if it is unknown or has not been trained yet."""
    if name not in MODELS:
        raise UnsupportedModelError(f"Unknown zoo model {name!r}. The zoo has: {', '.join(sorted(MODELS))}.")
    path = ROOT / MODELS[name][0]
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(
            f"Zoo model {name!r} is not in this installation ({path} has no config.json). "
            f"Train it with `mmfast zoo train {name}`."
        )
    return path


def available() -> dict[str, bool]:
    """Zoo names and whether each checkpoint is present."""
    return {name: (ROOT / sub / "config.json").is_file() for name, (sub, _) in MODELS.items()}
