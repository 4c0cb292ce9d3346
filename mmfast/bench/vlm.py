"""VLM benchmark suites: ``vlm-speed``, ``vlm-quality``, ``video-quality`` (registered with :func:`~mmfast.bench.harness.suite`).

* ``vlm-speed``: a random-initialised LLaVA-OneVision-shaped model with realistic proportions (576 visual
  tokens per anyres tile, a 16-frame video at 144 tokens per frame, an LLM that dominates prefill). Speed
  does not depend on the weights, so no trained model is needed (a method that loads weights of its own gets
  random ones: ``Accelerator.prepare_random_model``). Reports prefill ms, decode ms/token, visual tokens and KV
  bytes per method, the measured prefill speed-up and the ideal one (the FLOP ratio, counted layer by layer from
  the prefill stage's records for methods that drop or route tokens inside the LM).
  ``--opt long_frames=64`` adds a long video (where attention dominates prefill), ``--opt dtype=bfloat16``
  runs in bf16. KV methods get ``kv_ratio`` (KV bytes after prefill / the baseline's). Random weights give
  near-uniform attention, on which attention-score rules keep almost every token: time them at a trained model's
  ratio (e.g. ``zipvl(ratio=r)``). Real shapes: ``--opt size=7b`` builds a random LLaVA-OneVision-7B-shaped model
  (:data:`REAL_SHAPES`: Qwen2-7B LM, SigLIP-so400m tower at 384 px, anyres up to 6x6 tiles) directly on
  ``--opt device=cuda`` in ``--opt dtype=bfloat16`` (the default for real shapes), shared by every row;
  ``--opt layers=N`` / ``vision_layers=N`` shorten the LM / tower (per-layer extrapolation), ``--opt
  inputs=video16,video64`` picks inputs, ``--opt size=tiny`` is the smoke-test model. On CUDA the adapter reads the
  prefill clock after a device synchronize, so ``prefill_ms`` is not cut short by asynchronous launches.
* ``vlm-quality`` / ``video-quality``: held-out exact-match accuracy of the zoo's tiny-vlm on synthetic image /
  16-frame video QA (:func:`mmfast.train.evaluate.evaluate_vlm`, the real pipeline path) per method, with
  ``accuracy_retained`` against the tiny-vlm baseline, accuracy per question type (``per_type``) and
  ``kv_ratio_bf16`` (KV bytes held after the prompt / those of the baseline stored in bf16). A method that needs
  a checkpoint trained for it (``Accelerator.zoo_model``) runs there, beside that checkpoint's own baseline row
  (``retained_vs_own_baseline``). KV methods answer from their compressed cache (``answer_from_kv``): the prompt up
  to the chat template's generation prompt is prefilled and compressed, then the generation prompt is fed, so the
  one- or two-word answers are decoded entirely over the compressed cache. Methods' own figures
  (``extra_stats``) are averaged over 20 held-out samples. ``video-quality --opt num_frames=32 --opt hold=4`` is
  the long-video variant: 32-frame clips with each frame shown 4 times (128 frames, 1153 visual tokens; the same
  events and answers, the redundancy of a long high-frame-rate recording). ``--opt model=DIR`` measures another
  checkpoint of tiny-vlm (e.g. a fine-tune) in its place; ``--opt seed=S`` draws another held-out sample.

With no ``--accelerate``, the suites run :data:`DEFAULT_METHODS`.
"""

from __future__ import annotations

import tempfile
from typing import Any

from mmfast.bench.flops import prefill_flops
from mmfast.bench.harness import median, row, suite

#: the rows of ``vlm-speed`` / ``vlm-quality`` / ``video-quality`` when no --accelerate is given: 50 / 25 / 12.5 %
#: of the visual tokens (pool can only keep 1/factor^2: 25 %; adaptive_pool is its any-ratio form; fastv keeps
#: them for its first k layers)
DEFAULT_METHODS: tuple[str, ...] = tuple(
    f"{m}(keep={k})"
    for k in (0.5, 0.25, 0.125)
    for m in ("random", "adaptive_pool", "turbo", "tokenflex", "visionzip", "fastv")
) + ("pool(factor=2)",)


def _zoo_models(methods: list[str]) -> dict[str, str]:
    """spec -> the zoo checkpoint trained for it, for methods that need weights of their own."""
    import mmfast

    out = {}
    for spec in methods:
        for acc in mmfast.accel.resolve(spec):
            if acc.zoo_model:
                out[spec] = acc.zoo_model
    return out


def _prepare_random(model_dir: str, methods: list[str]) -> None:
    """Speed does not depend on weights: give the random bench model what each method loads, random too."""
    import mmfast

    for cls in {type(acc) for spec in methods for acc in mmfast.accel.resolve(spec)}:
        cls.prepare_random_model(model_dir)


