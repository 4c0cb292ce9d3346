"""Image and video loading and validation for the mmfast pipelines.

- :func:`load_image` turns a path, encoded bytes, a PIL image, a numpy array or a torch tensor into a fully
  decoded RGB ``PIL.Image.Image``.
- :func:`load_video` turns a video file, encoded bytes or a sequence of frames into a :class:`Video` of
  sampled ``(T, H, W, 3)`` uint8 frames with their source indices and timestamps.

Every problem with the input (missing, empty, corrupt, truncated, absurdly large, wrong type) raises
:class:`~mmfast.errors.InvalidInputError` naming the source, never a decoder's own exception type.

Decoder safety (measured with decord 0.6.0 / PyAV 18.1, CPU): decord never crashed the process on ~150
damaged files (empty, random bytes, text, mp4/avi/mkv/webm/gif cut at 2-99 %, bytes garbled mid-file), each
run in a subprocess: it raised ``RuntimeError("Error reading ...")`` or ``decord.DECORDError`` instead, and
sometimes returned the readable part of a cut avi/mkv. Upstream does report aborts and segfaults on other
damaged files (dmlc/decord#25 ``std::terminate`` in a decoder thread, #99, #229), so every file is first
probed with PyAV (container, stream, frame size, packet count, truncation), and decord only sees files that
passed the probe.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInputError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Largest accepted image / video frame, in pixels (an 8192 x 8192 image fits exactly).
MAX_IMAGE_PIXELS = 64 * 2**20
#: Largest accepted side, in pixels; a 16k side is a decompression bomb or a bug, not a photo.
MAX_IMAGE_SIDE = 16_000
#: Longest accepted video, in frames (about 9 hours at 30 fps).
MAX_VIDEO_FRAMES = 1_000_000
#: Largest decoded output of one :func:`load_video` call, in bytes; beyond that, sample fewer frames.
MAX_VIDEO_BYTES = 4 * 2**30

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".gif", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts", ".ogv"}
)
BACKENDS = ("decord", "pyav")

ImageInput = Union[str, "os.PathLike[str]", bytes, Image.Image, np.ndarray, "torch.Tensor"]
VideoInput = Union[str, "os.PathLike[str]", bytes, Sequence[ImageInput], np.ndarray, "torch.Tensor"]


# --------------------------------------------------------------------------------------------------- images


def load_image(src: ImageInput) -> Image.Image:
    """Load ``src`` as a fully decoded RGB image.

    ``src``: a path (str / ``pathlib.Path``), encoded bytes, a ``PIL.Image.Image``, a numpy array
    ``(H, W)``, ``(H, W, 1|3|4)`` of uint8 or float in [0, 1], or a torch tensor ``(C, H, W)`` / ``(H, W, C)``.
    Transparent pixels are composited on white and EXIF rotation is applied, as ``transformers`` does.
    """
    what = _describe(src)
    if isinstance(src, Image.Image):
        image = _decode_pil(lambda: src, what)
    elif isinstance(src, (str, os.PathLike)):
        path = _check_file(src, "image")
        hint = " It is a video: ask about it with video-qa (or load_video)." if media_kind(path) == "video" else ""
        with open(path, "rb") as f:
            image = _decode_pil(lambda: Image.open(f), what, hint)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise InvalidInputError("Image bytes are empty; pass the encoded file content (PNG, JPEG, ...).")
        image = _decode_pil(lambda: Image.open(io.BytesIO(bytes(src))), what)
    elif isinstance(src, np.ndarray) or _is_tensor(src):
        return _array_to_pil(_to_numpy(src, channels_first=True), what)
    else:
        raise InvalidInputError(
            f"Unsupported image type {type(src).__name__}; pass a path, bytes, a PIL image, a numpy array or a torch tensor."
        )
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as e:  # a malformed EXIF block must not hide a perfectly decodable image
        logger.debug("Ignoring unreadable EXIF orientation of %s: %s", what, e)
    return _to_rgb(image)


def _decode_pil(open_image: Callable[[], Image.Image], what: str, hint: str = "") -> Image.Image:
    """Open with ``open_image()``, check the size from the header, then decode every pixel (``.load()``)."""
    try:
        with warnings.catch_warnings():
            # PIL only *warns* below twice its own bomb limit; we enforce our stricter limit right after.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = open_image()
            _check_size(*image.size, what)  # before .load(), so a bomb is never allocated
            image.load()  # decode now, so a truncated file fails here and not inside a model
    except InvalidInputError:
        raise
    except Image.DecompressionBombError as e:
        raise InvalidInputError(f"{what} is a decompression bomb ({e}); downscale it first.") from e
    except UnidentifiedImageError as e:
        raise InvalidInputError(f"{what} is not a readable image (unknown format or corrupt).{hint}") from e
    except Exception as e:  # PIL decoders raise OSError ("image file is truncated"), SyntaxError, ValueError, ...
        raise InvalidInputError(
            f"{what} could not be decoded ({type(e).__name__}: {e}); the file is truncated or corrupt, "
            "re-export or re-download it."
        ) from e
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB; transparency is composited on white (as ``transformers.image_transforms.convert_to_rgb``)
    because dropping alpha exposes whatever colour the transparent pixels happen to store."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_pil(array: np.ndarray, what: str) -> Image.Image:
    """``(H, W)`` / ``(H, W, 1|3|4)`` uint8 or float [0, 1] -> L / RGB / RGBA image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise InvalidInputError(
            f"{what} has shape {tuple(array.shape)}; expected (H, W), (H, W, 3) or (H, W, 4) channels-last."
        )
    _check_size(array.shape[1], array.shape[0], what)
    image = Image.fromarray(np.ascontiguousarray(_as_uint8(array, what)))
    return _to_rgb(image)


