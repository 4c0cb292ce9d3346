"""The app's VLM tabs: image / video QA (baseline vs a method, timed 3 times) and streaming video (full cache vs
VideoScan, live memory and ms per frame)."""

from __future__ import annotations

import statistics
import threading
import time
from functools import lru_cache
from typing import Any

import gradio as gr

import mmfast
from mmfast.apps.common import WHICH_COLORS, chart_frame, image_examples, knows, median_spread, video_examples

METHODS = [
    "pool(factor=2)",
    "turbo(keep=0.25)",
    "random(keep=0.25)",
    "adaptive_pool(keep=0.25)",
    "visionzip(keep=0.25)",
    "fastv(k=2,keep=0.25)",
    "kv_window(sink=4,recent=64)",
    "lookm(budget=0.2)",
    "zipvl()",
]
COLUMNS = ["method", "answer", "speed-up", "total ms", "prefill ms", "decode ms/tok", "visual tokens", "KV KiB"]


def regime_note(speedup: float, spec: str) -> str:
    """One line on why a measured speed-up is below 1x, or empty."""
    if speedup >= 1.0:
        return ""
    if any(k in spec for k in ("lookm", "zipvl", "kv_window")):
        return (f"{spec} is {speedup:.2f}x here: it shrinks the KV cache (see KV KiB), but on a CPU a tiny model's "
                "decode is compute-bound and attention reads a dequantized / compacted copy, so it saves memory, not "
                "time; on GPUs decode is memory-bound (`mmfast bench vlm-speed`).")
    return (f"{spec} is {speedup:.2f}x here: the model is tiny and CPU-bound, so the method's own work (scoring, "
            "merging) is not paid back by the fewer tokens; the gain grows with the visual-token count.")


def qa_tab(model: Any, shared: tuple[Any, Any], methods: list[str], repeats: int = 3) -> None:
    """Image / video QA inside a ``gr.Blocks`` context: baseline and a method on the same input, each timed
    ``repeats`` times (interleaved); medians with the spread; the measured accuracy-vs-speed chart of the method."""

    @lru_cache(maxsize=16)
    def pipe(task: str, spec: str) -> Any:
        return mmfast.pipeline(task, model=shared, accelerate=None if spec == "baseline" else spec)

    def answer(image: Any, video: Any, question: str, spec: str, max_new_tokens: int, num_frames: int, n: int):
        if not (question or "").strip() or (image is None and not video):
            raise gr.Error("Give an image or a video, and a question.")
        task, kw = ("video-qa", {"video": video, "num_frames": int(num_frames)}) if video else ("image-qa", {"image": image})
        runs: dict[str, list[tuple[float, dict[str, Any]]]] = {"baseline": [], spec: []}
        try:
            pipes = {s: pipe(task, s) for s in runs}
            for _ in range(max(1, int(n))):  # interleaved, so a busy moment hurts both sides alike
                for s, p in pipes.items():
                    t0 = time.perf_counter()
                    out = p(question=question, max_new_tokens=int(max_new_tokens), **kw)
                    runs[s].append(((time.perf_counter() - t0) * 1e3, out))
        except mmfast.errors.MMFastError as e:  # bad media / bad spec: a message, not a traceback
            raise gr.Error(str(e)) from e
        base_total = median_spread([t for t, _ in runs["baseline"]])
        rows = []
        for s, rs in runs.items():
            st = rs[0][1]["stats"]
            totals = [t for t, _ in rs]
            speed = statistics.median([t for t, _ in runs["baseline"]]) / statistics.median(totals)
            rows.append([s, rs[0][1]["answer"] or "(empty answer)", round(speed, 2), median_spread(totals),
                         median_spread([o["stats"].get("prefill_ms") for _, o in rs]),
                         median_spread([o["stats"].get("decode_ms_per_token") for _, o in rs]),
                         f"{st.get('visual_tokens_kept')} / {st.get('visual_tokens_in')}",
                         round((st.get("kv_bytes") or 0) / 1024, 1)])
        note = regime_note(rows[1][2], spec)
        head = f"median of {len(runs['baseline'])} runs (range in brackets); baseline total {base_total} ms."
        return rows, head + (" " + note if note else ""), chart_frame("vlm", spec)

    with gr.Row():
        with gr.Column(scale=5):
            with gr.Row():
                image = gr.Image(type="pil", label="image", height=220, elem_id="qa-image")
                video = gr.Video(label="or a video", height=220)
            question = gr.Textbox(label="question", value="what color is the star?", lines=1, max_length=2000)
            with gr.Row():
                spec = gr.Dropdown(methods, value=methods[0], label="accelerate", allow_custom_value=True, scale=3)
                go = gr.Button("Ask", variant="primary", scale=1)
            with gr.Accordion("options", open=False):
                with gr.Row():
                    max_new = gr.Slider(1, 64, value=16, step=1, label="max new tokens")
                    frames = gr.Slider(2, 32, value=16, step=1, label="video frames")
                    n = gr.Slider(1, 5, value=repeats, step=1, label="timed runs (median)")
            gr.Examples(image_examples(_is_zoo(model)), [image, question], label="images (held-out scenes, photos)")
            gr.Examples(video_examples(_is_zoo(model)), [video, question], label="videos")
        with gr.Column(scale=6):
            gr.Markdown(knows(model))
            table = gr.Dataframe(headers=COLUMNS, label="baseline vs accelerated (same input)", wrap=True)
            note = gr.Markdown()
            chart = gr.ScatterPlot(chart_frame("vlm", methods[0]), x="speed-up", y="accuracy retained",
                                   color="which", color_map=WHICH_COLORS, tooltip=["method", "source"], height=260,
                                   label="measured on tiny-vlm (eval/results): accuracy retained vs prefill speed-up; "
                                         "red: the selected method, black: baseline")
    go.click(answer, [image, video, question, spec, max_new, frames, n], [table, note, chart], api_name="answer")
    spec.change(lambda s: chart_frame("vlm", s), [spec], [chart], api_name=False)


