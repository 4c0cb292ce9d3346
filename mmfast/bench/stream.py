"""``video-stream``: streaming video QA, every strategy on the same streams (registered with :func:`~mmfast.bench.harness.suite`).

Rows, for the full-cache stream (``baseline``), the re-prefill baseline (``reprefill``: keep the frames, run
``video-qa`` on ``num_frames`` of them per question) and each ``--accelerate`` spec (default: ``videoscan(memory=64)``
and ``kv_window(sink=4,recent=64)``, a StreamingLLM window of about VideoScan's size):

* ``input=streamL`` for L in ``lengths`` (default 16, 64, 256, 1024 frames of held-out clips back to back): KV bytes
  held, process peak memory (``peak_rss_mb``: each (method, length) runs in a fresh process, so it is that
  stream's peak), ms per pushed frame (median over the stream's last quarter), question latency (``question_ms``,
  median of ``repeats`` questions at the end) and ``speedup`` = re-prefill's question latency / this one;
* ``input=clipsF`` (``clip_frames``, default 16 and 64 = 16-frame clips each frame held 4x): exact-match accuracy on
  ``n_clips`` held-out clips streamed frame by frame, per question type, beside the majority baseline. Methods with
  a checkpoint trained for them (VideoScan: ``tiny-vlm-scan``) answer with it; the others with tiny-vlm.

``--opt plot=PATH`` writes memory and latency vs stream length as a PNG.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from mmfast.bench.harness import row, suite

DEFAULT_STREAM_METHODS: tuple[str, ...] = ("videoscan(memory=64)", "kv_window(sink=4,recent=64)")
QUESTION = "how many objects are there at the end?"


def _model_for(spec: str) -> str:
    """tiny-vlm, or the zoo checkpoint trained for the method when it is installed (recorded in every row)."""
    if spec in ("baseline", "reprefill"):
        return "tiny-vlm"
    import mmfast
    from mmfast import zoo

    own = next((a.zoo_model for a in mmfast.accel.resolve(spec) if a.zoo_model), None)
    return own if own and zoo.available().get(own) else "tiny-vlm"


def _frames(seed: int = 0):
    """An endless stream of held-out frames: clip after clip."""
    from mmfast.train import data as D

    i = 0
    while True:
        yield from D.clip_sample("heldout", seed, i, num_frames=16).frames
        i += 1


def measure(spec: str, length: int, questions: int, num_frames: int) -> dict[str, Any]:
    """One (method, stream length) run, in this process: push ``length`` frames, ask ``questions`` times."""
    import resource
    import time

    import torch

    import mmfast

    torch.set_num_threads(1)
    kw = {"strategy": "reprefill", "num_frames": num_frames} if spec == "reprefill" else {}
    s = mmfast.pipeline("streaming-video-qa", model=_model_for(spec), accelerate=None if spec in ("baseline", "reprefill")
                        else spec, **kw)
    frames, push_ms = _frames(), []
    for _ in range(length):
        t0 = time.perf_counter()
        s.push(next(frames))
        push_ms.append((time.perf_counter() - t0) * 1e3)
    q_ms = []
    for _ in range(questions):
        t0 = time.perf_counter()
        s.ask(QUESTION, max_new_tokens=4)
        q_ms.append((time.perf_counter() - t0) * 1e3)
    st = s.state
    return {
        "kv_bytes": st["kv_bytes"], "tokens_held": st["tokens_held"], "frame_bytes_held": st.get("frame_bytes_held"),
        "carriers_held": st.get("carriers_held"), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ms_per_frame": statistics.median(push_ms[-max(1, length // 4):]), "question_ms": statistics.median(q_ms),
    }


def _measure_in_subprocess(spec: str, length: int, questions: int, num_frames: int) -> dict[str, Any]:
    code = ("import json, sys; from mmfast.bench.stream import measure; "
            f"print('@@' + json.dumps(measure({spec!r}, {length}, {questions}, {num_frames})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("@@")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"video-stream: {spec} at {length} frames failed:\n{out.stderr[-2000:]}")
    return json.loads(line[2:])


def accuracy(spec: str, n_clips: int, hold: int, seed: int = 0, num_frames: int = 16, model: str | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Exact-match accuracy per question type on ``n_clips`` held-out 16-frame clips, each frame pushed ``hold``
    times, every question asked of the same stream (``model``: another checkpoint than the spec's default)."""
    import numpy as np
    import torch

    import mmfast
    from mmfast.train import data as D

    torch.set_num_threads(1)
    from tqdm.auto import tqdm

    kw = {"strategy": "reprefill", "num_frames": num_frames} if spec == "reprefill" else {}
    s = mmfast.pipeline("streaming-video-qa", model=model or _model_for(spec),
                        accelerate=None if spec in ("baseline", "reprefill") else spec, **kw)
    hits: dict[str, list[bool]] = {}
    qas = []
    for i in tqdm(range(n_clips), desc=f"streamed clips ({spec})", disable=not progress):
        c = D.clip_sample("heldout", seed, i, num_frames=16)
        s.reset()
        s.push(np.repeat(np.asarray(c.frames), hold, axis=0))
        for qa in c.questions:
            ok = s.ask(qa.question, max_new_tokens=4)["answer"].strip() == qa.answer
            hits.setdefault(qa.qtype, []).append(ok)
            qas.append(qa)
    per = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    allv = [x for v in hits.values() for x in v]
    return {"accuracy": sum(allv) / len(allv), "per_type": {k: round(v, 4) for k, v in per.items()},
            "majority": {k: round(v, 4) for k, v in D.majority_baseline(qas).items()}, "questions": len(allv)}