def _is_tensor(x: object) -> bool:
    # Only look for torch if it is already imported: importing it here would cost seconds for nothing.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _to_numpy(x: np.ndarray | torch.Tensor, channels_first: bool) -> np.ndarray:
    """numpy arrays pass through; tensors go to CPU numpy, ``(..., C, H, W)`` -> ``(..., H, W, C)`` when
    ``channels_first`` and the layout is unambiguous (C in 1/3/4 first, not last)."""
    if isinstance(x, np.ndarray):
        return x
    x = x.detach().cpu()
    array = (x.float() if x.is_floating_point() else x).numpy()  # bfloat16 has no numpy dtype
    if channels_first and array.ndim >= 3 and array.shape[-3] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, -3, -1)
    return array


def _as_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 passes through; float in [0, 1] is scaled and rounded (so ``x / 255`` maps back to ``x``)."""
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidInputError(f"{what} has dtype {array.dtype}; use uint8 (0-255) or float in [0, 1].")
    if not np.isfinite(array).all():
        raise InvalidInputError(f"{what} contains NaN or inf values.")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise InvalidInputError(
            f"{what} has float values in [{low:.4g}, {high:.4g}]; float pixels must be in [0, 1] "
            "(divide 0-255 data by 255, or cast it to uint8)."
        )
    return (array * 255.0).round().astype(np.uint8)


def _check_size(width: int, height: int, what: str) -> None:
    if width < 1 or height < 1:
        raise InvalidInputError(f"{what} is {width}x{height} pixels; an image needs at least 1x1 pixels.")
    if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise InvalidInputError(
            f"{what} is {width}x{height} pixels, beyond the limits ({MAX_IMAGE_SIDE} px per side, "
            f"{MAX_IMAGE_PIXELS / 2**20:.0f} megapixels); downscale it first."
        )


def _check_file(src: str | os.PathLike[str], kind: str) -> Path:
    """Return the absolute path of an existing, non-empty file. Absolute, because ffmpeg reads a relative
    name like ``concat:a|b`` or ``http:x`` as a protocol, not a file."""
    text = os.fspath(src)
    if isinstance(text, str) and text.startswith(("http://", "https://", "ftp://")):
        raise InvalidInputError(f"{text!r} is a URL; download the {kind} first and pass the local path or bytes.")
    path = Path(text).expanduser()
    if not path.exists():
        raise InvalidInputError(f"{kind.capitalize()} file {text!r} does not exist; check the path.")
    if path.is_dir():
        raise InvalidInputError(f"{text!r} is a directory, not a {kind} file (for a whole folder: `mmfast batch caption | qa DIR`).")
    if path.stat().st_size == 0:
        raise InvalidInputError(f"{kind.capitalize()} file {text!r} is empty (0 bytes); re-export or re-download it.")
    return path.resolve()


def _describe(src: object) -> str:
    """How error messages name a source: the path, or the type (and shape)."""
    if isinstance(src, (str, os.PathLike)):
        return repr(os.fspath(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    shape = getattr(src, "shape", None)
    return f"<{type(src).__name__}{'' if shape is None else f' shape={tuple(shape)}'}>"


def probe_kind(path: str | os.PathLike[str]) -> str | None:
    """``"image"`` or ``"video"`` by the content of a local file, or None when neither loader can open it: an image
    header PIL reads (an animated GIF / WebP counts as a video only under a video extension), else a container with
    a moving video stream that PyAV opens (a still image read by FFmpeg's image demuxers is not one)."""
    p = Path(os.fspath(path))
    if not p.is_file() or p.stat().st_size == 0:
        return None
    try:
        with Image.open(p) as im:
            if not getattr(im, "is_animated", False) or p.suffix.lower() not in VIDEO_EXTENSIONS:
                return "image"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        pass
    try:
        import av

        with av.open(str(p), metadata_errors="ignore") as container:
            fmt = container.format.name
            if container.streams.video and fmt != "image2" and not fmt.endswith("_pipe") and fmt != "tty":
                return "video"
    except Exception:  # noqa: BLE001 - any demuxer failure means "not a video we can open"
        pass
    return None


def media_kind(path: str | os.PathLike[str]) -> str:
    """``"image"`` or ``"video"``: by content for a readable local file (:func:`probe_kind`), by extension for
    URLs and unreadable files (their loader then raises the typed error)."""
    return probe_kind(path) or ("video" if is_video_path(path) else "image")


def is_video_path(x: object) -> bool:
    """True if ``x`` is a str / path whose extension is a video container (``.mp4``, ``.gif``, ...)."""
    return isinstance(x, (str, os.PathLike)) and Path(os.fspath(x)).suffix.lower() in VIDEO_EXTENSIONS


# --------------------------------------------------------------------------------------------------- videos


@dataclass
class Video:
    """Sampled video frames.

    frames: ``(T, H, W, 3)`` uint8 RGB. indices: ``(T,)`` int64 frame indices in the source.
    timestamps: ``(T,)`` float64 seconds since the first frame (NaN when the source fps is unknown).
    fps: source frame rate, or None. total_frames: frames in the source. duration: seconds, or None.
    source: path or short description of where the frames came from.
    """

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    fps: float | None
    total_frames: int
    duration: float | None
    source: str

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def to_pil(self) -> list[Image.Image]:
        """The frames as ``T`` RGB PIL images."""
        return [Image.fromarray(frame) for frame in self.frames]


def sample_indices_uniform(total: int, n: int) -> np.ndarray:
    """``n`` indices spread evenly over ``[0, total - 1]``, first and last frame included: ``linspace`` then
    round, as Qwen3-VL's video processor (LLaVA-Video truncates instead: at most one frame apart). Shape
    ``(n,)`` int64; ``n > total`` repeats frames so the count stays ``n``."""
    _check_positive_int(total, "total")
    _check_positive_int(n, "n")
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def sample_indices_fps(total: int, src_fps: float, fps: float, max_frames: int | None) -> np.ndarray:
    """About ``fps`` frames per second of a ``src_fps`` video of ``total`` frames: one every
    ``src_fps / fps`` frames, i.e. ``n = int(total / src_fps * fps)`` frames at ``arange(n) * total // n``,
    exactly ``transformers.video_utils.default_sample_indices_fn``. Never more than all frames; if more than
    ``max_frames``, ``max_frames`` uniform ones (:func:`sample_indices_uniform`). Shape ``(n,)`` int64."""
    _check_positive_int(total, "total")
    _check_positive_float(src_fps, "src_fps")
    _check_positive_float(fps, "fps")
    if max_frames is not None:
        _check_positive_int(max_frames, "max_frames")
    n = min(total, max(1, int(total / src_fps * fps + 1e-9)))  # epsilon: 150 / 29.97 * 29.97 must stay 150
    if max_frames is not None and n > max_frames:
        return sample_indices_uniform(total, max_frames)
    return np.arange(n, dtype=np.int64) * total // n


def load_video(
    src: VideoInput,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    backend: str | None = None,
    *,
    source_fps: float | None = None,
) -> Video:
    """Decode and sample a video.

    ``src``: a path, encoded bytes, a list / tuple of images (anything :func:`load_image` takes, all the
    same size) or a ``(T, H, W, 3)`` array / tensor (``(T, 3, H, W)`` tensors too).
    Sampling: ``num_frames=N`` -> N uniform frames (:func:`sample_indices_uniform`); ``fps=F`` -> F frames
    per second (:func:`sample_indices_fps`); neither -> every frame. ``max_frames`` caps all three.
    ``backend``: "decord" or "pyav"; None tries decord and falls back to PyAV (GIFs always use PyAV).
    ``source_fps``: frame rate of frames given directly (unknown otherwise); files use their container's.

    A truncated file whose header promises more frames than it holds (mp4, avi, mov) raises; a cut
    container without a frame count (mkv, webm) is indistinguishable from a shorter video and loads as one.
    """
    if num_frames is not None and fps is not None:
        raise InvalidInputError("Pass either num_frames or fps to load_video, not both: pick one sampling rule.")
    if num_frames is not None:
        _check_positive_int(num_frames, "num_frames")
    if fps is not None:
        _check_positive_float(fps, "fps")
    if max_frames is not None:
        _check_positive_int(max_frames, "max_frames")
    if backend not in (None, *BACKENDS):
        raise InvalidInputError(f"Unknown video backend {backend!r}; use one of {BACKENDS} or None.")
    sampling = {"num_frames": num_frames, "fps": fps, "max_frames": max_frames}

    if isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview)):
        if source_fps is not None:
            raise InvalidInputError("source_fps is only for frames given directly; files use their own frame rate.")
        if not isinstance(src, (str, os.PathLike)):
            return _load_video_bytes(bytes(src), backend, **sampling)
        return _load_video_file(_check_file(src, "video"), _describe(src), backend, **sampling)
    if source_fps is not None:
        _check_positive_float(source_fps, "source_fps")
    if isinstance(src, (list, tuple)):
        return _video_from_frames(_stack_images(src), source_fps, "<list of frames>", **sampling)
    if isinstance(src, np.ndarray) or _is_tensor(src):
        return _video_from_frames(_frames_array(src), source_fps, _describe(src), **sampling)
    raise InvalidInputError(
        f"Unsupported video type {type(src).__name__}; pass a path, bytes, a list of images or a (T, H, W, 3) array."
    )