def stream_tab(shared: Any, scan_model: Any) -> None:
    """A video plays frame by frame into two streaming sessions, the full cache and VideoScan; ask at any moment;
    the memory each holds and the ms per frame are plotted live."""
    import pandas as pd

    from mmfast.media import iter_video_frames

    live: dict[str, dict[str, Any]] = {}  # per browser session: the two streams, a lock, the curves

    def start(video: Any, fps: float, request: gr.Request):
        if not video:
            raise gr.Error("Give a video to stream.")
        try:
            sessions = {
                "full cache": mmfast.pipeline("streaming-video-qa", model=shared),
                "videoscan": mmfast.pipeline("streaming-video-qa", model=scan_model, accelerate="videoscan(memory=64)"),
            }
            run = live[request.session_hash] = {"sessions": sessions, "lock": threading.Lock(), "rows": []}
            for n, frame in enumerate(iter_video_frames(video, fps=float(fps), max_frames=MAX_STREAM_FRAMES), start=1):
                with run["lock"]:
                    for name, s in sessions.items():
                        st = s.push(frame)
                        run["rows"].append({"frames": n, "method": name, "KV KiB": st["kv_bytes"] / 1024,
                                            "ms per frame": st["last_push_ms"]})
                df = pd.DataFrame(run["rows"])
                yield frame, df, df, f"{n} frames streamed"
        except mmfast.errors.MMFastError as e:
            raise gr.Error(str(e)) from e

    def ask(question: str, request: gr.Request):
        run = live.get(request.session_hash)
        if run is None or not (question or "").strip():
            raise gr.Error("Start a stream first, and give a question.")
        rows = []
        with run["lock"]:  # between two frames: the streams stand still while they answer
            for name, s in run["sessions"].items():
                try:
                    out = s.ask(question, max_new_tokens=16)
                except mmfast.errors.MMFastError as e:
                    raise gr.Error(str(e)) from e
                st = out["stats"]
                rows.append([name, out["answer"] or "(empty answer)", st["frames_seen"], st["tokens_held"],
                             round(st["kv_bytes"] / 1024, 1), round(st["prefill_ms"] + st["decode_ms"], 1)])
        return rows

    gr.Markdown(f"The video plays into both streams frame by frame (at most {MAX_STREAM_FRAMES} frames); ask at any "
                f"moment, the streams go on unchanged. {knows(scan_model)}")
    with gr.Row():
        with gr.Column():
            video = gr.Video(label="video", height=220, elem_id="stream-video")
            with gr.Row():
                fps = gr.Slider(0.5, 8, value=2, step=0.5, label="frames per second streamed", scale=3)
                go = gr.Button("Stream", variant="primary", scale=1)
            gr.Examples(video_examples(_is_zoo(scan_model)), [video], label="videos")
            frame = gr.Image(label="now playing", interactive=False, height=180)
            status = gr.Textbox(label="stream")
        with gr.Column():
            with gr.Row():
                question = gr.Textbox(label="question", value="how many objects are there at the end?", scale=3,
                                      max_length=2000)
                ask_btn = gr.Button("Ask now", scale=1)
            answers = gr.Dataframe(headers=["stream", "answer", "frames", "cache entries", "KV KiB", "question ms"],
                                   label="answers")
            colors = {"full cache": "#1f77b4", "videoscan": "#ff7f0e"}
            kv = gr.LinePlot(x="frames", y="KV KiB", color="method", color_map=colors, height=240,
                             label="KV held (blue: full cache, orange: VideoScan)")
            lat = gr.LinePlot(x="frames", y="ms per frame", color="method", color_map=colors, height=240,
                              label="ms per frame (blue: full cache, orange: VideoScan)")
    go.click(start, [video, fps], [frame, kv, lat, status], api_name="stream", concurrency_id="stream")
    ask_btn.click(ask, [question], [answers], api_name="ask_stream", concurrency_id="ask")


#: the stream tab stops after this many frames (world.mp4 at 1 fps is 30)
MAX_STREAM_FRAMES = 600


def _is_zoo(model: Any) -> bool:
    return isinstance(model, str) and model.startswith("tiny-vlm")
