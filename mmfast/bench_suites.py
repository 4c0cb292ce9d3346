"""Benchmark suites registered with :func:`mmfast.bench.suite`.

* ``vlm-speed``: a random-initialised LLaVA-OneVision-shaped model with realistic proportions (576 visual
  tokens per anyres tile, a 16-frame video at 144 tokens per frame, an LLM that dominates prefill). Speed
  does not depend on the weights, so no trained model is needed. Reports prefill ms, decode ms/token,
  visual tokens and KV bytes per method, the measured prefill speed-up and the ideal (FLOP-ratio) one.
  ``--opt long_frames=64`` adds a long video (where attention dominates prefill), ``--opt dtype=bfloat16``
  runs in bf16. KV methods get ``kv_ratio`` (KV bytes after prefill / the baseline's); ZipVL rows get
  ``important_ratio`` (mean p/n over layers) and an ideal speed-up that counts its sparse attention and probe.
  Random weights give near-uniform attention, on which ZipVL's tau rule keeps almost every token: time it at
  a trained model's ratio with ``zipvl(ratio=r)``.
* ``vlm-quality`` / ``video-quality``: held-out exact-match accuracy of the zoo's tiny-vlm on synthetic image /
  16-frame video QA (:func:`mmfast.zoo.evaluate.evaluate_vlm`, the real pipeline path) per method, with
  ``accuracy_retained`` against the tiny-vlm baseline, accuracy per question type (``per_type``) and
  ``kv_ratio_bf16`` (KV bytes held after the prompt / those of the baseline stored in bf16). ``tokenflex`` rows
  run on tiny-vlm-flex, the checkpoint trained for it (its own full-count row is listed, and
  ``retained_vs_own_baseline`` is relative to it). KV methods answer from their compressed cache
  (``answer_from_kv``): the prompt up to the chat template's generation prompt is prefilled and compressed, then
  the generation prompt is fed, so the one- or two-word answers are decoded entirely over the compressed cache.
  ZipVL rows add ``important_ratio`` (p / n averaged over layers and 20 held-out samples). ``video-quality --opt
  num_frames=32 --opt hold=4`` is the long-video variant: 32-frame clips with each frame shown 4 times (128
  frames, 1153 visual tokens; the same events and answers, the redundancy of a long high-frame-rate recording).
  ``--opt model=DIR`` measures another checkpoint of tiny-vlm (e.g. a fine-tune) in its place.

With no ``--accelerate``, the vision suites run :data:`VISION_METHODS`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mmfast.bench import lm_flops, median, row, suite, vision_flops

#: the vision-stage rows of ``vlm-speed`` / ``vlm-quality`` / ``video-quality`` when no --accelerate is given:
#: 50 / 25 / 12.5 % of the visual tokens (pool can only keep 1/factor^2: 25 %; adaptive_pool is its
#: any-ratio form)
VISION_METHODS: tuple[str, ...] = tuple(
    f"{m}(keep={k})" for k in (0.5, 0.25, 0.125) for m in ("random", "adaptive_pool", "turbo", "tokenflex")
) + ("pool(factor=2)",)


def _random_flex_projector(model_dir: str, methods: list[str]) -> None:
    """Speed does not depend on weights: give the random bench model a random TokenFLEX projector."""
    if any(m.strip().startswith("tokenflex") for m in methods):
        import json

        from mmfast.accel.tokenflex import FlexProjector

        vision = json.loads((Path(model_dir) / "config.json").read_text())["vision_config"]
        FlexProjector(vision["hidden_size"], 2 * vision["hidden_size"]).save(model_dir)


def _speed_inputs(long_frames: int = 0) -> dict[str, dict[str, Any]]:
    from mmfast.assets import sample_image, sample_video

    out = {
        "image": {"image": sample_image(), "question": "Describe the image in detail."},
        "video16": {"video": sample_video(), "num_frames": 16, "question": "What happens in the video?"},
    }
    if long_frames:
        out[f"video{long_frames}"] = {**out["video16"], "num_frames": long_frames}
    return out


def _zipvl_extras(pipe: Any) -> dict[str, Any]:
    """ZipVL's per-layer important ratios and probe counts of the pipeline's last call (empty without ZipVL)."""
    for acc in pipe.accelerate:
        if getattr(acc, "name", "") == "zipvl" and acc.ratios:
            return {"layer_ratios": [acc.ratios[i] for i in sorted(acc.ratios)], "probe_rows": dict(acc.probe_rows)}
    return {}


def _zipvl_ratio(pipe: Any, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """``important_ratio``: ZipVL's p / n averaged over layers and over ``calls`` (pipeline kwargs); {} without
    ZipVL."""
    if not any(getattr(a, "name", "") == "zipvl" for a in pipe.accelerate):
        return {}
    ratios = []
    for kw in calls:
        pipe(**kw, max_new_tokens=1, answer_from_kv=True)  # the prefill the evaluation compresses
        lr = _zipvl_extras(pipe)["layer_ratios"]
        ratios.append(sum(lr) / len(lr))
    return {"important_ratio": round(sum(ratios) / len(ratios), 3)}


def _zipvl_prefill_flops(adapter: Any, stats: dict[str, Any]) -> float:
    """Prefill FLOPs under ZipVL: attention among p_l tokens per layer, plus the probe (q for the probe rows,
    k for all rows, probe logits) on top of the dense projections / MLP."""
    tc = adapter.text_config
    n, heads = stats["prompt_tokens"], tc.num_attention_heads
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    dense = _prefill_flops(adapter, stats) - tc.num_hidden_layers * 2 * n * n * heads * hd  # drop dense attention
    extra = 0.0
    for i, r in enumerate(stats["layer_ratios"]):
        p, probe = r * n, stats["probe_rows"].get(i, 0)
        extra += 2 * p * p * heads * hd  # QK^T and AV among the important tokens (causal)
        extra += 2 * probe * n * heads * hd + 2 * n * tc.hidden_size * kv * hd + 2 * probe * tc.hidden_size * heads * hd
    return dense + extra


def _prefill_flops(adapter: Any, stats: dict[str, Any]) -> float:
    """Prefill FLOPs of one run: the vision tower over its crops / frames plus the LLM over the prompt."""
    return vision_flops(adapter.config.vision_config, stats["vision_crops"]) + lm_flops(
        adapter.text_config, stats["prompt_tokens"]
    )


@suite("vlm-speed", "prefill / decode speed on a random LLaVA-OneVision-shaped model (image + 16-frame video)")
def vlm_speed(
    methods: list[str], repeats: int, new_tokens: int = 16, long_frames: int = 0, dtype: str | None = None, **_: Any
) -> list[dict[str, Any]]:
    import mmfast
    from mmfast.testing import build_tiny_vlm

    methods = list(methods) or list(VISION_METHODS)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_vlm("llava_onevision", tmp, size="bench")
        _random_flex_projector(str(path), methods)
        specs = ["baseline", *methods]
        inputs = _speed_inputs(long_frames)
        pipes = {}
        for spec in specs:
            task_pipes = {
                "image": mmfast.pipeline(
                    "image-qa", model=path, accelerate=None if spec == "baseline" else spec, dtype=dtype
                ),
            }
            video = mmfast.pipeline(
                "video-qa", model=(task_pipes["image"].model, task_pipes["image"].processor),
                accelerate=None if spec == "baseline" else spec,
            )
            task_pipes.update({name: video for name in inputs if name != "image"})
            pipes[spec] = task_pipes
        gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        for name, kw in inputs.items():  # warm-up (first-call allocations, lazy inits)
            pipes["baseline"][name](**kw, max_new_tokens=2)
        samples: dict[tuple[str, str], list[dict[str, Any]]] = {(s, n): [] for s in specs for n in inputs}
        for _ in range(repeats):  # interleaved: every method sees the same machine state
            for name, kw in inputs.items():
                for spec in specs:
                    stats = pipes[spec][name](**kw, **gen)["stats"]
                    samples[(spec, name)].append({**stats, **_zipvl_extras(pipes[spec][name])})

    rows = []
    for name in inputs:
        base = None
        for spec in specs:
            st = samples[(spec, name)]
            prefill = median([s["prefill_ms"] for s in st])
            adapter = pipes[spec][name].adapter
            flops = _zipvl_prefill_flops(adapter, st[0]) if "layer_ratios" in st[0] else _prefill_flops(adapter, st[0])
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
            if "layer_ratios" in st[0]:
                r["important_ratio"] = round(sum(st[0]["layer_ratios"]) / len(st[0]["layer_ratios"]), 3)
            if spec == "baseline":
                base = (prefill, flops, st[0]["kv_bytes"])
                r.update(speedup=1.0, ideal_speedup=1.0)
            else:
                r.update(speedup=base[0] / prefill, ideal_speedup=base[1] / flops)
            r["kv_ratio"] = round(st[0]["kv_bytes"] / base[2], 4) if base[2] else None
            rows.append(r)
    return rows


def _quality(
    modality: str,
    methods: list[str],
    n: int,
    seed: int = 0,
    num_frames: int | None = None,
    hold: int = 1,
    model: str = "tiny-vlm",
) -> list[dict[str, Any]]:
    """Held-out exact-match accuracy of tiny-vlm (or ``model``: another checkpoint of it, e.g. a fine-tune) per
    method; ``tokenflex`` rows run on tiny-vlm-flex (the checkpoint trained for it), whose own full-count row is
    reported beside them. Video: clips of ``num_frames`` (default: tiny-vlm's 16), each frame shown ``hold`` times
    (a long video, see :func:`evaluate_vlm`)."""
    import numpy as np

    import mmfast
    from mmfast.zoo import data as D
    from mmfast.zoo.evaluate import evaluate_vlm
    from mmfast.zoo.tiny_vlm import NUM_FRAMES

    methods = list(methods) or list(VISION_METHODS)
    num_frames = num_frames or NUM_FRAMES
    task = "image-qa" if modality == "image" else "video-qa"
    counts = {"n_images": n, "n_clips": 0} if modality == "image" else {"n_images": 0, "n_clips": n}
    base = {"tiny-vlm": mmfast.pipeline(task, model=model)}  # keyed "tiny-vlm" whatever checkpoint it is
    if any(m.strip().startswith("tokenflex") for m in methods):
        base["tiny-vlm-flex"] = mmfast.pipeline(task, model="tiny-vlm-flex")
    rows: list[dict[str, Any]] = []
    own: dict[str, float] = {}  # baseline accuracy of each model

    def inputs(i: int) -> dict[str, Any]:
        """Pipeline kwargs for held-out sample i and its first question."""
        if modality == "image":
            s = D.image_sample("heldout", seed, i)
            media: dict[str, Any] = {"image": s.image}
        else:
            s = D.clip_sample("heldout", seed, i, num_frames=num_frames)
            media = {"video": np.repeat(np.asarray(s.frames), hold, axis=0), "num_frames": num_frames * hold}
        return {**media, "question": s.questions[0].question if s.questions else "what is this?"}

    ratio_calls = [inputs(i) for i in range(min(n, 20))]  # ZipVL's important ratio is averaged over these
    for spec in ["baseline", *(["baseline@tiny-vlm-flex"] if "tiny-vlm-flex" in base else []), *methods]:
        model = "tiny-vlm-flex" if spec.startswith("tokenflex") or spec.endswith("@tiny-vlm-flex") else "tiny-vlm"
        p = base[model]
        acc_spec = None if spec.startswith("baseline") else spec
        pipe = type(p)(p.adapter, mmfast.accel.resolve(acc_spec), p.model_name)
        res = evaluate_vlm(pipe, split="heldout", seed=seed, num_frames=num_frames, hold=hold, progress=False, **counts)
        acc = res[modality]["overall"]
        if acc_spec is None:
            own[model] = acc
        st = pipe(**ratio_calls[0])["stats"]
        if acc_spec is None and model == "tiny-vlm":
            # the KV a bf16 deployment of the baseline holds: same entries, 2 bytes each
            elem = next(p.adapter.model.parameters()).element_size()
            base_kv_bf16 = st["kv_bytes"] / elem * 2
        rows.append(row(
            "baseline" if acc_spec is None else spec,
            input=modality,
            model=p.model_name,
            accuracy=acc,
            accuracy_retained=acc / own["tiny-vlm"] if own["tiny-vlm"] else None,  # vs the tiny-vlm baseline
            retained_vs_own_baseline=acc / own[model] if own.get(model) else None,
            visual_tokens=st["visual_tokens_kept"],
            kv_bytes=st["kv_bytes"],
            kv_ratio_bf16=round(st["kv_bytes"] / base_kv_bf16, 4),
            questions=res["n"][modality],
            per_type={k: round(v, 4) for k, v in res[modality].items() if k != "overall"},
            **({"frames": num_frames * hold} if modality == "video" else {}),
            **_zipvl_ratio(pipe, ratio_calls),
        ))
    return rows


@suite("vlm-quality", "held-out image QA accuracy of tiny-vlm (tokenflex: tiny-vlm-flex) per vision method")
def vlm_quality(
    methods: list[str], repeats: int, n_images: int = 200, model: str = "tiny-vlm", **_: Any
) -> list[dict[str, Any]]:
    return _quality("image", methods, n_images, model=model)


@suite("video-quality", "held-out 16-frame video QA accuracy of tiny-vlm (tokenflex: tiny-vlm-flex) per vision method")
def video_quality(
    methods: list[str],
    repeats: int,
    n_clips: int = 100,
    num_frames: int | None = None,
    hold: int = 1,
    model: str = "tiny-vlm",
    **_: Any,
) -> list[dict[str, Any]]:
    return _quality("video", methods, n_clips, num_frames=num_frames, hold=hold, model=model)