def iter_video_frames(
    src: VideoInput | Iterable[Any], fps: float | None = None, max_frames: int | None = None,
    *, source_fps: float | None = None,
) -> Iterator[np.ndarray]:
    """Frames of a video one at a time, ``(H, W, 3)`` uint8, decoded as they are needed (a stream never holds the
    whole file): ``fps=F`` keeps about F frames per second (the first frame whose time reaches each ``k / F``),
    ``None`` every frame; ``max_frames`` stops after that many.

    ``src``: a path or URL (PyAV decodes packet by packet), encoded bytes, a ``(T, H, W, 3)`` array, or any iterable
    of images (PIL / numpy / tensor; frames given directly need ``source_fps`` to sample by ``fps``). A file that
    breaks mid-stream raises :class:`InvalidInputError` after the frames decoded so far were yielded.
    """
    if fps is not None:
        _check_positive_float(fps, "fps")
    if max_frames is not None:
        _check_positive_int(max_frames, "max_frames")
    if isinstance(src, (bytes, bytearray, memoryview)):
        with tempfile.TemporaryDirectory(prefix="mmfast-video-") as tmp:
            path = Path(tmp, "video")
            path.write_bytes(bytes(src))
            yield from iter_video_frames(path, fps, max_frames)
        return
    if isinstance(src, (str, os.PathLike)):
        frames: Iterator[tuple[float | None, np.ndarray]] = _iter_pyav(src)
    elif isinstance(src, np.ndarray) or _is_tensor(src):
        arr = _frames_array(src)
        frames = ((i / source_fps if source_fps else None, f) for i, f in enumerate(arr))
    elif isinstance(src, Iterable):
        frames = ((i / source_fps if source_fps else None, np.asarray(load_image(x))) for i, x in enumerate(src))
    else:
        raise InvalidInputError(f"Cannot stream a {type(src).__name__}; pass a path, bytes, frames or an iterable.")
    kept, step = 0, None if fps is None else 1.0 / fps
    for t, frame in frames:
        if step is not None:
            if t is None:
                raise InvalidInputError(f"Cannot sample at fps={fps}: the frame times are unknown (pass source_fps).")
            if t + 1e-6 < kept * step:
                continue
        yield frame
        kept += 1
        if max_frames is not None and kept >= max_frames:
            return


