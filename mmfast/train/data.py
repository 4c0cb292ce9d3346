"""Synthetic training and evaluation data for the embedded ``tiny-vlm`` zoo model.

tiny-vlm is the accuracy yardstick for visual-token reduction (pooling, random dropping, merging, KV eviction),
so every question here must need visual detail, the answers must be balanced (a majority-answer baseline has to
be weak), and the data must be learnable by a ~4M-parameter model trained on two CPU cores. Everything is
generated on the fly, deterministically, from ``(kind, split, seed, index)``.

Design choices (and why)
------------------------
* **Objects** are flat "stickers": six shapes (circle, square, triangle, star, cross, diamond) in seven
  well-separated saturated colours (red, green, blue, yellow, purple, orange, white), two sizes (small: 14-18 px
  wide, large: 22-28 px wide at 96 px), a small random rotation (|angle| <= 12 degrees, so a square never turns into
  a diamond) and a +-12 per-channel colour jitter (so colour cannot be read off one exact RGB value). The diamond is
  a tall rhombus (aspect 0.68), not a rotated square, so the two stay distinct at any jitter. Each object has a
  ~0.8 px dark outline: it keeps white and yellow objects readable on bright photos and makes the shape boundary
  (the cue a naive model failed to learn) sharp. Objects are drawn with PIL at 4x and box-downsampled, i.e.
  anti-aliased at continuous sub-pixel positions.
* **Backgrounds** are random crops (scale 35-100% of the photo's short side, random horizontal flip, brightness
  jitter) of real photographs that ship inside installed packages (scikit-image, scikit-learn, gradio), read
  straight from the package directories (no download, and no ``import gradio``, which takes seconds). Each photo is
  decoded once, cached at 192 px on its short side and *toned down*: saturation x0.4 and contrast x0.6 around
  its mean grey level. Desaturation is what keeps colour questions well posed (a saturated orange retina or a
  red motorcycle would otherwise compete with the object colours); the reduced contrast plus the soft upsampling
  of small crops keep background texture from drowning 14 px shapes, while the photo structure stays visible.
  TRAIN and HELD-OUT use disjoint photos (:data:`TRAIN_PHOTOS`, :data:`HELDOUT_PHOTOS`).
* **Positions**: each object first draws one of five regions uniformly (top left, top right, bottom left,
  bottom right, center; center = the middle 30% box), then a continuous position inside that region shrunk by a
  3 px margin. Uniform regions balance the position answers, and the margin means every object's region label is
  unambiguous, so position answers and the dense description carry no label noise. Objects never overlap (their
  bounding boxes keep a 2 px gap; rejection sampling), which keeps counting and shape reading well posed.
  ``grid_aligned=True`` snaps centres to 8 px patch-cell centres (curriculum / diagnostics only); the held-out
  split always uses free positions and additionally rejects centres that land within 0.5 px of a cell centre on
  both axes, so the yardstick never rewards patch-grid artefacts.
* **Attribute statistics**: a scene draws a small palette of colours and of shapes and samples objects from it,
  so repeated colours / shapes are common (counts of 2-4 of one colour occur) while unique ones still exist for
  the "what color is the star?" style questions, which are asked only when the referent is unique.
* **Questions** are generated answer-first: the answer is drawn among those the subject can produce (uniformly, or
  with availability-corrected weights for counts and "when"), then a question with that answer, which flattens the
  answer distribution within each type. Existence negatives are mostly "hard" (the colour or the shape is present,
  bound to another object), so attribute binding is needed. The k question types of a sample are fixed before
  looking at it and an infeasible type is skipped, not replaced (replacing skews answers towards what simple
  scenes can answer), so a sample may carry fewer than k questions. :func:`majority_baseline` reports the
  always-majority score.
* **Video clips** (8-32 frames) hold 1-4 objects with *distinct shapes* (so "the star" names one object for the whole
  clip even when its colour changes), on a background crop that may pan slowly. Objects may be present from the
  start or pop in, may pop out, may move at constant velocity (left / right / up / down; 12 px to 38% of the image
  width over their visible span, at most 4 px per frame) and may change colour once. Event frames are drawn per
  third of the clip (beginning / middle / end) so "when" answers are balanced; objects never overlap in any frame.
* **Text** is lowercase with a closed vocabulary (:func:`vocabulary`, tokenised by :func:`tokenize`), answers are one
  or two words, and :func:`describe` gives a dense, canonical (left-to-right) list of every object with size,
  colour, shape and region: an auxiliary target that supervises many visual tokens per image.
  :func:`patch_labels` gives per-patch colour / shape / size targets for pretraining the vision tower alone.

Determinism: every sample owns a ``numpy.random.Generator`` seeded from ``SeedSequence([kind, split, seed, index])``
(:func:`sample_rng`), so samples can be produced lazily, in parallel and in any order, and the same
``(split, seed, index)`` always gives the same bytes. The split is part of the seed entropy, so held-out streams are
disjoint from training streams for every seed.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from mmfast.errors import ConfigError, MMFastError

__all__ = [
    "SHAPES",
    "COLORS",
    "SIZES",
    "REGIONS",
    "DIRECTIONS",
    "PHASES",
    "NUMBER_WORDS",
    "IMAGE_QTYPES",
    "VIDEO_QTYPES",
    "Photo",
    "TRAIN_PHOTOS",
    "HELDOUT_PHOTOS",
    "Obj",
    "Scene",
    "QA",
    "Track",
    "Event",
    "Clip",
    "Sample",
    "ClipSample",
    "sample_rng",
    "photos",
    "region_of",
    "make_scene",
    "image_questions",
    "describe",
    "caption",
    "patch_labels",
    "make_clip",
    "video_questions",
    "describe_clip",
    "image_sample",
    "clip_sample",
    "image_dataset",
    "video_dataset",
    "majority_baseline",
    "tokenize",
    "vocabulary",
]

# ---------------------------------------------------------------------------------------------------------------
# Closed world
# ---------------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
            "cross": "crosses", "diamond": "diamonds"}
# Saturated, mutually distant colours; backgrounds are desaturated so none of them collides with a photo.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35),
    "green": (35, 180, 60),
    "blue": (35, 90, 240),
    "yellow": (250, 222, 30),
    "purple": (155, 55, 210),
    "orange": (250, 135, 20),
    "white": (248, 248, 248),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: tuple[str, ...] = ("small", "large")
REGIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
PHASES: tuple[str, ...] = ("beginning", "middle", "end")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
IMAGE_QTYPES: tuple[str, ...] = ("color", "shape", "count", "position", "exists")
VIDEO_QTYPES: tuple[str, ...] = ("order", "direction", "state", "when", "count")
SPLITS: tuple[str, ...] = ("train", "heldout")
MAX_OBJECTS = 6
MAX_CLIP_OBJECTS = 4

_REF_SIZE = 96.0  # all pixel constants below are for 96 px images and scale with image_size
_SMALL_R = (7.0, 9.0)  # half-width of the object's bounding box, px
_LARGE_R = (11.0, 14.0)
_GAP = 2.0  # min gap between object boxes, px
_CENTER_HALF = 0.15  # the "center" region is the middle box of half-width 0.15 * size
_REGION_MARGIN = 3.0  # object centres stay this far from region boundaries, px
_OUTLINE_PX = 0.8
_OUTLINE_RGB = np.array((28, 28, 28), np.float32)
_SS = 4  # supersampling factor for anti-aliased drawing
_KIND_IDS = {"image": 1, "video": 2}


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def sample_rng(kind: str, split: str, seed: int, index: int) -> np.random.Generator:
    """The generator that owns sample ``index`` of ``(kind, split, seed)``; the split is part of the entropy."""
    if kind not in _KIND_IDS:
        raise ConfigError(f"kind must be 'image' or 'video', got {kind!r}")
    if seed < 0 or index < 0:
        raise ConfigError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng(np.random.SeedSequence([_KIND_IDS[kind], _check_split(split), int(seed), int(index)]))


def _as_rng(rng: np.random.Generator | int, kind: str, split: str) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return sample_rng(kind, split, int(rng), 0)


# ---------------------------------------------------------------------------------------------------------------
# Background photographs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    """A real photograph shipped inside an installed package."""

    name: str
    package: str
    relpath: str


# Disjoint photo sets. Synthetic pictures (logos, chessboards, phantom, colour wheel, silhouettes, UI screenshots)
# and near-duplicates (motorcycle_right) are left out. The held-out set mixes colour and grey photos and subjects
# the training set never shows (flower, lion, retina, moon, handwriting).
TRAIN_PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "skimage", "data/astronaut.png"),
    Photo("coffee", "skimage", "data/coffee.png"),
    Photo("chelsea", "skimage", "data/chelsea.png"),
    Photo("rocket", "skimage", "data/rocket.jpg"),
    Photo("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg"),
    Photo("immunohistochemistry", "skimage", "data/ihc.png"),
    Photo("camera", "skimage", "data/camera.png"),
    Photo("coins", "skimage", "data/coins.png"),
    Photo("motorcycle", "skimage", "data/motorcycle_left.png"),
    Photo("brick", "skimage", "data/brick.png"),
    Photo("grass", "skimage", "data/grass.png"),
    Photo("gravel", "skimage", "data/gravel.png"),
    Photo("china", "sklearn", "datasets/images/china.jpg"),
    Photo("cheetah", "gradio", "media_assets/images/cheetah.jpg"),
    Photo("groot", "gradio", "media_assets/images/groot.jpeg"),
    Photo("tower", "gradio", "media_assets/images/tower.jpg"),
)
HELDOUT_PHOTOS: tuple[Photo, ...] = (
    Photo("flower", "sklearn", "datasets/images/flower.jpg"),
    Photo("lion", "gradio", "media_assets/images/lion.jpg"),
    Photo("cheetah_face", "gradio", "media_assets/images/cheetah1.jpg"),
    Photo("retina", "skimage", "data/retina.jpg"),
    Photo("moon", "skimage", "data/moon.png"),
    Photo("handwriting", "skimage", "data/text.png"),
)
_CACHE_SHORT_SIDE = 192
_SATURATION = 0.4
_CONTRAST = 0.6


def photos(split: str) -> tuple[Photo, ...]:
    """The background photographs of a split."""
    return TRAIN_PHOTOS if _check_split(split) == 0 else HELDOUT_PHOTOS


def _photo_path(photo: Photo) -> str:
    # find_spec locates the package without importing it (importing gradio alone takes seconds).
    spec = importlib.util.find_spec(photo.package)
    if spec is None or not spec.submodule_search_locations:
        raise MMFastError(
            f"background photo {photo.name!r} needs the package {photo.package!r}, which is not installed; "
            "install mmfast[eval,app] (scikit-image, scikit-learn, gradio)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], photo.relpath)
    if not os.path.exists(path):
        raise MMFastError(f"background photo {photo.name!r} not found at {path}; the installed {photo.package} differs")
    return path


@functools.cache
def _load_photo(photo: Photo) -> Image.Image:
    """Decode once, shrink to a 192 px short side, and tone down (desaturate, lower contrast)."""
    with Image.open(_photo_path(photo)) as im:
        im = im.convert("RGB")
        scale = _CACHE_SHORT_SIDE / min(im.size)
        if scale < 1.0:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
        a = np.asarray(im, dtype=np.float32)
    grey = a @ np.array([0.299, 0.587, 0.114], np.float32)
    a = grey[..., None] + _SATURATION * (a - grey[..., None])
    mean = float(grey.mean())
    # Contrast is reduced around a mean pulled towards mid-grey, so very dark (hubble) or very bright (handwriting)
    # photos do not swallow blue / purple or white / yellow objects.
    centre = 0.6 * mean + 0.4 * 128.0
    a = centre + _CONTRAST * (a - mean)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def _background(photo_im: Image.Image, box: Sequence[float], size: int, flip: bool, brightness: float) -> np.ndarray:
    im = photo_im.resize((size, size), Image.BILINEAR, box=tuple(box))
    a = np.asarray(im, dtype=np.float32)
    if flip:
        a = a[:, ::-1]
    return a + brightness


# ---------------------------------------------------------------------------------------------------------------
# Object drawing
# ---------------------------------------------------------------------------------------------------------------


def _star(n: int = 5, inner: float = 0.44) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        rad = 1.0 if k % 2 == 0 else inner
        ang = -math.pi / 2 + k * math.pi / n
        pts.append((rad * math.cos(ang), rad * math.sin(ang)))
    # centre the bounding box vertically (the star's bottom points sit at y = 0.81, its top at -1)
    off = (1.0 - math.sin(math.radians(54))) / 2
    return [(x * 1.05, (y + off) * 1.05) for x, y in pts]


_ARM = 0.34  # half-width of the cross arms
# Unit polygons (y down) inside the [-1, 1]^2 box; circle is drawn as an ellipse.
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "diamond": [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)],
    "triangle": [(0.0, -0.85), (0.98, 0.85), (-0.98, 0.85)],
    "star": _star(),
    "cross": [(-_ARM, -0.95), (_ARM, -0.95), (_ARM, -_ARM), (0.95, -_ARM), (0.95, _ARM), (_ARM, _ARM),
              (_ARM, 0.95), (-_ARM, 0.95), (-_ARM, _ARM), (-0.95, _ARM), (-0.95, -_ARM), (-_ARM, -_ARM)],
}
_CIRCLE_R = 0.93


def _object_alpha(shape: str, x: float, y: float, r: float, angle: float, image_size: int,
                  outline: float) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Anti-aliased coverage of one object: (x0, y0, full, fill) with full/fill float32 in [0, 1] on a local window.

    ``full`` covers the whole sticker, ``fill`` its interior without the outline ring.
    """
    x0 = max(0, int(math.floor(x - r - 2)))
    y0 = max(0, int(math.floor(y - r - 2)))
    x1 = min(image_size, int(math.ceil(x + r + 2)))
    y1 = min(image_size, int(math.ceil(y + r + 2)))
    w, h = x1 - x0, y1 - y0
    cx, cy, rr = (x - x0) * _SS, (y - y0) * _SS, r * _SS
    width = max(1, round(outline * _SS))
    full = Image.new("L", (w * _SS, h * _SS), 0)
    fill = Image.new("L", (w * _SS, h * _SS), 0)
    df, di = ImageDraw.Draw(full), ImageDraw.Draw(fill)
    if shape == "circle":
        bbox = (cx - _CIRCLE_R * rr, cy - _CIRCLE_R * rr, cx + _CIRCLE_R * rr, cy + _CIRCLE_R * rr)
        df.ellipse(bbox, fill=255)
        di.ellipse(bbox, fill=255, outline=0, width=width)
    else:
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        pts = [(cx + rr * (px * c - py * s), cy + rr * (px * s + py * c)) for px, py in _POLYGONS[shape]]
        df.polygon(pts, fill=255)
        di.polygon(pts, fill=255, outline=0, width=width)
    a_full = np.asarray(full.reduce(_SS), dtype=np.float32) * (1.0 / 255.0)
    a_fill = np.asarray(fill.reduce(_SS), dtype=np.float32) * (1.0 / 255.0)
    return x0, y0, a_full, np.minimum(a_fill, a_full)


