"""``mmfast demo``: the main job, offline, on the embedded default models.

It answers questions about images and a real video (gradio's world.mp4), then runs the baseline and
``pool(factor=2)`` side by side and prints their stats.
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

import typer

import mmfast
from mmfast import zoo

STAT_COLUMNS = [
    ("visual_tokens_kept", "visual tokens"),
    ("prompt_tokens", "prompt tokens"),
    ("kv_bytes", "KV bytes"),
    ("prefill_ms", "prefill ms"),
    ("decode_ms_per_token", "decode ms/tok"),
    ("new_tokens", "new tokens"),
]


def _say(text: str = "") -> None:
    typer.echo(text)


def side_by_side(rows: dict[str, dict[str, Any]]) -> str:
    """A small text table: one row per method, the stats columns of :data:`STAT_COLUMNS`."""
    head = f"{'method':26s}" + "".join(f"{title:>15s}" for _, title in STAT_COLUMNS)
    lines = [head, "-" * len(head)]
    for method, st in rows.items():
        cells = []
        for key, _ in STAT_COLUMNS:
            v = st.get(key)
            cells.append(f"{v:>15.1f}" if isinstance(v, float) else f"{v!s:>15s}")
        lines.append(f"{method:26s}" + "".join(cells))
    return "\n".join(lines)


def _model(random_model: bool, tmp: str) -> tuple[Any, str]:
    if not random_model and zoo.available().get("tiny-vlm"):
        return "tiny-vlm", "tiny-vlm (embedded zoo model, trained by mmfast on its synthetic scenes)"
    from mmfast.train.tiny_models import build_tiny_vlm

    path = build_tiny_vlm("llava_onevision", tmp)
    return str(path), (
        "a RANDOM-INITIALISED tiny LLaVA-OneVision (never trained: its answers are gibberish; "
        "it shows the machinery: decoding, frame sampling, token reduction and stats)"
    )


def run_demo(random_model: bool = False) -> None:
    from mmfast.assets import gradio_video, sample_image

    with tempfile.TemporaryDirectory() as tmp:
        model, desc = _model(random_model, tmp)
        _say(f"mmfast {mmfast.__version__} demo — model: {desc}\n")
        qa = mmfast.pipeline("image-qa", model=model)
        shared = (qa.model, qa.processor)
        if model == "tiny-vlm":
            from mmfast.train.examples import zoo_examples

            zoo_examples(qa, mmfast.pipeline("video-qa", model=shared))

        # a real photograph
        photo = sample_image("astronaut")
        out = qa(image=photo, question="What is in the image?", max_new_tokens=16)
        _say(f"[image-qa] skimage astronaut {photo.size}: {out['answer']!r}")

        # a real video, decoded and sampled
        video = gradio_video("world.mp4")
        vqa = mmfast.pipeline("video-qa", model=shared)
        if video is None:
            _say("[video-qa] gradio is not installed: skipping world.mp4 (pip install 'mmfast[app]').")
        else:
            out = vqa(video=str(video), question="What is shown in the video?", num_frames=8, max_new_tokens=16)
            st = out["stats"]
            _say(
                f"[video-qa] gradio world.mp4: decoded {st['source_frames']} frames, sampled {st['frames']} "
                f"(indices {st['frame_indices']}) → {st['visual_tokens_in']} visual tokens: {out['answer']!r}"
            )
            if model == "tiny-vlm":
                _say("           (tiny-vlm only knows its synthetic world of shapes: the answer is not about Earth.)")

        # baseline vs pool(factor=2), same inputs, side by side
        _say(
            "\nbaseline vs pool(factor=2) on the same image and video (timed over 16 forced new tokens so both do the"
            " same work; the answers stop at the model's own end of turn):"
        )
        for name, pipe_task, kw in [
            ("image", "image-qa", {"image": photo, "question": "What is in the image?"}),
            ("video", "video-qa", {"video": str(video) if video else None, "question": "What happens?", "num_frames": 8}),
        ]:
            if kw.get("video", "") is None:
                continue
            pipes = {spec: mmfast.pipeline(pipe_task, model=shared, accelerate=None if spec == "baseline" else spec)
                     for spec in ["baseline", "pool(factor=2)"]}
            runs: dict[str, list[dict[str, Any]]] = {spec: [] for spec in pipes}
            for _ in range(3):  # interleaved; the table shows medians, so one busy moment does not decide
                for spec, pipe in pipes.items():
                    runs[spec].append(pipe(**kw, max_new_tokens=16, min_new_tokens=16)["stats"])
            rows = {}
            for spec, pipe in pipes.items():
                rows[spec] = {**runs[spec][0], **{k: statistics.median(r[k] for r in runs[spec])
                                                  for k in ("prefill_ms", "decode_ms_per_token")}}
                # forced tokens run on past the end of turn: the answer shown is the unforced one
                rows[spec]["answer"] = pipe(**kw, max_new_tokens=16)["answer"]
            _say(f"\n[{name}] (ms: medians of 3 runs)\n" + side_by_side(rows))
            for spec, st in rows.items():
                _say(f"  {spec:24s} answer: {st['answer']!r}")
            if rows["pool(factor=2)"]["prefill_ms"] > rows["baseline"]["prefill_ms"]:
                _say("  (pooling is slower here: with this few visual tokens a tiny model's prefill is dominated by fixed "
                     "per-call costs on a shared CPU, not by the tokens it removes; `mmfast bench vlm-speed` measures "
                     "it interleaved over more repeats)")
        if video is not None:
            _streaming_demo(str(video), model if model != "tiny-vlm" else None)
        _generation_demo()
        _var_demo()
        _say("\nNext: `mmfast bench vlm-speed --accelerate 'pool(factor=2)' --json out.json` for timed comparisons.")


def _streaming_demo(video: str, model: Any = None) -> None:
    """world.mp4 streamed at 1 fps through VideoScan (tiny-vlm-scan when installed), one question, memory held;
    the full-cache stream beside it."""
    scan = "tiny-vlm-scan" if model is None and zoo.available().get("tiny-vlm-scan") else (model or "tiny-vlm")
    _say(f"\n[streaming-video-qa] gradio world.mp4 streamed at 1 fps, frame by frame ({scan}):")
    for spec, name in (("videoscan(memory=64)", scan), (None, model or "tiny-vlm")):
        s = mmfast.pipeline("streaming-video-qa", model=name, accelerate=spec)
        n = s.feed(video, fps=1.0)
        out = s.ask("how many objects are there at the end?", max_new_tokens=8)
        st = out["stats"]
        held = f"{st['carriers_held']} carriers" if st.get("carriers_held") is not None else f"{st['frame_tokens_held']} frame tokens"
        _say(f"  {str(spec or 'full cache'):22s} {n} frames pushed ({st['ms_per_frame']:.1f} ms each): holds {held}, "
             f"{st['tokens_held']} cache entries, {st['kv_bytes'] / 1024:.0f} KiB of KV; question {st['prefill_ms'] + st['decode_ms']:.0f} ms: "
             f"{out['answer']!r}")


def _generation_demo(out_dir: str = "out") -> None:
    """Class-to-image with tiny-ar: a grid of the ten digits, baseline and SJD side by side."""
    from pathlib import Path

    from mmfast.pipelines.image_gen import image_grid

    if not zoo.available().get("tiny-ar"):
        _say("\n[class-to-image] tiny-ar is not installed: skipping (train it with `mmfast zoo train tiny-ar`).")
        return
    _say("\n[class-to-image] tiny-ar (LlamaGen architecture + VQ, trained on sklearn's handwritten digits):")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    labels = list(range(10))
    wall = {}
    for spec in ["baseline", "sjd(window=16)"]:
        gen = mmfast.pipeline("class-to-image", model="tiny-ar", accelerate=None if spec == "baseline" else spec)
        res = gen(labels=labels, num_images_per_condition=2, seed=0, batch_size=1, progress=False)
        path = Path(out_dir) / f"demo_digits_{spec.split('(')[0]}.png"
        image_grid(res.images, cols=10, scale=4).save(path)
        st = res.stats
        wall[spec] = st["wall_ms"]
        _say(
            f"  {spec:16s} {len(res.images)} images, {st['tokens']} tokens each, {st['steps']:.1f} forwards per image "
            f"(step compression {st['step_compression']:.2f}), {st['wall_ms']:.0f} ms → {path}"
        )
    if wall["sjd(window=16)"] > wall["baseline"]:
        _say("  (fewer forwards but more time: tiny-ar is compute-bound on a CPU, so verifying a 16-token window costs "
             "~3x a one-token step; on memory-bound real models a window costs about one step: `mmfast bench ar-speed`)")


def _var_demo(out_dir: str = "out", draft_scales: int = 4) -> None:
    """Next-scale generation with the tiny-var pair: the drafter alone vs CoDe (drafter + tiny-var-small)."""
    import time
    from pathlib import Path

    from mmfast.pipelines.image_gen import image_grid

    if not (zoo.available().get("tiny-var") and zoo.available().get("tiny-var-small")):
        _say("\n[class-to-image, next-scale] the tiny-var pair is not installed: skipping "
             "(train it with `mmfast zoo train tiny-var`).")
        return
    spec = f"code(refiner='tiny-var-small',draft_scales={draft_scales})"
    _say(f"\n[class-to-image, next-scale] tiny-var (VAR architecture, 6 scales) alone vs CoDe handing scales "
         f"{draft_scales}-5 to tiny-var-small:")
    labels = list(range(10)) * 5
    pipes = {s: mmfast.pipeline("class-to-image", model="tiny-var", accelerate=None if s == "baseline" else s)
             for s in ("baseline", spec)}
    times: dict[str, list[float]] = {s: [] for s in pipes}
    res = {}
    for pipe in pipes.values():
        pipe(labels=labels[:10], seed=1, progress=False, output_type="tokens")  # warm-up
    for _ in range(3):  # interleaved repeats, medians: one busy moment must not decide the speed-up
        for s, pipe in pipes.items():
            t0 = time.perf_counter()
            res[s] = pipe(labels=labels, seed=0, batch_size=10, progress=False, output_type="tokens")
            times[s].append(time.perf_counter() - t0)
    wall = {s: statistics.median(t) for s, t in times.items()}
    for s, pipe in pipes.items():
        images = pipe(labels=labels[:20], seed=0, progress=False).images
        path = Path(out_dir) / f"demo_var_{s.split('(')[0]}.png"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        image_grid(images, cols=10, scale=4).save(path)
        _say(f"  {s:44s} {len(labels)} images in {wall[s] * 1e3:.0f} ms (median of 3; {res[s].stats['steps']:.0f} "
             f"forwards each), speed-up {wall['baseline'] / wall[s]:.2f}x -> {path}")
    if wall[spec] > wall["baseline"]:
        _say("  (no gain here: on a busy 2-core CPU the per-scale fixed costs of two tiny models outweigh the smaller "
             "refiner; `mmfast bench var-quality` measures it interleaved)")