def _iter_pyav(src: str | os.PathLike[str]) -> Iterator[tuple[float | None, np.ndarray]]:
    """(seconds since the first frame, RGB frame) pairs from PyAV, decoded packet by packet."""
    import av

    url = isinstance(src, str) and "://" in src
    what = str(src) if url else _describe(src)
    path = src if url else str(_check_file(src, "video"))
    try:
        container = av.open(path, metadata_errors="ignore")
    except Exception as e:
        raise InvalidInputError(f"{what} is not a readable video (unsupported container, not a video, or corrupt): {e}") from e
    decoded, first = 0, None
    with container:
        stream = _video_stream(container)
        if stream is None:
            raise InvalidInputError(f"{what} has no video stream.")
        base = float(stream.time_base) if stream.time_base is not None else None
        rate = _stream_fps(stream)
        try:
            for frame in container.decode(stream):
                if frame.pts is not None and base is not None:
                    t = float(frame.pts) * base
                    first = t if first is None else first
                    t -= first
                else:
                    t = decoded / rate if rate else None
                yield t, frame.to_ndarray(format="rgb24")
                decoded += 1
        except InvalidInputError:
            raise
        except Exception as e:
            raise InvalidInputError(f"{what} is corrupt or truncated: decoding failed after {decoded} frames "
                                    f"({type(e).__name__}: {e}).") from e
    if decoded == 0:
        raise InvalidInputError(f"{what} contains no video frames.")


