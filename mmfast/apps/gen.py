"""The app's generation tab: an AR image model, baseline and an accelerated decoder on the same seed, timed 3 times;
next-token models (SJD, LANTERN, GSD, EAGLE) and next-scale models (VAR drafter alone vs CoDe)."""

from __future__ import annotations

import statistics
import time
from functools import lru_cache
from typing import Any

import gradio as gr

import mmfast
from mmfast.apps.common import WHICH_COLORS, chart_frame, knows, median_spread
from mmfast.pipelines.image_gen import image_grid

METHODS = ["sjd(window=16)", "sjd(window=16,init='repeat_vertical')", "lantern(k=1000,delta=0.1)", "gsd()", "eagle_sd()"]
CODE_METHODS = [f"code(refiner='tiny-var-small',draft_scales={n})" for n in (4, 3, 5, 2)]
COLUMNS = ["method", "forwards per image", "step compression", "wall ms", "speed-up"]
MAX_CONDITIONS = 20


def gen_section(model: Any, task: str, methods: list[str], api_name: str, repeats: int = 3) -> None:
    """One side-by-side generator (inside a ``gr.Blocks`` context)."""
    base = mmfast.pipeline(task, model=model)

    @lru_cache(maxsize=16)
    def pipe(spec: str) -> Any:
        return base if spec == "baseline" else mmfast.pipeline(task, model=base.adapter, accelerate=spec)

    def generate(conditions: str, spec: str, seed: float, n: float, runs: float):
        conds: list[Any] = [c.strip() for c in (conditions or "").split(",") if c.strip()]
        if not conds:
            raise gr.Error("Give at least one label / prompt (comma-separated).")
        if len(conds) > MAX_CONDITIONS:
            raise gr.Error(f"At most {MAX_CONDITIONS} labels / prompts per request (got {len(conds)}).")
        if task == "class-to-image":
            conds = [int(c) if c.lstrip("-").isdigit() else c for c in conds]
        res: dict[str, list[Any]] = {"baseline": [], spec: []}
        try:
            for _ in range(max(1, int(runs))):  # interleaved: a busy moment hurts both sides alike
                for s in res:
                    t0 = time.perf_counter()
                    out = pipe(s)(conds, num_images_per_condition=int(n), seed=int(seed or 0), batch_size=1,
                                  progress=False)
                    res[s].append(((time.perf_counter() - t0) * 1e3, out))
        except mmfast.errors.MMFastError as e:
            raise gr.Error(str(e)) from e
        except (TypeError, ValueError) as e:  # e.g. a seed gradio could not make an int
            raise gr.Error(f"bad input: {e}") from e
        base_ms = statistics.median(t for t, _ in res["baseline"])
        grids, rows = [], []
        for s, rs in res.items():
            out = rs[0][1]
            walls = [t for t, _ in rs]
            grids.append(image_grid(out.images, cols=len(conds) if n > 1 else min(len(conds), 10), scale=4))
            rows.append([s, round(out.stats["steps"], 1), round(out.stats["step_compression"], 2), median_spread(walls),
                         round(base_ms / statistics.median(walls), 2)])
        note = f"median of {len(res['baseline'])} runs (range in brackets), same seed on both sides."
        if rows[1][-1] < 1.0:
            note += (f" {spec} is {rows[1][-1]:.2f}x here: fewer forwards, but on a CPU a tiny model is compute-bound, "
                     "so checking a window of tokens costs several one-token steps; on a GPU it costs about one "
                     "(`mmfast bench ar-speed`, `var-speed`).")
        return grids[0], grids[1], rows, note, chart_frame("gen", spec)

    gr.Markdown(knows(model))
    with gr.Row():
        conditions = gr.Textbox(label="labels / prompts (comma-separated)", value="0,1,2,3,4,5,6,7,8,9", scale=3)
        spec = gr.Dropdown(methods, value=methods[0], label="decoder", allow_custom_value=True, scale=3)
        seed = gr.Number(value=0, precision=0, label="seed", scale=1)
        go = gr.Button("Generate", variant="primary", scale=1)
    with gr.Accordion("options", open=False), gr.Row():
        n = gr.Slider(1, 4, value=1, step=1, label="images per label")
        runs = gr.Slider(1, 5, value=repeats, step=1, label="timed runs (median)")
    with gr.Row():
        base_img = gr.Image(label="baseline", height=160)
        fast_img = gr.Image(label="accelerated", height=160)
    table = gr.Dataframe(headers=COLUMNS, label="stats (speed-up: baseline wall time / this)")
    note = gr.Markdown()
    chart = gr.ScatterPlot(chart_frame("gen", methods[0]), x="speed-up", y="accuracy retained", color="which",
                           color_map=WHICH_COLORS, tooltip=["method", "source"], height=240,
                           label="measured (eval/results): class consistency retained vs wall speed-up; red: the selected "
                                 "method, black: baseline")
    go.click(generate, [conditions, spec, seed, n, runs], [base_img, fast_img, table, note, chart], api_name=api_name)
    spec.change(lambda s: chart_frame("gen", s), [spec], [chart], api_name=False)