def _extras_over(pipe: Any, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The methods' own figures (``extra_stats``) averaged over ``calls`` (pipeline kwargs), each with the prefill
    the evaluation compresses."""
    sums: dict[str, float] = {}
    for kw in calls:
        pipe(**kw, max_new_tokens=1, answer_from_kv=True)
        for k, v in pipe.accelerate.extra_stats().items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: round(v / len(calls), 3) for k, v in sums.items()}


#: random-weight models of real checkpoints' shapes for ``vlm-speed --opt size=...`` (built in memory on the device;
#: a tiny tokenizer, the real vocabulary size in the embeddings / LM head)
REAL_SHAPES: dict[str, dict[str, Any]] = {
    # llava-hf/llava-onevision-qwen2-7b-ov-hf: Qwen2-7B (28 layers, 28 / 4 heads, head_dim 128) + SigLIP-so400m
    # (26 layers used, 384 px / patch 14: 729 tokens per tile, 196 per video frame after the 2x2 pooling)
    "7b": {
        "text_config": {
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "max_position_embeddings": 32768, "vocab_size": 152064,
            "initializer_range": 0.02,
        },
        "vision_config": {
            "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26, "num_attention_heads": 16,
            "image_size": 384, "patch_size": 14,
        },
        "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
    },
}


def _speed_model(
    size: str, save_dir: str, dtype: str | None = None, device: str | None = None, layers: int | None = None,
    vision_layers: int | None = None,
) -> Any:
    """The ``vlm-speed`` model: a saved directory (``tiny`` / ``bench``, loaded per row as before) or, for a real
    shape, a ``(model, processor)`` pair built in ``dtype`` on ``device`` (no multi-GB checkpoint written; the
    config and processor are saved in ``save_dir``, the model's ``name_or_path``, for methods that load files
    from there)."""
    import torch

    from mmfast.api import _device, _dtype
    from mmfast.train.tiny_models import build_tiny_vlm, tiny_processor, tiny_vlm_config

    text: dict[str, Any] = {} if layers is None else {"num_hidden_layers": int(layers)}
    vision: dict[str, Any] = {} if vision_layers is None else {"num_hidden_layers": int(vision_layers)}
    if size not in REAL_SHAPES:
        return build_tiny_vlm("llava_onevision", save_dir, size=size,
                              **({"text_config": text} if text else {}), **({"vision_config": vision} if vision else {}))
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from mmfast.train.tiny_models import _silenced_token_ids

    shape = REAL_SHAPES[size]
    config = tiny_vlm_config(
        "llava_onevision", "bench", text_config={**shape["text_config"], **text},
        vision_config={**shape["vision_config"], **vision}, image_grid_pinpoints=shape["image_grid_pinpoints"],
    )
    processor = tiny_processor("llava_onevision", config=config)
    config.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    config._name_or_path = str(save_dir)
    dt = _dtype(dtype or "bfloat16")
    with torch.device(_device(device)):
        model = AutoModelForImageTextToText.from_config(config, dtype=dt, attn_implementation="sdpa")
    model.eval()
    model.name_or_path = str(save_dir)
    tok = processor.tokenizer
    head = model.get_output_embeddings()
    with torch.no_grad():  # greedy decoding stays on the tokenizer's ids and off its special / byte tokens
        head.weight[len(tok):].zero_()
        head.weight[torch.tensor(_silenced_token_ids(tok), device=head.weight.device)] = 0
    text_cfg = config.get_text_config()
    model.generation_config = GenerationConfig(
        bos_token_id=text_cfg.bos_token_id, eos_token_id=text_cfg.eos_token_id, pad_token_id=text_cfg.pad_token_id,
        do_sample=False,
    )
    return model, processor


def _speed_inputs(long_frames: int = 0) -> dict[str, dict[str, Any]]:
    from mmfast.assets import sample_image, sample_video

    out = {
        "image": {"image": sample_image(), "question": "Describe the image in detail."},
        "video16": {"video": sample_video(), "num_frames": 16, "question": "What happens in the video?"},
    }
    if long_frames:
        out[f"video{long_frames}"] = {**out["video16"], "num_frames": long_frames}
    return out


@suite("vlm-speed", "prefill / decode speed on a random LLaVA-OneVision-shaped model (image + 16-frame video)")
def vlm_speed(
    methods: list[str], repeats: int, new_tokens: int = 16, long_frames: int = 0, dtype: str | None = None,
    size: str = "bench", layers: int | None = None, vision_layers: int | None = None, device: str | None = None,
    inputs: str | list[str] | None = None, model_pair: Any = None, **_: Any
) -> list[dict[str, Any]]:
    """``model_pair`` (Python callers): a ``(model, processor)`` from :func:`_speed_model` shared by every row
    instead of building one (its ``name_or_path`` directory holds config.json)."""
    import mmfast

    methods = list(methods) or list(DEFAULT_METHODS)
    with tempfile.TemporaryDirectory() as tmp:
        if model_pair is not None:
            path, model_dir = tuple(model_pair), str(model_pair[0].name_or_path)
        else:
            path = _speed_model(size, tmp, dtype=dtype, device=device, layers=layers, vision_layers=vision_layers)
            model_dir = str(path) if not isinstance(path, tuple) else tmp
        _prepare_random(model_dir, methods)
        load_kw = {"dtype": dtype, "device": device} if not isinstance(path, tuple) else {}
        specs = ["baseline", *methods]
        all_inputs = _speed_inputs(long_frames)
        wanted = inputs.split(",") if isinstance(inputs, str) else inputs
        inputs = {n: kw for n, kw in all_inputs.items() if not wanted or n in [w.strip() for w in wanted]}
        pipes = {}
        for spec in specs:
            image = mmfast.pipeline(
                "image-qa", model=path, accelerate=None if spec == "baseline" else spec, **load_kw
            )
            video = mmfast.pipeline(
                "video-qa", model=(image.model, image.processor),
                accelerate=None if spec == "baseline" else spec,
            )
            pipes[spec] = {name: image if name == "image" else video for name in inputs}
        gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        for name, kw in inputs.items():  # warm-up (first-call allocations, lazy inits)
            pipes["baseline"][name](**kw, max_new_tokens=2)
        samples: dict[tuple[str, str], list[dict[str, Any]]] = {(s, n): [] for s in specs for n in inputs}
        for _ in range(repeats):  # interleaved: every method sees the same machine state
            for name, kw in inputs.items():
                for spec in specs:
                    pipe = pipes[spec][name]
                    samples[(spec, name)].append({**pipe(**kw, **gen)["stats"], "extra": pipe.accelerate.extra_stats()})

    rows = []
    for name in inputs:
        base = None
        for spec in specs:
            st = samples[(spec, name)]
            prefill = median([s["prefill_ms"] for s in st])
            flops = prefill_flops(pipes[spec][name].adapter, st[0])
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
            r.update({k: round(v, 3) for k, v in st[0]["extra"].items()})  # the method's own figures
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
    from mmfast.train import data as D
    from mmfast.train.evaluate import evaluate_vlm
    from mmfast.train.tiny_vlm import NUM_FRAMES

    methods = list(methods) or list(DEFAULT_METHODS)
    num_frames = num_frames or NUM_FRAMES
    task = "image-qa" if modality == "image" else "video-qa"
    counts = {"n_images": n, "n_clips": 0} if modality == "image" else {"n_images": 0, "n_clips": n}
    base = {"tiny-vlm": mmfast.pipeline(task, model=model)}  # keyed "tiny-vlm" whatever checkpoint it is
    zoo_of = _zoo_models(methods)  # methods with a checkpoint trained for them run there
    for name in dict.fromkeys(zoo_of.values()):
        base[name] = mmfast.pipeline(task, model=name)
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

    extra_calls = [inputs(i) for i in range(min(n, 20))]  # methods' own figures are averaged over these
    own_baselines = [f"baseline@{name}" for name in base if name != "tiny-vlm"]
    for spec in ["baseline", *own_baselines, *methods]:
        model = spec.partition("@")[2] if spec.startswith("baseline@") else zoo_of.get(spec, "tiny-vlm")
        p = base[model]
        acc_spec = None if spec.startswith("baseline") else spec
        pipe = type(p)(p.adapter, mmfast.accel.resolve(acc_spec), p.model_name)
        res = evaluate_vlm(pipe, split="heldout", seed=seed, num_frames=num_frames, hold=hold, progress=False, **counts)
        acc = res[modality]["overall"]
        if acc_spec is None:
            own[model] = acc
        st = pipe(**extra_calls[0])["stats"]
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
            **(_extras_over(pipe, extra_calls) if pipe.accelerate.extra_stats() else {}),
        ))
    return rows


@suite("vlm-quality", "held-out image QA accuracy of tiny-vlm per method (methods with a checkpoint of their own run on it)")
def vlm_quality(
    methods: list[str], repeats: int, n_images: int = 200, model: str = "tiny-vlm", seed: int = 0, **_: Any
) -> list[dict[str, Any]]:
    return _quality("image", methods, n_images, seed=seed, model=model)


@suite("video-quality", "held-out 16-frame video QA accuracy of tiny-vlm per method (methods with a checkpoint of their own run on it)")
def video_quality(
    methods: list[str],
    repeats: int,
    n_clips: int = 100,
    num_frames: int | None = None,
    hold: int = 1,
    model: str = "tiny-vlm",
    seed: int = 0,
    **_: Any,
) -> list[dict[str, Any]]:
    return _quality("video", methods, n_clips, seed=seed, num_frames=num_frames, hold=hold, model=model)