def _paint(canvas: np.ndarray, shape: str, x: float, y: float, r: float, angle: float, rgb: Sequence[int],
           outline: float) -> None:
    """Composite one sticker onto a float32 (H, W, 3) canvas in place."""
    x0, y0, a_full, a_fill = _object_alpha(shape, x, y, r, angle, canvas.shape[0], outline)
    h, w = a_full.shape
    win = canvas[y0:y0 + h, x0:x0 + w]
    ring = (a_full - a_fill)[..., None]
    win *= 1.0 - a_full[..., None]
    win += ring * _OUTLINE_RGB + a_fill[..., None] * np.asarray(rgb, np.float32)


def _jitter_rgb(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    base = np.asarray(COLORS[color], np.int64)
    if color == "white":
        j = rng.integers(-20, 1, 3)  # keep white near-white
    else:
        j = rng.integers(-12, 13, 3)
    return tuple(int(v) for v in np.clip(base + j, 0, 255))


# ---------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Obj:
    """One object of a scene. ``x, y`` is the centre in pixels, ``r`` the half-width of its bounding box."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    r: float
    angle: float = 0.0
    rgb: tuple[int, int, int] = (0, 0, 0)


@dataclass
class Scene:
    """An image with the objects drawn in it. ``image`` is (H, W, 3) uint8, or None when built with render=False."""

    background_id: str
    objects: list[Obj]
    image: np.ndarray | None
    split: str = "train"
    image_size: int = 96
    grid_aligned: bool = False


@dataclass
class QA:
    """A question, its short answer (one or two words of the closed vocabulary) and its type.

    ``template`` names the finer question form (e.g. ``count_color``, ``relation``) for diagnostics.
    """

    question: str
    answer: str
    qtype: str
    template: str = ""


def region_of(x: float, y: float, image_size: int = 96) -> str:
    """The region of a point: the middle box is "center", the rest is split into four quadrants."""
    c = image_size / 2.0
    half = _CENTER_HALF * image_size
    if abs(x - c) < half and abs(y - c) < half:
        return "center"
    return ("top" if y < c else "bottom") + " " + ("left" if x < c else "right")


def _region_margin(x: float, y: float, image_size: int) -> float:
    """Distance (px, Chebyshev-style) from a point to the nearest region boundary."""
    c = image_size / 2.0
    half = _CENTER_HALF * image_size
    ax, ay = abs(x - c), abs(y - c)
    if ax < half and ay < half:
        return min(half - ax, half - ay)
    return min(ax, ay, max(ax - half, ay - half))


def _sample_in_region(rng: np.random.Generator, region: str, r: float, image_size: int) -> tuple[float, float] | None:
    """A uniform point in ``region`` shrunk by the region margin, with the object's box inside the image."""
    s = image_size / _REF_SIZE
    lo, hi = r + 1.0, image_size - 1.0 - r
    c = image_size / 2.0
    half = _CENTER_HALF * image_size
    m = _REGION_MARGIN * s
    if region == "center":
        xa, xb, ya, yb = c - half + m, c + half - m, c - half + m, c + half - m
    else:
        vert, horiz = region.split()
        xa, xb = (lo, c - m) if horiz == "left" else (c + m, hi)
        ya, yb = (lo, c - m) if vert == "top" else (c + m, hi)
    xa, xb, ya, yb = max(xa, lo), min(xb, hi), max(ya, lo), min(yb, hi)
    if xa >= xb or ya >= yb:
        return None
    for _ in range(8):
        x, y = float(rng.uniform(xa, xb)), float(rng.uniform(ya, yb))
        if region == "center" or _region_margin(x, y, image_size) >= m:
            return x, y
    return None


def _boxes_clear(x: float, y: float, r: float, placed: Iterable[tuple[float, float, float]], gap: float) -> bool:
    return all(abs(x - px) >= r + pr + gap or abs(y - py) >= r + pr + gap for px, py, pr in placed)


def _n_from(rng: np.random.Generator, n: int | Sequence[int] | range | None, default_hi: int) -> int:
    if n is None:
        return int(rng.integers(1, default_hi + 1))
    if isinstance(n, (int, np.integer)):
        return int(n)
    choices = list(n)
    if not choices:
        raise ConfigError("n_objects range is empty")
    return int(choices[int(rng.integers(len(choices)))])


def _sample_attributes(rng: np.random.Generator, n: int, names: Sequence[str]) -> list[str]:
    """Draw n values from a small random palette so repeats are common but unique values still occur."""
    k = int(rng.integers(max(1, math.ceil(n / 3)), min(n, len(names)) + 1))
    palette = rng.choice(len(names), size=k, replace=False)
    return [names[int(palette[int(rng.integers(k))])] for _ in range(n)]


def _radius(rng: np.random.Generator, size: str, scale: float) -> float:
    lo, hi = _SMALL_R if size == "small" else _LARGE_R
    return float(rng.uniform(lo, hi)) * scale


def _on_grid(x: float, y: float, patch: int, tol: float = 0.5) -> bool:
    def near(v: float) -> bool:
        f = (v - patch / 2.0) / patch
        return abs(f - round(f)) * patch < tol

    return near(x) and near(y)


def _place_objects(rng: np.random.Generator, n: int, image_size: int, grid_aligned: bool, patch: int,
                   heldout: bool) -> list[Obj]:
    s = image_size / _REF_SIZE
    for _attempt in range(50):
        colors = _sample_attributes(rng, n, COLOR_NAMES)
        shapes = _sample_attributes(rng, n, SHAPES)
        objs: list[Obj] = []
        placed: list[tuple[float, float, float]] = []
        for i in range(n):
            size = SIZES[int(rng.integers(2))]
            ok = False
            for tries in range(80):
                if tries == 40:
                    size = "small"  # crowded scene: fall back to a small object before giving up
                r = _radius(rng, size, s)
                region = REGIONS[int(rng.integers(len(REGIONS)))]
                pos = _sample_in_region(rng, region, r, image_size)
                if pos is None:
                    continue
                x, y = pos
                if grid_aligned:
                    x = patch * math.floor(x / patch) + patch / 2.0
                    y = patch * math.floor(y / patch) + patch / 2.0
                    if not (r + 1 <= x <= image_size - 1 - r and r + 1 <= y <= image_size - 1 - r):
                        continue
                    if _region_margin(x, y, image_size) < 1.0:
                        continue
                elif heldout and _on_grid(x, y, patch):
                    continue
                if not _boxes_clear(x, y, r, placed, _GAP * s):
                    continue
                angle = 0.0 if shapes[i] == "circle" else float(rng.uniform(-12.0, 12.0))
                objs.append(Obj(shapes[i], colors[i], size, x, y, r, angle, _jitter_rgb(rng, colors[i])))
                placed.append((x, y, r))
                ok = True
                break
            if not ok:
                break
        if len(objs) == n:
            return objs
    raise MMFastError(f"could not place {n} non-overlapping objects in a {image_size} px image")  # pragma: no cover


def make_scene(rng: np.random.Generator | int, split: str = "train", n_objects: int | Sequence[int] | None = None,
               image_size: int = 96, grid_aligned: bool = False, patch: int = 8, render: bool = True) -> Scene:
    """Draw a scene: a toned-down background crop of a split photo with 1-6 non-overlapping objects.

    ``rng`` is a Generator (consumed) or an int seed (sample 0 of that seed). ``n_objects`` is None (uniform 1-6), an
    int or a sequence/range to pick from uniformly. ``grid_aligned`` centres objects on ``patch``-px cells; it is
    refused for the held-out split. ``render=False`` skips drawing (fast: for question / statistics work).
    """
    heldout = _check_split(split) == 1
    if grid_aligned and heldout:
        raise ConfigError("the held-out split always uses free (off-grid) positions; grid_aligned must be False")
    if image_size < 32:
        raise ConfigError(f"image_size must be >= 32, got {image_size}")
    rng = _as_rng(rng, "image", split)
    photo_set = photos(split)
    photo = photo_set[int(rng.integers(len(photo_set)))]
    n = _n_from(rng, n_objects, MAX_OBJECTS)
    if not 1 <= n <= MAX_OBJECTS:
        raise ConfigError(f"n_objects must be within 1..{MAX_OBJECTS}, got {n}")
    # Background parameters are drawn even when not rendering so the object draws do not depend on `render`.
    photo_im = _load_photo(photo) if render else None
    side_u, x_u, y_u = (float(v) for v in rng.uniform(0.0, 1.0, 3))
    flip = bool(rng.integers(2))
    brightness = float(rng.uniform(-15.0, 15.0))
    objs = _place_objects(rng, n, image_size, grid_aligned, patch, heldout)
    image = None
    if render:
        assert photo_im is not None
        w, h = photo_im.size
        side = (0.35 + 0.65 * side_u) * min(w, h)
        x0, y0 = x_u * (w - side), y_u * (h - side)
        canvas = _background(photo_im, (x0, y0, x0 + side, y0 + side), image_size, flip, brightness)
        outline = _OUTLINE_PX * image_size / _REF_SIZE
        for o in objs:
            _paint(canvas, o.shape, o.x, o.y, o.r, o.angle, o.rgb, outline)
        image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return Scene(photo.name, objs, image, split, image_size, grid_aligned)


# ---------------------------------------------------------------------------------------------------------------
# Text targets for images
# ---------------------------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(scene: Scene) -> str:
    """Every object, left to right: "small red circle top left, large blue star center"."""
    objs = sorted(scene.objects, key=lambda o: (o.x, o.y))
    return ", ".join(f"{o.size} {o.color} {o.shape} {region_of(o.x, o.y, scene.image_size)}" for o in objs)


def _count_phrase(n: int, color: str, shape: str) -> str:
    if n == 1:
        return f"{_article(color)} {color} {shape}"
    return f"{NUMBER_WORDS[n]} {color} {_PLURALS[shape]}"


def caption(scene: Scene) -> str:
    """A short caption grouping identical objects, e.g. "two red circles and a blue star"."""
    order: list[tuple[str, str]] = []
    counts: Counter[tuple[str, str]] = Counter()
    for o in sorted(scene.objects, key=lambda o: (o.x, o.y)):
        key = (o.color, o.shape)
        if key not in counts:
            order.append(key)
        counts[key] += 1
    parts = [_count_phrase(counts[k], *k) for k in order]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def patch_labels(scene: Scene, grid: int = 12, min_coverage: float = 0.25) -> dict[str, np.ndarray]:
    """Dense per-patch targets for pretraining the vision tower.

    For each of the ``grid x grid`` cells, the object covering the largest fraction of the cell labels it if that
    fraction is >= ``min_coverage``; otherwise the cell is background. Class 0 is background everywhere:
    ``color`` = 1 + index in :data:`COLORS`, ``shape`` = 1 + index in :data:`SHAPES`, ``size`` = 1 + index in
    :data:`SIZES`, ``region`` = 1 + index in :data:`REGIONS` (int64, (grid, grid)); ``object`` is the object's index
    in ``scene.objects`` or -1, and ``coverage`` (float32) the covered fraction of the cell.
    """
    size = scene.image_size
    if size % grid:
        raise ConfigError(f"grid {grid} must divide image_size {size}")
    cell = size // grid
    cover = np.zeros((len(scene.objects), grid, grid), np.float32)
    outline = _OUTLINE_PX * size / _REF_SIZE
    for i, o in enumerate(scene.objects):
        x0, y0, a_full, _ = _object_alpha(o.shape, o.x, o.y, o.r, o.angle, size, outline)
        full = np.zeros((size, size), np.float32)
        full[y0:y0 + a_full.shape[0], x0:x0 + a_full.shape[1]] = a_full
        cover[i] = full.reshape(grid, cell, grid, cell).mean(axis=(1, 3))
    out = {k: np.zeros((grid, grid), np.int64) for k in ("color", "shape", "size", "region")}
    out["object"] = np.full((grid, grid), -1, np.int64)
    out["coverage"] = np.zeros((grid, grid), np.float32)
    if not scene.objects:
        return out
    best = cover.argmax(axis=0)
    best_cov = cover.max(axis=0)
    hit = best_cov >= min_coverage
    tables = {
        "color": np.array([1 + COLOR_NAMES.index(o.color) for o in scene.objects]),
        "shape": np.array([1 + SHAPES.index(o.shape) for o in scene.objects]),
        "size": np.array([1 + SIZES.index(o.size) for o in scene.objects]),
        "region": np.array([1 + REGIONS.index(region_of(o.x, o.y, size)) for o in scene.objects]),
    }
    for k, table in tables.items():
        out[k] = np.where(hit, table[best], 0).astype(np.int64)
    out["object"] = np.where(hit, best, -1).astype(np.int64)
    out["coverage"] = best_cov.astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Image questions
# ---------------------------------------------------------------------------------------------------------------


def _refs(objs: Sequence[Obj]) -> list[list[str]]:
    """Unambiguous referring expressions for each object, most specific (colour + shape) first."""
    shape_n = Counter(o.shape for o in objs)
    color_n = Counter(o.color for o in objs)
    combo_n = Counter((o.color, o.shape) for o in objs)
    out = []
    for o in objs:
        refs = []
        if combo_n[(o.color, o.shape)] == 1:
            refs.append(f"{o.color} {o.shape}")
        if shape_n[o.shape] == 1:
            refs.append(o.shape)
        if color_n[o.color] == 1:
            refs.append(f"{o.color} object")
        out.append(refs)
    return out


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _answer_first(rng: np.random.Generator, answers: Sequence[str], candidates: dict[str, list[QA]],
                  weights: Sequence[float] | None = None) -> QA | None:
    """Pick an answer among those the subject can produce (uniformly, or by ``weights``), then a question for it.

    Choosing the answer before the question flattens the answer distribution within a type; ``weights`` correct
    for answers that few subjects can produce at all (e.g. "six" objects), see :data:`_COUNT_WEIGHTS`.
    """
    avail = [i for i, a in enumerate(answers) if candidates.get(a)]
    if not avail:
        return None
    if weights is None:
        i = avail[int(rng.integers(len(avail)))]
    else:
        p = np.array([weights[i] for i in avail], np.float64)
        i = avail[int(rng.choice(len(avail), p=p / p.sum()))]
    return _pick(rng, candidates[answers[i]])


# Availability-corrected answer weights. With plain "uniform among the answers this subject can produce", answers
# every subject can produce dominate (image counts: "zero" 31%, "six" 3.5%). These weights were fitted on 6000 default
# samples so every answer would be equally likely, then softened (power 0.6) so large scenes do not always get the
# same question; the result (measured): image counts 12-19% per answer, video counts 17-24%, "when" 32-35%.
_COUNT_WEIGHTS = (0.042, 0.049, 0.07, 0.137, 0.296, 0.493, 1.0)
_VIDEO_COUNT_WEIGHTS = (0.334, 0.2, 0.287, 0.487, 1.0)
_WHEN_WEIGHTS = (1.0, 0.921, 0.837)


def _q_color(rng: np.random.Generator, scene: Scene) -> QA | None:
    shape_n = Counter(o.shape for o in scene.objects)
    cands: dict[str, list[QA]] = {}
    for o in scene.objects:
        if shape_n[o.shape] == 1:
            cands.setdefault(o.color, []).append(QA(f"what color is the {o.shape}?", o.color, "color", "color"))
    return _answer_first(rng, COLOR_NAMES, cands)


def _q_shape(rng: np.random.Generator, scene: Scene) -> QA | None:
    color_n = Counter(o.color for o in scene.objects)
    cands: dict[str, list[QA]] = {}
    for o in scene.objects:
        if color_n[o.color] == 1:
            cands.setdefault(o.shape, []).append(QA(f"what shape is the {o.color} object?", o.shape, "shape", "shape"))
    return _answer_first(rng, SHAPES, cands)


def _q_count(rng: np.random.Generator, scene: Scene) -> QA | None:
    n = len(scene.objects)
    shape_n = Counter(o.shape for o in scene.objects)
    color_n = Counter(o.color for o in scene.objects)
    cands: dict[str, list[QA]] = {}
    total = NUMBER_WORDS[n]
    cands.setdefault(total, []).append(QA("how many objects are there?", total, "count", "count_all"))
    for c in COLOR_NAMES:
        a = NUMBER_WORDS[color_n[c]]
        cands.setdefault(a, []).append(QA(f"how many {c} objects are there?", a, "count", "count_color"))
    for s in SHAPES:
        a = NUMBER_WORDS[shape_n[s]]
        cands.setdefault(a, []).append(QA(f"how many {_PLURALS[s]} are there?", a, "count", "count_shape"))
    return _answer_first(rng, NUMBER_WORDS, cands, _COUNT_WEIGHTS)


def _q_position(rng: np.random.Generator, scene: Scene) -> QA | None:
    objs, size = scene.objects, scene.image_size
    refs = _refs(objs)
    if rng.random() < 0.6:  # region question
        cands: dict[str, list[QA]] = {}
        for o, rf in zip(objs, refs, strict=True):
            if rf:
                reg = region_of(o.x, o.y, size)
                cands.setdefault(reg, []).append(QA(f"where is the {rf[0]}?", reg, "position", "region"))
        qa = _answer_first(rng, REGIONS, cands)
        if qa is not None:
            return qa
    # relation question: both objects referable and clearly apart horizontally
    min_dx = 8.0 * size / _REF_SIZE
    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs))
             if i != j and refs[i] and refs[j]
             and abs(objs[i].x - objs[j].x) >= max(min_dx, 0.5 * (objs[i].r + objs[j].r))]
    if not pairs:
        return None
    i, j = _pick(rng, pairs)  # (i, j) and (j, i) are both in the list, so left / right is 50/50
    a, b = _pick(rng, refs[i]), _pick(rng, refs[j])
    ans = "left" if objs[i].x < objs[j].x else "right"
    return QA(f"is the {a} left or right of the {b}?", ans, "position", "relation")