@suite("video-stream", "streaming video QA: memory, ms per frame, question latency vs stream length; accuracy on "
                       "streamed held-out clips (baseline, re-prefill, videoscan, kv_window)")
def video_stream(
    methods: list[str], repeats: int, lengths: tuple[int, ...] = (16, 64, 256, 1024), n_clips: int = 100,
    clip_frames: tuple[int, ...] = (16, 64), num_frames: int = 16, plot: str | None = None, **_: Any
) -> list[dict[str, Any]]:
    specs = ["baseline", "reprefill", *(list(methods) or DEFAULT_STREAM_METHODS)]
    rows: list[dict[str, Any]] = []
    for length in lengths:
        res = {spec: _measure_in_subprocess(spec, length, max(3, repeats), num_frames) for spec in specs}
        for spec in specs:
            r = res[spec]
            name = f"reprefill(num_frames={num_frames})" if spec == "reprefill" else spec
            rows.append(row(name, input=f"stream{length}", model=_model_for(spec), frames=length,
                            kv_bytes=r["kv_bytes"], speedup=res["reprefill"]["question_ms"] / r["question_ms"],
                            **{k: v for k, v in r.items() if k != "kv_bytes" and v is not None}))
    for frames in clip_frames:
        base = None
        for spec in specs:
            acc = accuracy(spec, n_clips, hold=max(1, frames // 16), num_frames=num_frames)
            base = acc["accuracy"] if spec == "baseline" else base
            name = f"reprefill(num_frames={num_frames})" if spec == "reprefill" else spec
            rows.append(row(name, input=f"clips{frames}", model=_model_for(spec), frames=frames,
                            accuracy=acc["accuracy"], accuracy_retained=acc["accuracy"] / base if base else None,
                            per_type=acc["per_type"], majority=acc["majority"], questions=acc["questions"]))
    if plot:
        plot_stream(rows, plot)
    return rows


def plot_stream(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """KV bytes, peak memory, ms per frame and question latency vs stream length, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stream = [r for r in rows if str(r.get("input", "")).startswith("stream")]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for key, ax, label in zip(("kv_bytes", "peak_rss_mb", "ms_per_frame", "question_ms"), axes,
                              ("KV bytes held", "process peak memory (MB)", "ms per pushed frame", "question latency (ms)")):
        for method in dict.fromkeys(r["method"] for r in stream):
            pts = sorted((r["frames"], r.get(key)) for r in stream if r["method"] == method and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), "o-", label=method)
        ax.set(xscale="log", xlabel="frames in the stream", title=label)
        if key == "kv_bytes":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
