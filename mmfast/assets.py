"""Real sample media that ship inside installed packages (no downloads), for demos and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def gradio_video(name: str = "world.mp4") -> Path | None:
    """Path of a video shipped with gradio (``world.mp4``: 30 s, 901 frames, 480x270), or None."""
    try:
        import gradio
    except ImportError:
        return None
    path = Path(gradio.__file__).parent / "media_assets" / "videos" / name
    return path if path.is_file() else None


def sample_image(name: str = "astronaut") -> Image.Image:
    """A real photograph from scikit-image (``astronaut``, ``coffee``, ``chelsea``...) or sklearn's ``china``."""
    try:
        import skimage.data

        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        return Image.fromarray(arr[..., :3].astype(np.uint8))
    except (ImportError, AttributeError):
        pass
    try:
        from sklearn.datasets import load_sample_images

        return Image.fromarray(load_sample_images().images[0])
    except ImportError:
        rng = np.random.default_rng(0)  # last resort: a smooth synthetic picture
        y, x = np.mgrid[0:256, 0:256]
        arr = np.stack([x, y, (x + y) // 2], -1) + rng.integers(0, 8, (256, 256, 3))
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def sample_video() -> str | np.ndarray:
    """gradio's world.mp4 when gradio is installed, else 32 synthetic moving-gradient frames (T,H,W,3)."""
    path = gradio_video()
    if path is not None:
        return str(path)
    t, y, x = np.mgrid[0:32, 0:270, 0:480]
    return np.stack([(x + 8 * t) % 256, y % 256, (x + y + 4 * t) % 256], -1).astype(np.uint8)