def _q_exists(rng: np.random.Generator, scene: Scene) -> QA:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        c, s = _pick(rng, sorted(present))
        return QA(f"is there {_article(c)} {c} {s}?", "yes", "exists", "exists")
    colors = sorted({o.color for o in scene.objects})
    shapes = sorted({o.shape for o in scene.objects})
    # hard negatives (a present colour with another shape, or a present shape with another colour) need binding
    hard = [(c, s) for c in colors for s in SHAPES if (c, s) not in present]
    hard += [(c, s) for s in shapes for c in COLOR_NAMES if (c, s) not in present]
    if hard and rng.random() < 0.75:
        c, s = _pick(rng, hard)
    else:
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        c, s = _pick(rng, absent)
    return QA(f"is there {_article(c)} {c} {s}?", "no", "exists", "exists")


_IMAGE_QGEN = {"color": _q_color, "shape": _q_shape, "count": _q_count, "position": _q_position,
               "exists": _q_exists}


def _ask(rng: np.random.Generator, k: int, qtypes: Sequence[str], gens: dict, subject) -> list[QA]:
    for t in qtypes:
        if t not in gens:
            raise ConfigError(f"unknown question type {t!r}; known: {sorted(gens)}")
    out: list[QA] = []
    seen: set[str] = set()
    # The types are fixed before looking at the subject: a random order of all types (repeated when k exceeds their
    # number), cut to k. A type the subject cannot serve yields nothing rather than being replaced by another one,
    # because replacing would skew answers: simple subjects (one object) cannot serve most types and would then
    # contribute extra, mostly "one" / "zero", count questions.
    rounds = math.ceil(k / max(1, len(qtypes)))
    plan = [qtypes[int(i)] for _ in range(rounds) for i in rng.permutation(len(qtypes))][:k]
    for t in plan:
        qa = gens[t](rng, subject)
        if qa is not None and qa.question not in seen:
            out.append(qa)
            seen.add(qa.question)
    return out


