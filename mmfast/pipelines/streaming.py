"""``streaming-video-qa``: a session over one video stream; frames arrive, questions come at any moment.

    s = mmfast.pipeline("streaming-video-qa", model="tiny-vlm-scan", accelerate="videoscan(memory=64)")
    s.feed("clip.mp4", fps=1.0)          # decoded frame by frame, never the whole file
    s.push(frame)                        # PIL / numpy (H, W, 3) / tensor, or a list / (T, H, W, 3) array of them
    s.ask("what happened?")              # {"answer": ..., "stats": {...}}; the stream goes on unchanged
    s.state                              # frames seen, tokens held, KV bytes
    s.reset()                            # a new stream

Strategies (each a baseline for the others, measured side by side by ``mmfast bench video-stream``):

* ``accelerate=None``: the full cache, every frame's tokens kept: the answers equal a one-shot ``video-qa`` over
  the same frames (tested token for token);
* ``accelerate="videoscan(...)"``: VideoScan's semantic carriers and memory bank;
* ``accelerate="kv_window(sink=..., recent=...)"``: StreamingLLM over the stream's tokens;
* ``strategy="reprefill"`` (``num_frames=16``): what a user without a streaming API does: keep the frames and,
  for every question, run ``video-qa`` on ``num_frames`` of everything seen so far.

Vision methods (``pool``, ``random``, ...) reduce every frame before it is prefilled.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np

from mmfast.accel.spec import Composed
from mmfast.errors import IncompatibleAcceleratorError, InvalidInputError, UnsupportedModelError
from mmfast.media import _is_tensor, _to_numpy, iter_video_frames, load_image, sample_indices_uniform
from mmfast.models.stream import VideoStream
from mmfast.models.vlm import VLMAdapter
from mmfast.pipelines.base import check_context, check_generation_kwargs, check_question
from mmfast.types import Stage

STRATEGIES = ("cache", "reprefill")


class StreamingVideoQAPipeline:
    """A streaming video-QA session (see the module docstring)."""

    task: ClassVar[str] = "streaming-video-qa"

    def __init__(self, adapter: VLMAdapter, accelerate: Composed, model_name: str = "", strategy: str = "cache",
                 num_frames: int = 16, **defaults: Any):
        if not adapter.supports_video:
            raise UnsupportedModelError(f"{model_name or type(adapter.model).__name__} does not take videos.")
        if strategy not in STRATEGIES:
            raise InvalidInputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise InvalidInputError(f"num_frames must be a positive integer, got {num_frames!r}.")
        for acc in accelerate:
            bad = [s for s in acc.stages if s in (Stage.PREFILL, Stage.DECODE)]
            if bad or (Stage.KV in acc.stages and not hasattr(acc, "stream_keep")):
                raise IncompatibleAcceleratorError(
                    f"{acc.spec()} cannot act on a stream: streaming-video-qa takes a stream method (videoscan), a "
                    "streaming KV method (kv_window) and vision methods (applied to every frame)."
                )
        if strategy == "reprefill" and len(accelerate):
            raise IncompatibleAcceleratorError("strategy='reprefill' re-runs video-qa: pass accelerate=None with it.")
        self.adapter, self.accelerate, self.model_name = adapter, accelerate, model_name
        self.strategy, self.num_frames, self.defaults = strategy, num_frames, defaults
        self.reset()

    @property
    def model(self) -> Any:
        return self.adapter.model

    @property
    def processor(self) -> Any:
        return self.adapter.processor

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model_name!r}, accelerate={self.accelerate.spec()!r}, "
                f"strategy={self.strategy!r}, frames_seen={self.state['frames_seen']})")

    # ---- the stream -----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the stream (a new video starts)."""
        accs = list(self.accelerate)
        self._stream = VideoStream(
            self.adapter,
            vision_methods=[a for a in accs if Stage.VISION in a.stages],
            stream_method=next((a for a in accs if Stage.STREAM in a.stages), None),
            kv_methods=[a for a in accs if Stage.KV in a.stages],
        )
        self._pending: list[np.ndarray] = []  # frames waiting for their chunk (Qwen: temporal patches of 2)
        self._frames: list[np.ndarray] = []  # reprefill keeps every frame
        self._size: tuple[int, int] | None = None
        self._pushed, self._push_s, self._last_ms = 0, 0.0, None

    @property
    def state(self) -> dict[str, Any]:
        """Frames seen, tokens / carriers held, KV bytes, ms per pushed frame."""
        st = self._stream.state()
        st["frames_seen"] = self._pushed
        st["frames_pending"] = len(self._pending)
        if self.stream_method is not None and hasattr(self.stream_method, "held"):
            st.update(self.stream_method.held(self._stream))
        if self.strategy == "reprefill":
            st["frames_held"] = len(self._frames)
            st["frame_bytes_held"] = int(sum(f.nbytes for f in self._frames))
        st["ms_per_frame"] = self._push_s / self._pushed * 1e3 if self._pushed else None
        st["last_push_ms"] = self._last_ms
        return st

    @property
    def stream_method(self) -> Any:
        return self._stream.stream_method

    def push(self, frames: Any) -> dict[str, Any]:
        """Add one frame (PIL / (H, W, 3) array / (3, H, W) or (H, W, 3) tensor) or several (a list, a (T, H, W, 3)
        array). Frames must keep the stream's size. Returns :attr:`state`."""
        batch = self._frames_of(frames)
        size = self._size or batch[0].shape[:2]
        side = self.adapter.min_image_side
        if min(size) < side:
            raise InvalidInputError(f"frames of {size[1]}x{size[0]} pixels are smaller than one {side}x{side} patch of "
                                    "this model's vision tower: there is nothing to see. The stream is unchanged.")
        for frame in batch:  # every frame checked before any is pushed: a bad batch leaves the stream as it was
            if frame.shape[:2] != size:
                raise InvalidInputError(
                    f"frame of {frame.shape[1]}x{frame.shape[0]} in a stream of {size[1]}x{size[0]} frames: a stream "
                    "keeps one frame size (resize the frames, or reset() for a new stream). The stream is unchanged."
                )
        self._size = size
        t0 = time.perf_counter()
        for frame in batch:
            if self.strategy == "reprefill":
                self._frames.append(frame)
                continue
            self._pending.append(frame)
            if len(self._pending) == self.adapter.stream_chunk:
                chunk, self._pending = self._pending, []
                with self.accelerate(self.adapter):
                    self._stream.add(chunk)
        elapsed = time.perf_counter() - t0
        self._pushed += len(batch)
        self._push_s += elapsed
        self._last_ms = elapsed / len(batch) * 1e3
        return self.state

    def feed(self, source: Any, fps: float | None = 1.0, max_frames: int | None = None,
             source_fps: float | None = None, every: int = 1, callback: Any = None) -> int:
        """Push the frames of a video file / URL / bytes / iterable of frames, decoded incrementally, about ``fps``
        per second (None: all). ``callback(session, frames_pushed)`` runs every ``every`` frames (a UI, a question
        on a schedule). Returns the number of frames pushed."""
        n = 0
        for frame in iter_video_frames(source, fps=fps, max_frames=max_frames, source_fps=source_fps):
            self.push(frame)
            n += 1
            if callback is not None and n % every == 0:
                callback(self, n)
        return n

    def ask(self, question: str, **gen_kwargs: Any) -> dict[str, Any]:
        """Answer from what the stream holds now; the stream is not changed. ``max_new_tokens`` etc. go to
        ``generate`` (greedy by default)."""
        question = check_question(question)
        check_generation_kwargs(gen_kwargs)
        n_q = len(self.adapter.tokenizer(question, add_special_tokens=False)["input_ids"])
        check_context(self.adapter, n_q, gen_kwargs.get("max_new_tokens", self.defaults.get("max_new_tokens")),
                      "the question")
        if self.strategy == "reprefill":
            return self._ask_reprefill(question, gen_kwargs)
        if self._stream.frames == 0:
            raise InvalidInputError(
                "ask() before any frame: push() or feed() frames first"
                + (f" (a chunk is {self.adapter.stream_chunk} frames; {len(self._pending)} waiting)." if self._pending
                   else ".")
            )
        gen = {"max_new_tokens": 32, **{k: v for k, v in self.defaults.items() if k == "max_new_tokens"}, **gen_kwargs}
        with self.accelerate(self.adapter):
            new, stats = self._stream.answer(question, **gen)
        text = self.adapter.tokenizer.decode(new, skip_special_tokens=True).strip()
        return {"answer": text, "stats": {"method": self.accelerate.spec(), **self.state, **stats,
                                          "empty_answer": not text}}

    def _ask_reprefill(self, question: str, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        if not self._frames:
            raise InvalidInputError("ask() before any frame: push() or feed() frames first.")
        idx = sample_indices_uniform(len(self._frames), min(self.num_frames, len(self._frames)))
        inputs = self.adapter.preprocess(question, video=np.stack([self._frames[i] for i in idx]))
        result = self.adapter.generate(inputs, **{"max_new_tokens": 32, **gen_kwargs})
        stats = {"method": f"reprefill(num_frames={self.num_frames})", **self.state, **result.stats,
                 "frames_used": len(idx), "empty_answer": not result.text.strip()}
        return {"answer": result.text, "stats": stats}

    # ---- inputs ---------------------------------------------------------------------------------------------
    @staticmethod
    def _frames_of(frames: Any) -> list[np.ndarray]:
        if frames is None:
            raise InvalidInputError("push() needs a frame (PIL image, (H, W, 3) array, tensor) or a list of them.")
        if isinstance(frames, np.ndarray) or _is_tensor(frames):
            arr = _to_numpy(frames, channels_first=True)
            if arr.ndim == 3:
                return [np.asarray(load_image(arr))]
            if arr.ndim == 4:
                if arr.shape[0] == 0:
                    raise InvalidInputError("push() got a stream of zero frames.")
                return [np.asarray(load_image(f)) for f in arr]
            raise InvalidInputError(f"push() takes (H, W, 3) or (T, H, W, 3) frames, got shape {tuple(arr.shape)}.")
        if isinstance(frames, (list, tuple)):
            if not frames:
                raise InvalidInputError("push() got an empty list of frames.")
            out = []
            for i, f in enumerate(frames):
                try:
                    out.append(np.asarray(load_image(f)))
                except InvalidInputError as e:
                    raise InvalidInputError(f"frame {i}: {e}") from e
            return out
        if isinstance(frames, Iterable) and not isinstance(frames, (str, bytes)):
            return StreamingVideoQAPipeline._frames_of(list(frames))
        return [np.asarray(load_image(frames))]
