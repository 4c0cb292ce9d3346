"""Gradio demo: ask a VLM about an image or a video, baseline and an accelerated method side by side.

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


def build_demo(model: Any = "tiny-vlm", methods: list[str] | None = None) -> gr.Blocks:
    """A Blocks app over ``model`` (anything ``mmfast.pipeline`` accepts)."""
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

    with gr.Blocks(title="mmfast: VLM acceleration") as demo:
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
    return demo.queue(default_concurrency_limit=1, max_size=20)


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