def image_questions(scene: Scene, rng: np.random.Generator, k: int = 4,
                    qtypes: Sequence[str] = IMAGE_QTYPES) -> list[QA]:
    """Up to ``k`` distinct questions about the scene: k random types (all different while ``k <= len(qtypes)``)."""
    return _ask(rng, k, tuple(qtypes), _IMAGE_QGEN, scene)


# ---------------------------------------------------------------------------------------------------------------
# Video clips
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Track:
    """One object of a clip. Visible for frames ``t_in <= t < t_out``; moves ``(vx, vy)`` px per frame from
    ``(x0, y0)`` at ``t_in``; turns ``color2`` from frame ``t_change`` on (if set)."""

    shape: str
    color: str
    size: str
    r: float
    angle: float
    rgb: tuple[int, int, int]
    t_in: int
    t_out: int
    x0: float
    y0: float
    vx: float = 0.0
    vy: float = 0.0
    direction: str | None = None
    t_change: int | None = None
    color2: str | None = None
    rgb2: tuple[int, int, int] | None = None

    def visible(self, t: int) -> bool:
        return self.t_in <= t < self.t_out

    def pos(self, t: int) -> tuple[float, float]:
        dt = t - self.t_in
        return self.x0 + self.vx * dt, self.y0 + self.vy * dt

    def color_at(self, t: int) -> str:
        if self.t_change is not None and self.color2 is not None and t >= self.t_change:
            return self.color2
        return self.color

    def rgb_at(self, t: int) -> tuple[int, int, int]:
        if self.t_change is not None and self.rgb2 is not None and t >= self.t_change:
            return self.rgb2
        return self.rgb


