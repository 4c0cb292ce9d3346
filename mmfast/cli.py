"""The ``mmfast`` command line (typer): ask, caption, generate, bench, app, env, demo, zoo, batch.

Errors mmfast raises on purpose (:class:`~mmfast.errors.MMFastError`) print one line and exit with code 2;
no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from mmfast.errors import MMFastError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="mmfast: fast multimodal models.")
zoo_app = typer.Typer(no_args_is_help=True, help="The embedded model zoo: list, train, evaluate.")
app.add_typer(zoo_app, name="zoo")

ModelOpt = typer.Option(None, "--model", "-m", help="zoo name, local directory or HF id (default: the task's zoo model)")
AccelOpt = typer.Option(None, "--accelerate", "-a", help='accelerate spec, e.g. "pool(factor=2)+kv_window(sink=4,recent=64)"')


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.command()
def ask(
    path: str = typer.Argument(..., help="image or video file"),
    question: str = typer.Argument(..., help="the question"),
    model: str | None = ModelOpt,
    accelerate: str | None = AccelOpt,
    num_frames: int | None = typer.Option(None, help="frames sampled uniformly from a video"),
    fps: float | None = typer.Option(None, help="sample a video at this many frames per second instead"),
    max_new_tokens: int = typer.Option(32),
    as_json: bool = typer.Option(False, "--json", help="print the answer and stats as JSON"),
) -> None:
    """Answer a question about an image or a video."""
    import mmfast
    from mmfast.errors import InvalidInputError
    from mmfast.media import media_kind

    if media_kind(path) == "video":  # by content: a video named .bin is still a video
        pipe = mmfast.pipeline("video-qa", model=model, accelerate=accelerate)
        kw: dict[str, Any] = {"num_frames": num_frames} if fps is None else {"fps": fps}
        out = pipe(video=path, question=question, max_new_tokens=max_new_tokens, **kw)
    else:
        if num_frames is not None or fps is not None:
            raise InvalidInputError(f"{path!r} is an image: --num-frames / --fps apply to videos only.")
        pipe = mmfast.pipeline("image-qa", model=model, accelerate=accelerate)
        out = pipe(image=path, question=question, max_new_tokens=max_new_tokens)
    if as_json:
        _print_json(out)
    elif out["stats"].get("empty_answer"):  # a blank line would look like a hang or a crash
        typer.echo("(empty answer: the model ended without text; --json shows the stats)", err=True)
    else:
        typer.echo(out["answer"])


@app.command()
def caption(
    paths: list[str] = typer.Argument(..., help="image files"),
    model: str | None = ModelOpt,
    accelerate: str | None = AccelOpt,
    prompt: str | None = typer.Option(None, help="instruction (default: the model's caption prompt)"),
    max_new_tokens: int = typer.Option(48),
) -> None:
    """Caption images; prints one JSON line per image."""
    import mmfast

    pipe = mmfast.pipeline("image-caption", model=model, accelerate=accelerate)
    outs = pipe(image=list(paths), prompt=prompt, max_new_tokens=max_new_tokens)
    for p, out in zip(paths, outs):
        typer.echo(json.dumps({"path": p, "caption": out["caption"], "stats": out["stats"]}, default=str))


@app.command()
def generate(
    labels: str | None = typer.Option(None, help="comma-separated class labels, e.g. 0,1,2 (class-to-image)"),
    prompt: list[str] = typer.Option([], help="text prompt(s) (text-to-image); repeat for several"),
    out: Path = typer.Option(Path("grid.png"), help="where to write the image grid (PNG)"),
    model: str | None = ModelOpt,
    accelerate: str | None = AccelOpt,
    seed: int = typer.Option(0),
    n: int = typer.Option(1, help="images per label / prompt"),
    guidance_scale: float | None = typer.Option(None, help="default: the model's recommended value"),
    temperature: float | None = typer.Option(None),
    top_k: int | None = typer.Option(None),
    top_p: float | None = typer.Option(None),
    scale: int = typer.Option(4, help="upscale factor of the grid (nearest) so small images are visible"),
) -> None:
    """Generate images with an AR image model and write them as one grid PNG."""
    import mmfast
    from mmfast.errors import InvalidInputError
    from mmfast.pipelines.image_gen import image_grid

    if (labels is None) == (not prompt):
        raise InvalidInputError("Pass either --labels 0,1,2 or --prompt 'digit 7'.")
    try:  # fail before generating, not after
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"cannot write --out {str(out)!r}: {e.strerror or e}; pick a writable folder.") from e
    task = "class-to-image" if labels is not None else "text-to-image"
    pipe = mmfast.pipeline(task, model=model, accelerate=accelerate)
    if labels is not None:
        try:
            conds: list = [int(x) for x in labels.split(",") if x.strip()]
        except ValueError as e:
            raise InvalidInputError(f"--labels must be comma-separated integers, got {labels!r}.") from e
    else:
        conds = list(prompt)
    res = pipe(conds, num_images_per_condition=n, seed=seed, guidance_scale=guidance_scale, temperature=temperature,
               top_k=top_k, top_p=top_p)
    try:
        image_grid(res.images, cols=len(conds) if n > 1 else min(len(conds), 10), scale=scale).save(out)
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"cannot write --out {str(out)!r} as a PNG: {e}.") from e
    typer.echo(json.dumps({"out": str(out), "images": len(res.images), **res.stats}, default=str))


@app.command()
def bench(
    suite: str | None = typer.Argument(None, help="suite name (`mmfast bench --list` shows them)"),
    accelerate: list[str] = typer.Option([], "--accelerate", "-a", help="a method spec; repeat for several"),
    repeats: int = typer.Option(3, help="interleaved repeats; medians are reported"),
    json_path: Path | None = typer.Option(None, "--json", help="write rows as JSON here"),
    md_path: Path | None = typer.Option(None, "--md", help="write a markdown table here"),
    list_suites: bool = typer.Option(False, "--list", help="list the suites and exit"),
    opt: list[str] = typer.Option([], "--opt", help="suite option key=value, e.g. --opt samples=500; repeatable"),
) -> None:
    """Run a benchmark suite: the baseline and each --accelerate spec side by side in one process."""
    import ast

    from mmfast import bench as B
    from mmfast.errors import ConfigError

    if list_suites or suite is None:
        for name, text in sorted(B.SUITE_HELP.items()):
            typer.echo(f"{name:16s} {text}")
        if not list_suites:
            raise ConfigError("name a suite: `mmfast bench SUITE` (the suites are listed above).")
        return
    opts: dict[str, Any] = {}
    for item in opt:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--opt takes key=value, got {item!r}.")
        try:
            opts[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[key.strip()] = value
    res = B.run(suite, accelerate, repeats=repeats, json_path=json_path, md_path=md_path, **opts)
    typer.echo(res.to_markdown())


@app.command("app")
def app_cmd(
    vlm: str = typer.Option("tiny-vlm", help="VLM for the QA and streaming tabs ('none' hides them)"),
    gen: str = typer.Option("tiny-ar", help="next-token image generator ('none' hides it)"),
    var: str = typer.Option("tiny-var", help="next-scale image generator ('none' hides it)"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0 serves the network)"),
    port: int = typer.Option(7860),
    share: bool = typer.Option(False, help="a public gradio.live link (needs the internet)"),
) -> None:
    """Serve the Gradio app: image / video QA, streaming video and generation, baseline vs accelerated."""
    from mmfast.apps import launch

    none = lambda m: None if m.lower() == "none" else m  # noqa: E731
    launch(host=host, port=port, share=share, vlm=none(vlm), gen=none(gen), var=none(var))


@app.command()
def env() -> None:
    """Versions, device and available kernel implementations."""
    from mmfast.envinfo import env_report

    for k, v in env_report().items():
        typer.echo(f"{k:24s} {v}")


@app.command()
def demo(random_model: bool = typer.Option(False, help="use a random-initialised tiny model")) -> None:
    """Run the offline demo on the embedded default models."""
    from mmfast.demo import run_demo

    run_demo(random_model=random_model)


@zoo_app.command("list")
def zoo_list() -> None:
    """List zoo models and whether each is installed."""
    from mmfast import zoo

    for name, present in zoo.available().items():
        typer.echo(f"{name:14s} {'installed' if present else 'missing  '}  {zoo.MODELS[name][1]}")


@zoo_app.command("train")
def zoo_train(
    name: str = typer.Argument(..., help="zoo model to train, e.g. tiny-vlm"),
    out: Path | None = typer.Option(None, help="where to write the model (default: the zoo directory; "
                                    "WORK_DIR/model with --quick or --steps)"),
    work_dir: Path | None = typer.Option(None, help="checkpoints, log.jsonl and curves (default: mmfast-train/NAME)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in WORK_DIR from its last checkpoint"),
    steps: int | None = typer.Option(None, help="cap every stage at this many steps (smoke run)"),
    quick: bool = typer.Option(False, "--quick", help="tiny model, a few steps per stage (about a minute)"),
) -> None:
    """Train a zoo model on CPU with its recipe (resumable, progress bar, log of losses and accuracies)."""
    from mmfast import zoo
    from mmfast.errors import UnsupportedModelError

    if name == "tiny-vlm":
        from mmfast.train.tiny_vlm import train
    elif name == "tiny-vlm-flex":  # starts from the installed tiny-vlm
        from mmfast.train.tiny_vlm_flex import train
    elif name == "tiny-vlm-scan":  # VideoScan carriers, from the installed tiny-vlm
        from mmfast.train.tiny_vlm_scan import train
    elif name == "tiny-ar":
        from mmfast.train.tiny_ar import train
    elif name == "tiny-ar-drafter":  # the EAGLE-style draft head of the installed tiny-ar (a few minutes)
        from mmfast.train.tiny_ar_drafter import train_drafter

        report = train_drafter(out_dir=out, steps=steps or 1500)
        typer.echo(f"tiny-ar drafter: {report}")
        return
    elif name in ("tiny-var", "tiny-var-small"):  # the pair is one recipe (shared VQ-VAE)
        from mmfast.train.tiny_var import train as train_var

        smoke = quick or steps is not None
        if steps is not None:
            raise UnsupportedModelError("tiny-var: use --quick for a smoke run (the pair has no --steps cap).")
        train_var(out_dir=out if out is not None else (None if smoke else zoo.ROOT / zoo.MODELS["tiny-var"][0]),
                  small_dir=None if smoke or out is not None else zoo.ROOT / zoo.MODELS["tiny-var-small"][0],
                  work_dir=work_dir if work_dir is not None else Path("mmfast-train") / "tiny-var", resume=resume,
                  quick=quick, log=typer.echo)
        return
    else:
        raise UnsupportedModelError(
            f"`mmfast zoo train` knows tiny-vlm, tiny-vlm-flex, tiny-vlm-scan, tiny-ar, tiny-ar-drafter and tiny-var "
            f"(with tiny-var-small), not {name!r}.")

    smoke = quick or steps is not None
    work = work_dir if work_dir is not None else Path("mmfast-train") / name
    target = out if out is not None else (None if smoke else zoo.ROOT / zoo.MODELS[name][0])
    train(out_dir=target, work_dir=work, resume=resume, steps=steps, quick=quick, log=typer.echo)


@zoo_app.command("eval")
def zoo_eval(
    name: str = typer.Argument(..., help="zoo model, e.g. tiny-vlm"),
    split: str = typer.Option("heldout", help="data split: heldout (reported numbers) or train"),
    n: int | None = typer.Option(None, "--n", help="number of images (default: 1000; tiny-ar: 500 samples)"),
    n_clips: int | None = typer.Option(None, help="number of video clips (default: n / 2)"),
    seed: int = typer.Option(0, help="data seed"),
    accelerate: str | None = AccelOpt,
    model: str | None = typer.Option(None, "--model", "-m", help="evaluate this checkpoint directory instead"),
    json_path: Path | None = typer.Option(None, "--json", help="also write the results as JSON here"),
    control: str | None = typer.Option(None, help="sanity control: blank or shuffled images (expect ~majority)"),
    num_frames: int = typer.Option(16, help="frames per clip (8-32)"),
    hold: int = typer.Option(1, help="show each frame this many times: a long video with the same answers"),
) -> None:
    """Held-out accuracy per question type (images and videos) through the real pipeline, with the majority
    baseline beside it. tiny-ar: class consistency and Fréchet distance to held-out digits (seed = sampling seed)."""
    import mmfast
    from mmfast.bench.harness import provenance
    from mmfast.train.evaluate import evaluate_vlm, format_report

    if name == "tiny-vlm-scan":  # streamed clips through VideoScan's carriers
        from mmfast.bench.stream import accuracy

        out = {f"video{num_frames * hold}": accuracy(accelerate or "videoscan(memory=64)", n_clips or 250, hold=hold,
                                                     seed=seed, model=model or name, progress=True)}
        typer.echo(json.dumps(out, indent=2))
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({**out, "model": model or name, "meta": provenance()}, indent=2))
        return
    if name in ("tiny-ar", "tiny-var", "tiny-var-small"):
        from mmfast.train.tiny_ar import evaluate, format_eval

        res = evaluate(model or name, n=500 if n is None else n, seed=seed, accelerate=accelerate, progress=True)
        typer.echo(format_eval(res).replace("tiny-ar", model or name, 1))
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            out = {k: v for k, v in res.items() if k != "images"}
            json_path.write_text(json.dumps({**out, "meta": provenance()}, indent=2))
        return
    import torch

    from mmfast.train.tiny_vlm import auto_threads

    torch.set_num_threads(auto_threads())  # one thread when the machine is already busy: far faster then
    n = 1000 if n is None else n
    pipe = mmfast.pipeline("image-qa", model=model or name, accelerate=accelerate)
    clips = n // 2 if n_clips is None else n_clips
    res = evaluate_vlm(pipe, split=split, n_images=n, n_clips=clips, seed=seed, control=control,
                       num_frames=num_frames, hold=hold)
    res["model"], res["accelerate"], res["split"], res["seed"] = model or name, pipe.accelerate.spec(), split, seed
    res["num_frames"], res["hold"] = num_frames, hold
    ctl = f", control={control}" if control else ""
    ctl += f", {num_frames} frames" + (f" x {hold}" if hold > 1 else "") if clips else ""
    typer.echo(format_report(res, title=f"{model or name} [{pipe.accelerate.spec()}] on {split} (seed {seed}{ctl}), "
                                        f"{res['seconds']:.0f} s"))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({**res, "meta": provenance()}, indent=2))


# ---- mmfast batch: resumable jobs over folders / globs / manifests / datasets (docs/batch.md) ----------------------
batch_app = typer.Typer(no_args_is_help=True, help="Resumable batch jobs: caption, qa, generate (docs/batch.md).")
app.add_typer(batch_app, name="batch")

BatchOut = typer.Option(..., "--out", "-o", help="records: .jsonl (default) or .parquet (a folder of part files)")
BatchSize = typer.Option(1, "--batch-size", "-b", help="prompts per generate call (greedy answers equal batch 1's)")
RetryErrors = typer.Option(False, "--retry-errors", help="redo the inputs whose committed record is an error")
Engine = typer.Option("local", "--engine", help="local, or ray (Ray Data; pip install 'ray[data]')")
Address = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray)")
Concurrency = typer.Option(1, "--concurrency", help="Ray actors, each holding one pipeline")
NumCpus = typer.Option(1.0, "--num-cpus", help="CPUs per Ray actor")
NumGpus = typer.Option(0.0, "--num-gpus", help="GPUs per Ray actor")
Limit = typer.Option(None, "--limit", help="process at most this many pending inputs")
Format = typer.Option(None, "--format", help="jsonl or parquet (default: from the --out suffix)")
AsJson = typer.Option(False, "--json", help="print the summary as JSON")
Quiet = typer.Option(False, "--quiet", "-q", help="no progress bar")


def _batch(task: str, as_json: bool, quiet: bool, **kwargs: Any) -> None:
    from mmfast.batch import run

    summary = run(task, progress=not quiet, **kwargs)
    typer.echo(json.dumps(summary.to_dict(), default=str) if as_json else summary.format())


@batch_app.command("caption")
def batch_caption(
    inputs: str = typer.Argument(..., help="folder (recursive), glob, manifest (.jsonl/.csv/.parquet: path, id) or "
                                 "datasets folder"),
    out: Path = BatchOut,
    model: str | None = ModelOpt,
    accelerate: str | None = AccelOpt,
    prompt: str | None = typer.Option(None, help="instruction (default: the model's caption prompt)"),
    max_new_tokens: int = typer.Option(48),
    batch_size: int = BatchSize,
    retry_errors: bool = RetryErrors,
    engine: str = Engine,
    address: str | None = Address,
    concurrency: int = Concurrency,
    num_cpus: float = NumCpus,
    num_gpus: float = NumGpus,
    limit: int | None = Limit,
    fmt: str | None = Format,
    as_json: bool = AsJson,
    quiet: bool = Quiet,
) -> None:
    """Caption every image of INPUTS into --out; a rerun skips the inputs already committed."""
    _batch("caption", as_json, quiet, inputs=inputs, out=out, model=model, accelerate=accelerate, prompt=prompt,
           max_new_tokens=max_new_tokens, batch_size=batch_size, retry_errors=retry_errors, engine=engine,
           address=address, concurrency=concurrency, num_cpus=num_cpus, num_gpus=num_gpus, limit=limit, fmt=fmt)


@batch_app.command("qa")
def batch_qa(
    inputs: str = typer.Argument(..., help="folder, glob, manifest (path, question, id) or datasets folder; images "
                                 "and videos"),
    out: Path = BatchOut,
    question: str | None = typer.Option(None, "--question", help="question for inputs without their own"),
    model: str | None = ModelOpt,
    accelerate: str | None = AccelOpt,
    max_new_tokens: int = typer.Option(32),
    num_frames: int | None = typer.Option(None, help="frames sampled uniformly from each video"),
    fps: float | None = typer.Option(None, help="sample videos at this many frames per second instead"),
    batch_size: int = BatchSize,
    retry_errors: bool = RetryErrors,
    engine: str = Engine,
    address: str | None = Address,
    concurrency: int = Concurrency,
    num_cpus: float = NumCpus,
    num_gpus: float = NumGpus,
    limit: int | None = Limit,
    fmt: str | None = Format,
    as_json: bool = AsJson,
    quiet: bool = Quiet,
) -> None:
    """Answer a question about every image / video of INPUTS (image-qa, video-qa by extension) into --out."""
    _batch("qa", as_json, quiet, inputs=inputs, out=out, question=question, model=model, accelerate=accelerate,
           max_new_tokens=max_new_tokens, num_frames=num_frames, fps=fps, batch_size=batch_size,
           retry_errors=retry_errors, engine=engine, address=address, concurrency=concurrency, num_cpus=num_cpus,
           num_gpus=num_gpus, limit=limit, fmt=fmt)


@batch_app.command("generate")
def batch_generate(
    inputs: str | None = typer.Argument(None, help="manifest with a 'label' or 'prompt' column (optional 'id', "
                                        "'seed'); or use --labels / --prompt"),
    out: Path = BatchOut,
    labels: str | None = typer.Option(None, help="comma-separated class labels, e.g. 0,1,2"),
    prompt: list[str] = typer.Option([], help="text prompt(s); repeat for several"),
    n: int = typer.Option(1, help="images per label / prompt (ids LABEL/0, LABEL/1, ...)"),
    images_dir: Path | None = typer.Option(None, help="where the PNGs go (default: <out stem>_images/ beside --out)"),
    model: str | None = ModelOpt,
    accelerate: str | None = AccelOpt,
    seed: int = typer.Option(0, help="job seed: each image's seed is a hash of (seed, id) unless the row has one"),
    guidance_scale: float | None = typer.Option(None, help="default: the model's recommended value"),
    temperature: float | None = typer.Option(None),
    top_k: int | None = typer.Option(None),
    top_p: float | None = typer.Option(None),
    retry_errors: bool = RetryErrors,
    engine: str = Engine,
    address: str | None = Address,
    concurrency: int = Concurrency,
    num_cpus: float = NumCpus,
    num_gpus: float = NumGpus,
    limit: int | None = Limit,
    fmt: str | None = Format,
    as_json: bool = AsJson,
    quiet: bool = Quiet,
) -> None:
    """Generate one PNG per (condition, k) and a record per image into --out (the manifest)."""
    from mmfast.errors import InvalidInputError

    conds: list[int | str] | None = None
    if labels is not None or prompt:
        if labels is not None and prompt:
            raise InvalidInputError("Pass --labels or --prompt, not both.")
        try:
            conds = [int(x) for x in labels.split(",") if x.strip()] if labels is not None else list(prompt)
        except ValueError as e:
            raise InvalidInputError(f"--labels must be comma-separated integers, got {labels!r}.") from e
    _batch("generate", as_json, quiet, inputs=inputs, out=out, labels=conds, n=n, images_dir=images_dir, model=model,
           accelerate=accelerate, seed=seed, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
           top_p=top_p, retry_errors=retry_errors, engine=engine, address=address, concurrency=concurrency,
           num_cpus=num_cpus, num_gpus=num_gpus, limit=limit, fmt=fmt)


def main() -> None:
    """Run the CLI: mmfast's typed errors and click's usage errors (unknown command / option, a bad value) print one
    ``error: ...`` line on stderr and exit 2; Ctrl-C exits 130."""
    import os

    try:
        from typer._click import exceptions as click_errors  # typer >= 0.24 ships its own click
    except ImportError:  # older typer runs on click itself
        from click import exceptions as click_errors

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no weight-loading bars around a one-line answer
    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx is not None else str(e))
        sys.exit(2)
    except click_errors.UsageError as e:
        cmd = e.ctx.command_path if e.ctx is not None else "mmfast"
        typer.echo(f"error: {e.format_message()} (see `{cmd} --help`)", err=True)
        sys.exit(2)
    except MMFastError as e:
        typer.echo("error: " + " ".join(str(e).split()), err=True)  # one line, even when a wrapped cause had several
        sys.exit(2)
    except (KeyboardInterrupt, click_errors.Abort):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
