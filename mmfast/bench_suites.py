"""Benchmark suites registered with :func:`mmfast.bench.suite`.

* ``vlm-speed``: a random-initialised LLaVA-OneVision-shaped model with realistic proportions (576 visual
  tokens per anyres tile, a 16-frame video at 144 tokens per frame, an LLM that dominates prefill). Speed
  does not depend on the weights, so no trained model is needed. Reports prefill ms, decode ms/token,
  visual tokens and KV bytes per method, the measured prefill speed-up and the ideal (FLOP-ratio) one.
"""

from __future__ import annotations

import tempfile
from typing import Any

from mmfast.bench import lm_flops, median, row, suite, vision_flops


def _speed_inputs() -> dict[str, dict[str, Any]]:
    from mmfast.assets import sample_image, sample_video

    return {
        "image": {"image": sample_image(), "question": "Describe the image in detail."},
        "video16": {"video": sample_video(), "num_frames": 16, "question": "What happens in the video?"},
    }


def _prefill_flops(adapter: Any, stats: dict[str, Any]) -> float:
    """Prefill FLOPs of one run: the vision tower over its crops / frames plus the LLM over the prompt."""
    return vision_flops(adapter.config.vision_config, stats["vision_crops"]) + lm_flops(
        adapter.text_config, stats["prompt_tokens"]
    )


@suite("vlm-speed", "prefill / decode speed on a random LLaVA-OneVision-shaped model (image + 16-frame video)")
def vlm_speed(methods: list[str], repeats: int, new_tokens: int = 16, **_: Any) -> list[dict[str, Any]]:
    import mmfast
    from mmfast.testing import build_tiny_vlm

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_vlm("llava_onevision", tmp, size="bench")
        specs = ["baseline", *methods]
        pipes = {}
        for spec in specs:
            task_pipes = {
                "image": mmfast.pipeline("image-qa", model=path, accelerate=None if spec == "baseline" else spec),
            }
            task_pipes["video16"] = mmfast.pipeline(
                "video-qa", model=(task_pipes["image"].model, task_pipes["image"].processor),
                accelerate=None if spec == "baseline" else spec,
            )
            pipes[spec] = task_pipes
        inputs = _speed_inputs()
        gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        for name, kw in inputs.items():  # warm-up (first-call allocations, lazy inits)
            pipes["baseline"][name](**kw, max_new_tokens=2)
        samples: dict[tuple[str, str], list[dict[str, Any]]] = {(s, n): [] for s in specs for n in inputs}
        for _ in range(repeats):  # interleaved: every method sees the same machine state
            for name, kw in inputs.items():
                for spec in specs:
                    samples[(spec, name)].append(pipes[spec][name](**kw, **gen)["stats"])

    rows = []
    for name in inputs:
        base = None
        for spec in specs:
            st = samples[(spec, name)]
            prefill = median([s["prefill_ms"] for s in st])
            adapter = pipes[spec][name].adapter
            flops = _prefill_flops(adapter, st[0])
            r = row(
                spec,
                input=name,
                visual_tokens=st[0]["visual_tokens_kept"],
                kv_bytes=st[0]["kv_bytes"],
                prefill_ms=prefill,
                decode_ms_per_token=median([s["decode_ms_per_token"] for s in st]),
                prompt_tokens=st[0]["prompt_tokens"],
                prefill_gflops=round(flops / 1e9, 2),
            )
            if spec == "baseline":
                base = (prefill, flops)
                r.update(speedup=1.0, ideal_speedup=1.0)
            else:
                r.update(speedup=base[0] / prefill, ideal_speedup=base[1] / flops)
            rows.append(r)
    return rows