@dataclass
class Event:
    """One scripted event: ``kind`` in {"present", "appear", "disappear", "move", "color"}, at frame ``t``."""

    t: int
    kind: str
    obj: int
    detail: str = ""

    def __str__(self) -> str:
        return f"t={self.t:2d} {self.kind:<9} obj{self.obj} {self.detail}".rstrip()


@dataclass
class Clip:
    """A video clip: frames (T, H, W, 3) uint8 (None when built with render=False), tracks, event script, QAs."""

    frames: np.ndarray | None
    tracks: list[Track]
    events: list[Event]
    questions: list[QA] = field(default_factory=list)
    background_id: str = ""
    split: str = "train"
    num_frames: int = 16
    image_size: int = 96


def _phase(t: int, num_frames: int) -> str:
    return PHASES[min(2, (3 * t) // num_frames)]


def _phase_frame(rng: np.random.Generator, phase: int, num_frames: int, lo: int, hi: int) -> int | None:
    """A frame in [lo, hi] whose phase is ``phase``, away from the phase borders when the phase is wide enough."""
    frames = [t for t in range(lo, hi + 1) if (3 * t) // num_frames == phase]
    if len(frames) >= 4:
        frames = frames[1:-1] if phase == 1 else (frames[:-1] if phase == 0 else frames[1:])
    return int(_pick(rng, frames)) if frames else None


def _sample_track(rng: np.random.Generator, shape: str, T: int, size_px: int) -> Track | None:
    s = size_px / _REF_SIZE
    color = _pick(rng, COLOR_NAMES)
    size = SIZES[int(rng.integers(2))]
    r = _radius(rng, size, s)
    angle = 0.0 if shape == "circle" else float(rng.uniform(-12.0, 12.0))
    min_vis = max(3, T // 4)
    # appearance: present from the first frame, or pops in during one of the three phases
    if rng.random() < 0.5:
        t_in = 0
    else:
        t_in = _phase_frame(rng, int(rng.integers(3)), T, 1, T - min_vis)
        if t_in is None:
            return None
    t_out = T
    if rng.random() < 0.4:
        t_out_c = _phase_frame(rng, int(rng.integers(3)), T, t_in + min_vis, T - 1)
        if t_out_c is not None:
            t_out = t_out_c
    span = t_out - t_in
    tr = Track(shape, color, size, r, angle, _jitter_rgb(rng, color), t_in, t_out, 0.0, 0.0)
    lo, hi = r + 1.0, size_px - 1.0 - r
    # Moves cover 20-38% of the image width over the visible span, at most 4 px per frame (larger jumps between
    # frames make tracking a guess), and at least 12 px in total so the direction is plain to see.
    d = DIRECTIONS[int(rng.integers(4))]
    v = min(float(rng.uniform(0.2, 0.38)) * size_px / max(1, span - 1), 4.0 * s)
    dist = v * (span - 1)
    if rng.random() < 0.5 and dist >= 12.0 * s:
        dx, dy = {"left": (-v, 0.0), "right": (v, 0.0), "up": (0.0, -v), "down": (0.0, v)}[d]
        tr.vx, tr.vy, tr.direction = dx, dy, d
        # start so the whole trajectory stays inside the image
        xa, xb = (lo + dist, hi) if d == "left" else ((lo, hi - dist) if d == "right" else (lo, hi))
        ya, yb = (lo + dist, hi) if d == "up" else ((lo, hi - dist) if d == "down" else (lo, hi))
        tr.x0, tr.y0 = float(rng.uniform(xa, xb)), float(rng.uniform(ya, yb))
    else:
        tr.x0, tr.y0 = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    if rng.random() < 0.45 and span >= 5:
        tc = _phase_frame(rng, int(rng.integers(3)), T, t_in + 2, t_out - 2)
        if tc is not None:
            tr.t_change = tc
            tr.color2 = _pick(rng, [c for c in COLOR_NAMES if c != color])
            tr.rgb2 = _jitter_rgb(rng, tr.color2)
    return tr


def _tracks_clear(a: Track, b: Track, T: int, gap: float) -> bool:
    for t in range(max(a.t_in, b.t_in), min(a.t_out, b.t_out)):
        (ax, ay), (bx, by) = a.pos(t), b.pos(t)
        if abs(ax - bx) < a.r + b.r + gap and abs(ay - by) < a.r + b.r + gap:
            return False
    return True


def _script(tracks: Sequence[Track], T: int) -> list[Event]:
    ev: list[Event] = []
    for i, tr in enumerate(tracks):
        desc = f"{tr.size} {tr.color} {tr.shape}"
        ev.append(Event(tr.t_in, "present" if tr.t_in == 0 else "appear", i, desc))
        if tr.direction:
            ev.append(Event(tr.t_in, "move", i, f"{tr.direction} {math.hypot(tr.vx, tr.vy):.2f} px/frame"))
        if tr.t_change is not None:
            ev.append(Event(tr.t_change, "color", i, f"{tr.color} -> {tr.color2}"))
        if tr.t_out < T:
            ev.append(Event(tr.t_out, "disappear", i))
    return sorted(ev, key=lambda e: (e.t, e.obj, e.kind))


def make_clip(rng: np.random.Generator | int, split: str = "train", num_frames: int = 16, image_size: int = 96,
              n_objects: int | Sequence[int] | None = None, k: int = 4, render: bool = True,
              qtypes: Sequence[str] = VIDEO_QTYPES) -> Clip:
    """Draw a clip of ``num_frames`` (8-32) frames with 1-4 scripted objects of distinct shapes, plus ``k`` QAs."""
    if not 8 <= num_frames <= 32:
        raise ConfigError(f"num_frames must be within 8..32, got {num_frames}")
    if image_size < 32:
        raise ConfigError(f"image_size must be >= 32, got {image_size}")
    rng = _as_rng(rng, "video", split)
    T = num_frames
    photo_set = photos(split)
    photo = photo_set[int(rng.integers(len(photo_set)))]
    n = _n_from(rng, n_objects, MAX_CLIP_OBJECTS)
    if not 1 <= n <= MAX_CLIP_OBJECTS:
        raise ConfigError(f"n_objects must be within 1..{MAX_CLIP_OBJECTS} for clips, got {n}")
    side_u, x_u, y_u, ang_u = (float(v) for v in rng.uniform(0.0, 1.0, 4))
    pan = float(rng.uniform(0.08, 0.2)) if rng.random() < 0.5 else 0.0
    flip = bool(rng.integers(2))
    brightness = float(rng.uniform(-15.0, 15.0))
    gap = _GAP * image_size / _REF_SIZE
    tracks: list[Track] = []
    for _attempt in range(50):
        shapes = [SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=n, replace=False)]
        tracks = []
        for shape in shapes:
            for _ in range(60):
                tr = _sample_track(rng, shape, T, image_size)
                if tr is not None and all(_tracks_clear(tr, o, T, gap) for o in tracks):
                    tracks.append(tr)
                    break
            else:
                break
        if len(tracks) == n:
            break
    else:  # pragma: no cover - 4 objects always fit eventually
        raise MMFastError(f"could not script {n} non-overlapping objects in a {image_size} px clip")
    frames = None
    if render:
        photo_im = _load_photo(photo)
        w, h = photo_im.size
        side = (0.35 + 0.65 * side_u) * min(w, h)
        ang = 2 * math.pi * ang_u
        dx, dy = pan * side * math.cos(ang), pan * side * math.sin(ang)
        side = min(side, w - abs(dx), h - abs(dy))
        # start corner chosen so that the whole pan stays inside the photo
        x0 = max(0.0, -dx) + x_u * max(0.0, w - side - abs(dx))
        y0 = max(0.0, -dy) + y_u * max(0.0, h - side - abs(dy))
        outline = _OUTLINE_PX * image_size / _REF_SIZE
        frames = np.empty((T, image_size, image_size, 3), np.uint8)
        for t in range(T):
            f = t / (T - 1)
            bx, by = x0 + f * dx, y0 + f * dy
            canvas = _background(photo_im, (bx, by, bx + side, by + side), image_size, flip, brightness)
            for tr in tracks:
                if tr.visible(t):
                    x, y = tr.pos(t)
                    _paint(canvas, tr.shape, x, y, tr.r, tr.angle, tr.rgb_at(t), outline)
            frames[t] = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    clip = Clip(frames, tracks, _script(tracks, T), [], photo.name, split, T, image_size)
    clip.questions = video_questions(clip, rng, k=k, qtypes=qtypes)
    return clip


def _vq_order(rng: np.random.Generator, clip: Clip) -> QA | None:
    T, trs = clip.num_frames, clip.tracks
    min_dt = max(2, T // 8)
    cands: dict[str, list[QA]] = {}
    for i, a in enumerate(trs):
        for j, b in enumerate(trs):
            if i == j:
                continue
            # (i, j) and (j, i) are both visited: which object is named first is 50/50
            if abs(a.t_in - b.t_in) >= min_dt:
                first = a if a.t_in < b.t_in else b
                cands.setdefault(first.shape, []).append(
                    QA(f"which appeared first, the {a.shape} or the {b.shape}?", first.shape, "order", "appear_first"))
            if (a.t_out < T or b.t_out < T) and abs(a.t_out - b.t_out) >= min_dt:
                first = a if a.t_out < b.t_out else b
                cands.setdefault(first.shape, []).append(
                    QA(f"which disappeared first, the {a.shape} or the {b.shape}?", first.shape, "order",
                       "disappear_first"))
    return _answer_first(rng, SHAPES, cands)


def _vq_direction(rng: np.random.Generator, clip: Clip) -> QA | None:
    cands: dict[str, list[QA]] = {}
    for tr in clip.tracks:
        if tr.direction:
            cands.setdefault(tr.direction, []).append(
                QA(f"which way does the {tr.shape} move?", tr.direction, "direction", "direction"))
    return _answer_first(rng, DIRECTIONS, cands)


def _vq_state(rng: np.random.Generator, clip: Clip) -> QA | None:
    T, size = clip.num_frames, clip.image_size
    margin = 2.0 * size / _REF_SIZE
    colour_c: dict[str, list[QA]] = {}
    changed_c: dict[str, list[QA]] = {}
    region_c: dict[str, list[QA]] = {}
    for tr in clip.tracks:
        for t, when in ((0, "start"), (T - 1, "end")):
            if not tr.visible(t):
                continue
            c = tr.color_at(t)
            qa = QA(f"what color is the {tr.shape} at the {when}?", c, "state", f"color_{when}")
            (changed_c if tr.t_change is not None else colour_c).setdefault(c, []).append(qa)
            x, y = tr.pos(t)
            if _region_margin(x, y, size) >= margin:
                reg = region_of(x, y, size)
                region_c.setdefault(reg, []).append(QA(f"where is the {tr.shape} at the {when}?", reg, "state",
                                                       f"where_{when}"))
    if region_c and rng.random() < 0.35:
        return _answer_first(rng, REGIONS, region_c)
    # colour-changing objects make start != end, so the model must look at the right frames: prefer them
    if changed_c and rng.random() < 0.6:
        return _answer_first(rng, COLOR_NAMES, changed_c)
    merged = {c: colour_c.get(c, []) + changed_c.get(c, []) for c in COLOR_NAMES}
    return _answer_first(rng, COLOR_NAMES, merged)


def _vq_when(rng: np.random.Generator, clip: Clip) -> QA | None:
    T = clip.num_frames
    cands: dict[str, list[QA]] = {}
    for tr in clip.tracks:
        if tr.t_in > 0:
            p = _phase(tr.t_in, T)
            cands.setdefault(p, []).append(QA(f"when does the {tr.shape} appear?", p, "when", "when_appear"))
        if tr.t_out < T:
            p = _phase(tr.t_out, T)
            cands.setdefault(p, []).append(QA(f"when does the {tr.shape} disappear?", p, "when", "when_disappear"))
        if tr.t_change is not None:
            p = _phase(tr.t_change, T)
            cands.setdefault(p, []).append(QA(f"when does the {tr.shape} change color?", p, "when", "when_color"))
    return _answer_first(rng, PHASES, cands, _WHEN_WEIGHTS)


def _vq_count(rng: np.random.Generator, clip: Clip) -> QA | None:
    T, trs = clip.num_frames, clip.tracks
    total = NUMBER_WORDS[len(trs)]
    at_start = NUMBER_WORDS[sum(tr.visible(0) for tr in trs)]
    at_end = NUMBER_WORDS[sum(tr.visible(T - 1) for tr in trs)]
    cands: dict[str, list[QA]] = {}
    cands.setdefault(total, []).append(QA("how many objects appear in total?", total, "count", "count_total"))
    cands.setdefault(at_start, []).append(QA("how many objects are there at the start?", at_start, "count",
                                             "count_start"))
    cands.setdefault(at_end, []).append(QA("how many objects are there at the end?", at_end, "count", "count_end"))
    return _answer_first(rng, NUMBER_WORDS[:MAX_CLIP_OBJECTS + 1], cands, _VIDEO_COUNT_WEIGHTS)


_VIDEO_QGEN = {"order": _vq_order, "direction": _vq_direction, "state": _vq_state, "when": _vq_when,
               "count": _vq_count}


def video_questions(clip: Clip, rng: np.random.Generator, k: int = 4,
                    qtypes: Sequence[str] = VIDEO_QTYPES) -> list[QA]:
    """Up to ``k`` distinct questions about the clip's script (answer-balanced within each type)."""
    return _ask(rng, k, tuple(qtypes), _VIDEO_QGEN, clip)


def describe_clip(clip: Clip) -> str:
    """A dense script of the clip, one clause per object in order of appearance, e.g.
    "red circle from start, moves left, turns blue in middle; small green star appears at end"."""
    T = clip.num_frames
    parts = []
    for tr in sorted(clip.tracks, key=lambda tr: (tr.t_in, tr.x0)):
        bits = [f"{tr.size} {tr.color} {tr.shape} " + ("from start" if tr.t_in == 0 else
                                                        f"appears at {_phase(tr.t_in, T)}")]
        if tr.direction:
            bits.append(f"moves {tr.direction}")
        if tr.t_change is not None:
            bits.append(f"turns {tr.color2} at {_phase(tr.t_change, T)}")
        if tr.t_out < T:
            bits.append(f"disappears at {_phase(tr.t_out, T)}")
        parts.append(", ".join(bits))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One image training / evaluation example."""

    split: str
    seed: int
    index: int
    scene: Scene
    questions: list[QA]
    caption: str
    description: str

    @property
    def image(self) -> np.ndarray | None:
        return self.scene.image


@dataclass
class ClipSample:
    """One video training / evaluation example."""

    split: str
    seed: int
    index: int
    clip: Clip
    description: str

    @property
    def frames(self) -> np.ndarray | None:
        return self.clip.frames

    @property
    def questions(self) -> list[QA]:
        return self.clip.questions


def image_sample(split: str, seed: int, index: int, k: int = 4, qtypes: Sequence[str] = IMAGE_QTYPES,
                 **scene_kw) -> Sample:
    """Sample ``index`` of ``(split, seed)``: independent of every other index, so usable lazily / in parallel."""
    rng = sample_rng("image", split, seed, index)
    scene = make_scene(rng, split, **scene_kw)
    qas = image_questions(scene, rng, k=k, qtypes=qtypes)
    return Sample(split, seed, index, scene, qas, caption(scene), describe(scene))


def clip_sample(split: str, seed: int, index: int, **clip_kw) -> ClipSample:
    """Clip ``index`` of ``(split, seed)``."""
    clip = make_clip(sample_rng("video", split, seed, index), split, **clip_kw)
    return ClipSample(split, seed, index, clip, describe_clip(clip))


def image_dataset(split: str, n: int, seed: int = 0, start: int = 0, **kw) -> list[Sample]:
    """Samples ``start .. start + n - 1`` of ``(split, seed)``; kwargs go to :func:`image_sample`."""
    return [image_sample(split, seed, i, **kw) for i in range(start, start + n)]


def video_dataset(split: str, n: int, seed: int = 0, start: int = 0, **kw) -> list[ClipSample]:
    """Clips ``start .. start + n - 1`` of ``(split, seed)``; kwargs go to :func:`make_clip`."""
    return [clip_sample(split, seed, i, **kw) for i in range(start, start + n)]


def _qas_of(items: Iterable) -> Iterable[QA]:
    for it in items:
        if isinstance(it, QA):
            yield it
        else:
            yield from it.questions


def majority_baseline(samples: Iterable) -> dict[str, float]:
    """Accuracy of always answering each type's most common answer, per qtype and "overall".

    Accepts image / clip samples, clips, or QAs. The majority answer is taken from the same samples, so this is
    the (slightly optimistic) score a model that ignores the image entirely could reach.
    """
    by_type: dict[str, Counter[str]] = {}
    for qa in _qas_of(samples):
        by_type.setdefault(qa.qtype, Counter())[qa.answer] += 1
    out = {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in sorted(by_type.items())}
    total = sum(sum(c.values()) for c in by_type.values())
    out["overall"] = sum(c.most_common(1)[0][1] for c in by_type.values()) / total if total else 0.0
    return out


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[a-z]+|[^\sa-z]")


def tokenize(text: str) -> list[str]:
    """Lowercase word-level tokens with punctuation split off: "what color is the star?" -> [..., "star", "?"]."""
    return _TOKEN_RE.findall(text.lower())


_TEMPLATE_WORDS = """
what color is the shape object how many objects are there where left or right of a an and
which appeared first disappeared way does move at start end when appear disappear change in total
from appears moves turns disappears ? , ;
"""


@functools.lru_cache(maxsize=1)
def _vocab() -> tuple[str, ...]:
    words: set[str] = set(tokenize(_TEMPLATE_WORDS))
    for group in (SHAPES, tuple(_PLURALS.values()), COLOR_NAMES, SIZES, REGIONS, DIRECTIONS, PHASES, NUMBER_WORDS,
                  ("yes", "no")):
        for phrase in group:
            words.update(tokenize(phrase))
    return tuple(sorted(words))


def vocabulary() -> list[str]:
    """Every token that can appear in a question, answer, caption or description (sorted; see :func:`tokenize`)."""
    return list(_vocab())
