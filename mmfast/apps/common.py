"""Shared pieces of the Gradio app: repeated timings (median and spread), what a model knows, example media and the
accuracy-vs-speed points read from ``eval/results``."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

#: what the zoo models were trained on: the app says it next to the model, so nobody expects a general VLM
KNOWS = {
    "tiny-vlm": "mmfast's synthetic scenes: 1-4 coloured shapes (circle, square, triangle, star, cross, diamond in 7 "
                "colours) pasted on toned-down photos. Ask how many, what color, what shape, where, is there; on clips "
                "also direction, order, state and when. Anything else (a plain photo) gets a guess.",
    "tiny-vlm-scan": "tiny-vlm's scenes and clips, read from one VideoScan carrier token per streamed frame.",
    "tiny-vlm-flex": "tiny-vlm's scenes, with a TokenFLEX projector for any visual-token count.",
    "tiny-ar": "handwritten digits 0-9 (sklearn's 8x8 digits shown at 32x32, 8x8 = 64 tokens): give class labels 0-9.",
    "tiny-var": "handwritten digits 0-9 (sklearn's digits at 32x32), drawn scale by scale (1-2-3-4-6-8 token grids): "
                "give class labels 0-9.",
}


def knows(model: Any) -> str:
    """One line on what ``model`` (a zoo name, a path / HF id, or an object) can answer or draw."""
    if isinstance(model, str) and model in KNOWS:
        return f"**{model}** knows {KNOWS[model]}"
    if isinstance(model, (str, os.PathLike)):
        return f"**{os.fspath(model)}**: a checkpoint loaded from disk / the hub; it knows what it was trained on."
    return f"**{type(model).__name__}**: a model object passed in by the caller."


def median_spread(values: list[float]) -> str:
    """``"12.3 (11.9-13.0)"``: the median of repeated timings and their range."""
    vals = [v for v in values if v is not None]
    if not vals:
        return ""
    med = statistics.median(vals)
    return f"{med:.1f}" if len(vals) == 1 else f"{med:.1f} ({min(vals):.1f}-{max(vals):.1f})"


def example_dir() -> Path:
    """Where the app writes its example media (Gradio examples are files)."""
    d = Path(os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()) / "mmfast-app-examples"
    d.mkdir(parents=True, exist_ok=True)
    return d


@cache
def image_examples(vlm_is_zoo: bool = True) -> list[list[str]]:
    """[path, question] rows: held-out zoo scenes (backgrounds and seeds the model never saw) when the zoo model is
    loaded, and real photos from scikit-image (what the model does NOT know)."""
    from mmfast.assets import sample_image

    out: list[list[str]] = []
    d = example_dir()
    if vlm_is_zoo:
        from PIL import Image

        from mmfast.train import data as D  # the generator of the held-out split (examples only)

        for i in (0, 1, 3):
            s = D.image_sample("heldout", 0, i, k=2)
            p = d / f"heldout-scene-{i}.png"
            Image.fromarray(s.image).resize((192, 192)).save(p)
            out.append([str(p), s.questions[0].question])
    for name, q in (("astronaut", "what color is the star?"), ("coffee", "how many objects are there?")):
        p = d / f"{name}.png"
        if not p.exists():
            sample_image(name).save(p)
        out.append([str(p), q])
    return out


@cache
def video_examples(vlm_is_zoo: bool = True) -> list[list[str]]:
    """[path, question] rows: a held-out zoo clip (encoded as VP9 WebM, which every browser plays), and gradio's
    world.mp4."""
    from mmfast.assets import gradio_video

    out: list[list[str]] = []
    if vlm_is_zoo:
        import av

        from mmfast.train import data as D

        c = D.clip_sample("heldout", 0, 0)
        p = example_dir() / "heldout-clip-0.webm"
        if not p.exists():
            with av.open(str(p), "w") as f:
                st = f.add_stream("libvpx-vp9", rate=4)
                st.width, st.height, st.pix_fmt = c.frames.shape[2], c.frames.shape[1], "yuv420p"
                for fr in c.frames:
                    for pkt in st.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                        f.mux(pkt)
                for pkt in st.encode():
                    f.mux(pkt)
        out.append([str(p), c.questions[0].question])
    world = gradio_video()
    if world is not None:
        out.append([str(world), "how many objects are there at the end?"])
    return out


def results_dir() -> Path | None:
    """``$MMFAST_RESULTS``, else the checkout's ``eval/results`` (absent in an installed package: no chart then)."""
    env = os.environ.get("MMFAST_RESULTS")
    p = Path(env) if env else Path(__file__).resolve().parents[2] / "eval" / "results"
    return p if p.is_dir() else None


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(path.read_text()).get("rows", [])
    except (OSError, ValueError, AttributeError):
        return []


def method_name(spec: str) -> str:
    """``"turbo"`` for ``"turbo(keep=0.25)"``; combined specs keep their ``+``."""
    return "+".join(part.split("(")[0].strip() for part in str(spec).split("+"))


def accuracy_speed_points(kind: str, root: Path | None = None) -> list[dict[str, Any]]:
    """Measured (speed-up, accuracy retained) pairs from ``eval/results``, one per method and suite.

    ``kind="vlm"``: accuracy from ``vlm-quality.json`` (tiny-vlm, image questions) joined by the exact method spec
    with the prefill speed-up of ``vlm-speed-vision.json`` / ``vlm-speed-kv.json`` (image input). ``kind="gen"``:
    rows that carry both (``ar-quality*.json``: class consistency retained vs wall speed-up; ``var-quality.json``).
    """
    root = root or results_dir()
    if root is None:
        return []
    pts: list[dict[str, Any]] = []
    if kind == "vlm":
        acc = {r["method"]: r["accuracy_retained"] for r in _rows(root / "vlm-quality.json")
               if r.get("model", "tiny-vlm") == "tiny-vlm" and r.get("accuracy_retained") is not None}
        for f in ("vlm-speed-vision.json", "vlm-speed-kv.json"):
            for r in _rows(root / f):
                if r.get("input", "image") == "image" and r["method"] in acc and r.get("speedup"):
                    pts.append({"method": r["method"], "name": method_name(r["method"]), "speed-up": r["speedup"],
                                "accuracy retained": acc[r["method"]], "source": f"vlm-quality + {f}"})
    else:
        for f in sorted(root.glob("ar-quality*.json")) + [root / "var-quality.json"]:
            for r in _rows(f):
                if r.get("accuracy_retained") is not None and r.get("speedup"):
                    pts.append({"method": r["method"], "name": method_name(r["method"]), "speed-up": r["speedup"],
                                "accuracy retained": r["accuracy_retained"], "source": f.name})
    seen, out = set(), []
    for p in pts:  # one point per (method, suite file)
        key = (p["method"], p["source"])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


#: chart colours: the selected method's family stands out
WHICH_COLORS = {"selected": "#e4572e", "baseline": "#222222", "other": "#a0a0a0"}


def chart_frame(kind: str, selected: str) -> Any:
    """A pandas DataFrame for ``gr.ScatterPlot``: every measured point, the selected method's family marked."""
    import pandas as pd

    pts = accuracy_speed_points(kind)
    sel = method_name(selected)
    df = pd.DataFrame(pts or [], columns=["method", "name", "speed-up", "accuracy retained", "source"])
    df["which"] = ["baseline" if n == "baseline" else ("selected" if n == sel else "other") for n in df["name"]]
    return df
