"""Gradio demo: AR image generation, baseline and an accelerated decoder side by side (same seed).

Two tabs: next-token models (tiny-ar: SJD, LANTERN, GSD, EAGLE) and next-scale models (the tiny-var pair: the
drafter alone vs CoDe handing off to tiny-var-small), each with the measured speed-up.

    python apps/gen_demo.py --model tiny-ar --var-model tiny-var --port 7861
"""

from __future__ import annotations

import argparse
from functools import lru_cache
from typing import Any

import gradio as gr

import mmfast
from mmfast.pipelines.image_gen import image_grid

METHODS = ["sjd(window=16)", "sjd(window=16,init='repeat_vertical')", "lantern(k=1000,delta=0.1)", "gsd()", "eagle_sd()"]
CODE_METHODS = [f"code(refiner='tiny-var-small',draft_scales={n})" for n in (4, 3, 5, 2)]
STAT_KEYS = ["steps", "step_compression", "wall_ms", "tokens", "speedup"]


def _tab(model: Any, task: str, methods: list[str], title: str) -> None:
    """One side-by-side tab (inside a gr.Blocks context)."""
    base = mmfast.pipeline(task, model=model)

    @lru_cache(maxsize=16)
    def pipe(spec: str) -> Any:
        return base if spec == "baseline" else mmfast.pipeline(task, model=base.adapter, accelerate=spec)

    def generate(conditions: str, spec: str, seed: int, n: int):
        conds: list[Any] = [c.strip() for c in conditions.split(",") if c.strip()]
        if not conds:
            raise gr.Error("Give at least one label / prompt (comma-separated).")
        if task == "class-to-image":
            conds = [int(c) if c.isdigit() else c for c in conds]
        grids, rows, wall = [], [], {}
        for s in ["baseline", spec]:
            try:
                res = pipe(s)(conds, num_images_per_condition=int(n), seed=int(seed), batch_size=1, progress=False)
            except mmfast.errors.MMFastError as e:
                raise gr.Error(str(e)) from e
            wall[s] = res.stats["wall_ms"]
            stats = {**res.stats, "speedup": wall["baseline"] / wall[s]}
            grids.append(image_grid(res.images, cols=len(conds) if n > 1 else min(len(conds), 10), scale=4))
            rows.append([s, *[round(stats[k], 2) if isinstance(stats[k], float) else stats[k] for k in STAT_KEYS]])
        return grids[0], grids[1], rows

    gr.Markdown(f"## {title} (same seed)")
    with gr.Row():
        conditions = gr.Textbox(label="labels / prompts (comma-separated)", value="0,1,2,3,4,5,6,7,8,9")
        spec = gr.Dropdown(methods, value=methods[0], label="decoder", allow_custom_value=True)
        seed = gr.Number(value=0, precision=0, label="seed")
        n = gr.Slider(1, 4, value=1, step=1, label="images per label")
    go = gr.Button("Generate", variant="primary")
    with gr.Row():
        base_img = gr.Image(label="baseline")
        fast_img = gr.Image(label="accelerated")
    table = gr.Dataframe(headers=["method", *STAT_KEYS], label="stats (speedup: baseline wall time / this)")
    go.click(generate, [conditions, spec, seed, n], [base_img, fast_img, table],
             api_name="generate" if getattr(base.adapter, "order", "raster") == "raster" else "generate_scales")


def build_demo(model: Any = "tiny-ar", task: str = "class-to-image", methods: list[str] | None = None,
               var_model: Any = "tiny-var", var_methods: list[str] | None = None) -> gr.Blocks:
    """The app: a next-token tab for ``model`` and, when ``var_model`` is given and installed, a next-scale tab."""
    from mmfast import zoo

    has_var = var_model is not None and (not isinstance(var_model, str) or not zoo.is_zoo_name(var_model)
                                         or zoo.available().get(var_model, False))
    with gr.Blocks(title="mmfast: AR image generation") as demo:
        with gr.Tab("next-token (speculative decoding)"):
            _tab(model, task, methods or METHODS, "mmfast: baseline vs speculative decoding")
        if has_var:
            with gr.Tab("next-scale (VAR + CoDe)"):
                _tab(var_model, "class-to-image", var_methods or CODE_METHODS,
                     "mmfast: VAR drafter alone vs Collaborative Decoding (drafter + small refiner)")
    return demo.queue(default_concurrency_limit=1, max_size=20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-ar")
    ap.add_argument("--task", default="class-to-image", choices=["class-to-image", "text-to-image"])
    ap.add_argument("--var-model", default="tiny-var", help="next-scale tab ('none' to hide it)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7861)
    args = ap.parse_args()
    build_demo(args.model, args.task, var_model=None if args.var_model == "none" else args.var_model).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