def _select_indices(
    total: int, src_fps: float | None, num_frames: int | None, fps: float | None, max_frames: int | None, what: str
) -> np.ndarray:
    if num_frames is not None:
        if num_frames > MAX_VIDEO_FRAMES:
            raise InvalidInputError(f"num_frames={num_frames} is beyond the {MAX_VIDEO_FRAMES} frames a video may have; "
                                    f"{what} has {total}: ask for fewer.")
        return sample_indices_uniform(total, min(num_frames, max_frames or num_frames))
    if fps is not None:
        if src_fps is None:
            raise InvalidInputError(
                f"Cannot sample {what} at fps={fps}: its frame rate is unknown; use num_frames (or pass source_fps)."
            )
        return sample_indices_fps(total, src_fps, fps, max_frames)
    if max_frames is not None and total > max_frames:
        return sample_indices_uniform(total, max_frames)
    return np.arange(total, dtype=np.int64)


# ---- frames given directly


def _stack_images(images: Sequence[ImageInput]) -> np.ndarray:
    """Images of one size -> ``(T, H, W, 3)`` uint8."""
    if len(images) == 0:
        raise InvalidInputError("The list of video frames is empty; pass at least one frame.")
    arrays = []
    for i, image in enumerate(images):
        try:
            arrays.append(np.asarray(load_image(image)))
        except InvalidInputError as e:
            raise InvalidInputError(f"Video frame {i}: {e}") from e
        if arrays[i].shape != arrays[0].shape:
            raise InvalidInputError(
                f"Video frames differ in size: frame 0 is {arrays[0].shape[1]}x{arrays[0].shape[0]}, frame {i} is "
                f"{arrays[i].shape[1]}x{arrays[i].shape[0]}; resize them to one size first."
            )
    return np.stack(arrays)


