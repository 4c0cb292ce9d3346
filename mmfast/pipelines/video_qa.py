"""``video-qa`` pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmfast.media import is_video_path, load_video
from mmfast.pipelines.base import Prepared, VLMPipeline

DEFAULT_NUM_FRAMES = 8
#: with ``fps=``, at most this many frames unless ``max_frames`` says otherwise (frames_capped in the stats)
DEFAULT_MAX_FRAMES = 256


class VideoQAPipeline(VLMPipeline):
    """``pipe(video=..., question=..., num_frames=8 | fps=1.0) -> {"answer": str, "stats": {...}}``.

    ``video`` is a path or bytes (decoded with decord, falling back to PyAV), a list of frames (images) or a
    (T, H, W, 3) array. A list of paths / of frame lists makes a batch. Frames are sampled uniformly
    (``num_frames``, default: the model's ``mmfast_num_frames`` or 8) or at ``fps`` frames per second: never
    more than every frame (``fps_sampled`` in the stats says what was sampled) nor ``max_frames`` (default 256 with
    ``fps``; ``frames_capped`` says so). Frames smaller than one vision patch, a prompt beyond the model's context
    and a still image given as a video are typed errors.
    """

    task = "video-qa"
    media_key = "video"

    def _is_media_list(self, media: Any) -> bool:
        # a list of paths / bytes / frame-lists is a batch; a list of images is ONE video's frames
        if not isinstance(media, (list, tuple)) or not media:
            return False
        first = media[0]
        return isinstance(first, (bytes, list, tuple)) or (isinstance(first, str) and is_video_path(first)) or (
            isinstance(first, np.ndarray) and first.ndim == 4
        ) or hasattr(first, "__fspath__") and is_video_path(first)

    def prepare(self, kw: dict[str, Any]) -> Prepared:
        kw = dict(kw)
        question = self._question(kw, self.defaults.get("question"))
        num_frames = kw.pop("num_frames", None)
        fps = kw.pop("fps", None)
        max_frames = kw.pop("max_frames", None)
        if num_frames is None and fps is None:
            num_frames = self.defaults.get("num_frames") or getattr(
                self.adapter.config, "mmfast_num_frames", DEFAULT_NUM_FRAMES
            )
        if fps is not None and max_frames is None:
            max_frames = self.defaults.get("max_frames") or getattr(self.adapter.config, "mmfast_max_frames",
                                                                      DEFAULT_MAX_FRAMES)
        video = load_video(kw.pop("video", None), num_frames=num_frames, fps=fps, max_frames=max_frames)
        h, w = video.frames.shape[1:3]
        self._check_images([_Size(w, h)])
        inputs = self.adapter.preprocess(question, video=video.frames)
        stats = {"frames": len(video), "frame_indices": video.indices.tolist(), "source_frames": video.total_frames}
        if fps is not None:  # what was asked vs what was sampled: never more than every frame, nor max_frames
            stats["fps_requested"] = float(fps)
            if video.fps:
                stats["fps_sampled"] = round(len(video) * video.fps / max(video.total_frames, 1), 3)
            stats["frames_capped"] = len(video) == max_frames and video.total_frames > max_frames
        return self._checked(inputs, kw, stats)


class _Size:
    """A (width, height) pair where the size check expects an image."""

    def __init__(self, w: int, h: int):
        self.size = (int(w), int(h))
