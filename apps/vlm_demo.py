"""Gradio demo: ask a VLM about an image or a video, baseline and an accelerated method side by side; stream a
video frame by frame into the full cache and VideoScan and ask at any moment.

    python apps/vlm_demo.py --model tiny-vlm --port 7860
    # then open http://127.0.0.1:7860

``build_demo(model)`` is importable without launching (tests drive it with gradio_client).
"""

from __future__ import annotations

import argparse
from functools import lru_cache
from typing import Any

import gradio as gr

import mmfast

METHODS = [
    "pool(factor=2)",
    "random(keep=0.25)",
    "turbo(keep=0.25)",
    "visionzip(keep=0.25)",
    "fastv(k=2,keep=0.25)",
    "kv_window(sink=4,recent=64)",
    "lookm(budget=0.2)",
    "zipvl()",
]
STAT_KEYS = ["visual_tokens_in", "visual_tokens_kept", "prompt_tokens", "kv_bytes", "prefill_ms", "decode_ms_per_token", "new_tokens"]


def build_demo(model: Any = "tiny-vlm", methods: list[str] | None = None, scan_model: Any = None) -> gr.Blocks:
    """A Blocks app over ``model`` (anything ``mmfast.pipeline`` accepts): an Ask tab (baseline vs a method) and a
    Stream tab (the full-cache stream vs VideoScan on ``scan_model``, default tiny-vlm-scan when installed)."""
    if scan_model is None:
        scan_model = "tiny-vlm-scan" if model == "tiny-vlm" and mmfast.zoo.available().get("tiny-vlm-scan") else model
    base_img = mmfast.pipeline("image-qa", model=model)
    shared = (base_img.model, base_img.processor)

    @lru_cache(maxsize=16)
    def pipe(task: str, spec: str) -> Any:
        return mmfast.pipeline(task, model=shared, accelerate=None if spec == "baseline" else spec)

    def answer(image: Any, video: Any, question: str, spec: str, max_new_tokens: int, num_frames: int):
        if not question or (image is None and not video):
            raise gr.Error("Give an image or a video, and a question.")
        task, kw = ("video-qa", {"video": video, "num_frames": int(num_frames)}) if video else ("image-qa", {"image": image})
        rows, answers = [], []
        for s in ["baseline", spec]:
            try:
                out = pipe(task, s)(question=question, max_new_tokens=int(max_new_tokens), **kw)
            except mmfast.errors.MMFastError as e:  # bad media / bad spec: a message, not a traceback
                raise gr.Error(str(e)) from e
            answers.append(out["answer"])
            rows.append([s, *[_fmt(out["stats"].get(k)) for k in STAT_KEYS]])
        return answers[0], answers[1], rows

    with gr.Blocks(title="mmfast: VLM acceleration") as demo, gr.Tabs():
        with gr.Tab("Ask"):
            gr.Markdown("## mmfast: the same question, baseline and accelerated\nAnswers and stats side by side.")
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="pil", label="image")
                    video = gr.Video(label="or a video")
                    question = gr.Textbox(label="question", value="what color is the star?")
                    spec = gr.Dropdown(methods or METHODS, value=(methods or METHODS)[0], label="accelerate", allow_custom_value=True)
                    with gr.Row():
                        max_new = gr.Slider(1, 64, value=16, step=1, label="max new tokens")
                        frames = gr.Slider(2, 32, value=16, step=1, label="video frames")
                    go = gr.Button("Ask", variant="primary")
                with gr.Column():
                    base_ans = gr.Textbox(label="baseline answer")
                    fast_ans = gr.Textbox(label="accelerated answer")
                    table = gr.Dataframe(headers=["method", *STAT_KEYS], label="stats")
            go.click(answer, [image, video, question, spec, max_new, frames], [base_ans, fast_ans, table], api_name="answer")
        with gr.Tab("Stream"):
            _stream_tab(shared, scan_model)
    return demo.queue(default_concurrency_limit=1, max_size=20)


def _stream_tab(shared: Any, scan_model: Any) -> None:
    """A video plays frame by frame into two streaming sessions, the full cache and VideoScan; ask at any moment;
    the memory each holds and the ms per frame are plotted live."""
    import threading

    import pandas as pd

    from mmfast.media import iter_video_frames

    live: dict[str, dict[str, Any]] = {}  # per browser session: the two streams, a lock, the curves

    def start(video: Any, fps: float, request: gr.Request):
        if not video:
            raise gr.Error("Give a video to stream.")
        sessions = {
            "full cache": mmfast.pipeline("streaming-video-qa", model=shared),
            "videoscan": mmfast.pipeline("streaming-video-qa", model=scan_model, accelerate="videoscan(memory=64)"),
        }
        run = live[request.session_hash] = {"sessions": sessions, "lock": threading.Lock(), "rows": []}
        try:
            for n, frame in enumerate(iter_video_frames(video, fps=float(fps)), start=1):
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
        if run is None or not question:
            raise gr.Error("Start a stream first, and give a question.")
        rows = []
        with run["lock"]:  # between two frames: the streams stand still while they answer
            for name, s in run["sessions"].items():
                try:
                    out = s.ask(question, max_new_tokens=16)
                except mmfast.errors.MMFastError as e:
                    raise gr.Error(str(e)) from e
                st = out["stats"]
                rows.append([name, out["answer"], st["frames_seen"], st["tokens_held"], round(st["kv_bytes"] / 1024, 1),
                             round(st["prefill_ms"] + st["decode_ms"], 1)])
        return rows

    gr.Markdown("## Streaming video QA: the full cache vs VideoScan\nThe video plays into both streams frame by frame; "
                "ask at any moment (the streams go on unchanged).")
    with gr.Row():
        with gr.Column():
            video = gr.Video(label="video")
            fps = gr.Slider(0.5, 8, value=1, step=0.5, label="frames per second streamed")
            go = gr.Button("Stream", variant="primary")
            frame = gr.Image(label="now playing", interactive=False)
            status = gr.Textbox(label="stream")
        with gr.Column():
            question = gr.Textbox(label="question", value="how many objects are there at the end?")
            ask_btn = gr.Button("Ask now")
            answers = gr.Dataframe(headers=["stream", "answer", "frames", "cache entries", "KV KiB", "question ms"],
                                   label="answers")
            kv = gr.LinePlot(x="frames", y="KV KiB", color="method", label="KV held")
            lat = gr.LinePlot(x="frames", y="ms per frame", color="method", label="ms per frame")
    go.click(start, [video, fps], [frame, kv, lat, status], api_name="stream", concurrency_id="stream")
    ask_btn.click(ask, [question], [answers], api_name="ask_stream", concurrency_id="ask")


def _fmt(v: Any) -> Any:
    return round(v, 1) if isinstance(v, float) else v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-vlm")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    args = ap.parse_args()
    build_demo(args.model).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