def _frames_array(src: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(T, H, W, 3)`` array or ``(T, H, W, 3)`` / ``(T, 3, H, W)`` tensor -> ``(T, H, W, 3)`` uint8."""
    what = _describe(src)
    array = _to_numpy(src, channels_first=src.ndim == 4)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise InvalidInputError(f"{what}: video frames must be a (T, H, W, 3) array, got shape {tuple(array.shape)}.")
    if array.shape[0] == 0:
        raise InvalidInputError(f"{what} holds no frames; pass at least one.")
    _check_size(array.shape[2], array.shape[1], what)
    return _as_uint8(array, what)


def _video_from_frames(
    frames: np.ndarray,
    source_fps: float | None,
    what: str,
    num_frames: int | None,
    fps: float | None,
    max_frames: int | None,
) -> Video:
    total = frames.shape[0]
    indices = _select_indices(total, source_fps, num_frames, fps, max_frames, what)
    timestamps = indices / source_fps if source_fps else np.full(len(indices), np.nan)
    return Video(
        frames=np.ascontiguousarray(frames[indices]),
        indices=indices,
        timestamps=timestamps.astype(np.float64),
        fps=float(source_fps) if source_fps else None,
        total_frames=total,
        duration=total / source_fps if source_fps else None,
        source=what,
    )


# ---- files


@dataclass(frozen=True)
class _Probe:
    """What PyAV's demuxer says about a file, without decoding a single frame."""

    format: str
    width: int
    height: int
    fps: float | None
    duration: float | None
    times: np.ndarray  # (total_frames,) presentation time of every frame, seconds since the first (maybe NaN)


def _load_video_bytes(data: bytes, backend: str | None, **sampling: Any) -> Video:
    what = f"<{len(data)} bytes>"
    if not data:
        raise InvalidInputError("Video bytes are empty; pass the encoded file content (mp4, webm, ...).")
    # decord needs a real file; the container format is sniffed from the content, so no suffix is needed.
    with tempfile.TemporaryDirectory(prefix="mmfast-video-") as tmp:
        path = Path(tmp, "video")
        path.write_bytes(data)
        return _load_video_file(path, what, backend, **sampling)


def _load_video_file(
    path: Path, what: str, backend: str | None, num_frames: int | None, fps: float | None, max_frames: int | None
) -> Video:
    probe = _probe(path, what)
    total = len(probe.times)
    indices = _select_indices(total, probe.fps, num_frames, fps, max_frames, what)
    size = len(indices) * probe.height * probe.width * 3
    if size > MAX_VIDEO_BYTES:
        raise InvalidInputError(
            f"{what}: {len(indices)} frames of {probe.width}x{probe.height} would take {size / 2**30:.1f} GiB "
            f"(limit {MAX_VIDEO_BYTES / 2**30:.0f} GiB); pass num_frames, fps or max_frames to sample fewer."
        )
    is_gif = probe.format == "gif"
    if is_gif and backend == "decord":
        raise InvalidInputError(f"{what} is a GIF, which decord cannot decode; use backend='pyav' or None.")

    frames = None
    if backend != "pyav" and not is_gif:
        try:
            frames = _decode_decord(path, indices, total, (probe.height, probe.width))
        except Exception as e:  # ImportError, RuntimeError, decord.DECORDError, ...: all mean "try PyAV"
            if backend == "decord":
                raise InvalidInputError(f"decord could not decode {what} ({type(e).__name__}: {e}).") from e
            logger.debug("decord could not decode %s (%s: %s); falling back to PyAV", what, type(e).__name__, e)
    if frames is None:
        frames = _decode_pyav(path, indices, (probe.height, probe.width), what)
    return Video(
        frames=frames,
        indices=indices,
        timestamps=probe.times[indices],
        fps=probe.fps,
        total_frames=total,
        duration=probe.duration,
        source=what if what.startswith("<") else str(path),
    )


def _probe(path: Path, what: str) -> _Probe:
    """Validate the container with PyAV and list its frames by demuxing (reading packets, no decoding)."""
    import av

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except Exception as e:  # av.error.InvalidDataError, av.error.FFmpegError and friends
        raise InvalidInputError(
            f"{what} is not a readable video (unsupported container, not a video, or corrupt): {e}"
        ) from e
    with container:
        try:
            return _probe_container(container, what, av.time_base)
        except InvalidInputError:
            raise
        except Exception as e:  # a damaged file can break PyAV anywhere, e.g. a stream with no codec
            raise InvalidInputError(f"{what} is corrupt: reading it failed ({type(e).__name__}: {e}).") from e


def _video_stream(container: Any) -> Any:
    """The first video stream that is not cover art (an attached picture is a one-frame "video" stream,
    and decord skips it too), or None."""
    import av

    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    return streams[0] if streams else None


def _probe_container(container: Any, what: str, time_base: int) -> _Probe:
    stream = _video_stream(container)
    if stream is None:
        raise InvalidInputError(f"{what} has no video stream (container: {container.format.name}).")
    if stream.codec_context is None:
        raise InvalidInputError(f"{what}: its video codec is unknown or unsupported (damaged file?).")
    width, height = stream.codec_context.width, stream.codec_context.height
    _check_size(width, height, f"{what} (frame size)")
    declared = stream.frames  # 0 when the container has no count (mkv, webm)
    if declared > MAX_VIDEO_FRAMES:
        raise InvalidInputError(f"{what} declares {declared} frames, more than the {MAX_VIDEO_FRAMES} accepted.")

    # Count packets rather than trust stream.frames: that is 0 for mkv / webm and counts dropped-frame slots
    # in avi (gradio's b.avi: 151 declared, 150 frames). decord counts frames the same way.
    pts: list[float] = []
    for packet in container.demux(stream):
        if packet.size == 0:  # the end-of-stream flush packet
            continue
        pts.append(math.nan if packet.pts is None else float(packet.pts))
        if len(pts) > MAX_VIDEO_FRAMES:
            raise InvalidInputError(f"{what} has more than {MAX_VIDEO_FRAMES} frames; cut it first.")
    if not pts:
        raise InvalidInputError(f"{what} contains no video frames.")
    if len(pts) == 1 and (container.format.name == "image2" or container.format.name.endswith("_pipe")):
        raise InvalidInputError(f"{what} is a still image ({container.format.name}), not a video: ask about it as an "
                                "image (image-qa; `mmfast ask` routes by content).")

    fps = _stream_fps(stream)
    timed = stream.time_base is not None and not np.isnan(pts).any()
    if timed:  # real presentation times, in display order (b.avi skips one, variable-rate videos many)
        times = (np.sort(pts) - min(pts)) * float(stream.time_base)
    else:
        times = np.arange(len(pts)) / fps if fps else np.full(len(pts), np.nan)

    # A header promising more frames than the file holds means a cut file (mp4 with its index first, avi).
    # Measure what is present by the time span covered, so frames an avi header counts but never stores
    # (dropped-frame slots) are not mistaken for missing ones; allow 1 % slack for rate rounding.
    present = max(len(pts), round(times[-1] * fps) + 1) if timed and fps else len(pts)
    if declared > 0 and present + max(2, declared // 100) < declared:
        raise InvalidInputError(
            f"{what} is truncated: its header lists {declared} frames but only {len(pts)} are present "
            "(incomplete download or copy?); re-download or re-encode it."
        )
    duration = container.duration / time_base if container.duration is not None else None
    return _Probe(
        format=container.format.name,
        width=width,
        height=height,
        fps=fps,
        duration=duration if duration is not None else (len(pts) / fps if fps else None),
        times=times.astype(np.float64),
    )


def _stream_fps(stream: Any) -> float | None:
    """Average frame rate, else FFmpeg's guess, else None. Read here rather than from decord's
    ``get_avg_fps()`` so that both backends report one rate, and files decord cannot open get one too."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and 0 < float(rate) < 10_000:
            return float(rate)
    return None


def _decode_decord(path: Path, indices: np.ndarray, total: int, size: tuple[int, int]) -> np.ndarray:
    """Frames at ``indices`` via decord -> ``(T, H, W, 3)`` uint8. Raises anything on failure."""
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    if len(reader) != total:  # decord must see the frames the probe counted, or indices mean other frames
        raise RuntimeError(f"decord counts {len(reader)} frames, the container {total}")
    batch = reader.get_batch(indices.tolist())
    frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)  # the bridge may be torch
    if frames.shape != (len(indices), *size, 3) or frames.dtype != np.uint8:
        raise RuntimeError(f"decord returned {frames.dtype} frames of shape {frames.shape}")
    return frames


def _decode_pyav(path: Path, indices: np.ndarray, size: tuple[int, int], what: str) -> np.ndarray:
    """Frames at ``indices`` via PyAV -> ``(T, H, W, 3)`` uint8.

    Decodes sequentially up to the last wanted frame: seeking is inexact in many containers, and the n-th
    decoded frame is exactly decord's frame n.
    """
    import av

    height, width = size
    wanted, last = set(indices.tolist()), int(indices.max())
    found: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            for frame in container.decode(_video_stream(container)):
                if decoded in wanted:
                    # to RGB, and to the probed size should the resolution change mid-stream
                    found[decoded] = frame.to_ndarray(format="rgb24", width=width, height=height)
                decoded += 1
                if decoded > last:
                    break
    except Exception as e:  # av.error.InvalidDataError on a damaged packet, ...
        raise InvalidInputError(
            f"{what} is corrupt or truncated: decoding failed after {decoded} frames ({type(e).__name__}: {e})."
        ) from e
    if len(found) < len(wanted):
        raise InvalidInputError(
            f"{what} is corrupt or truncated: only {decoded} frames could be decoded, frame {last} was requested."
        )
    return np.stack([found[i] for i in indices.tolist()])


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"{name} must be a positive number, got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise InvalidInputError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "MAX_VIDEO_BYTES",
    "MAX_VIDEO_FRAMES",
    "VIDEO_EXTENSIONS",
    "media_kind",
    "Video",
    "is_video_path",
    "load_image",
    "load_video",
    "sample_indices_fps",
    "sample_indices_uniform",
]
