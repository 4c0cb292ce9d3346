"""Batch-job throughput on tiny-vlm: batched VLM inference (batch 8 vs 1, side by side) and Ray vs local.

    OMP_NUM_THREADS=1 python eval/batch_throughput.py --n 64 --repeats 3 --json eval/results/batch-throughput.json \
        --md eval/results/batch-throughput.md [--ray]

Rows:

* ``pipeline``: ``image-caption`` over the same ``n`` images with ``batch_size`` 1 and 8, interleaved over
  ``repeats`` in one process (medians); ``answers_equal``: the batch-8 captions equal batch 1's.
* ``job``: ``mmfast.batch.run("caption", ...)`` end to end (discovery, model load, commits) at batch 1 and 8;
  ``steady_records_per_s`` excludes the start-up (model load) before the first commit.
* ``ray`` (``--ray``): the same job on Ray Data with 2 local actors (``num_cpus=1`` each) beside the local engine.

Measure on a quiet machine: the numbers are CPU wall-clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _images(folder: Path, n: int) -> list[Path]:
    from mmfast.train.tiny_models import make_test_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:04d}.png"
        make_test_image(i, (48 + 16 * (i % 3), 48)).save(p)
        paths.append(p)
    return paths


def measure(n: int = 64, repeats: int = 3, max_new_tokens: int = 16, ray: bool = False) -> list[dict[str, Any]]:
    import mmfast
    from mmfast import batch

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = _images(root / "imgs", n)
        pipe = mmfast.pipeline("image-caption", model="tiny-vlm")
        pipe.set_progress_bar_config(disable=True)
        pipe(image=[str(p) for p in paths[:8]], max_new_tokens=max_new_tokens, batch_size=8)  # warm-up
        times: dict[int, list[float]] = {1: [], 8: []}
        answers: dict[int, list[str]] = {}
        for _ in range(repeats):
            for bs in (1, 8):
                t0 = time.perf_counter()
                outs = pipe(image=[str(p) for p in paths], max_new_tokens=max_new_tokens, batch_size=bs)
                times[bs].append(time.perf_counter() - t0)
                answers[bs] = [o["answer"] for o in outs]
        base = n / statistics.median(times[1])
        for bs in (1, 8):
            rate = n / statistics.median(times[bs])
            rows.append({"kind": "pipeline", "engine": "local", "batch_size": bs, "records": n,
                         "seconds": statistics.median(times[bs]), "records_per_s": rate, "speedup": rate / base,
                         "answers_equal": answers[bs] == answers[1]})
        for bs in (1, 8):
            s = batch.run("caption", root / "imgs", root / f"job{bs}.jsonl", model="tiny-vlm",
                          max_new_tokens=max_new_tokens, batch_size=bs, progress=False)
            rows.append({"kind": "job", "engine": "local", "batch_size": bs, "records": s.done + s.errors,
                         "seconds": s.seconds, "records_per_s": s.records_per_s, "startup_s": s.startup_s,
                         "steady_records_per_s": s.steady_records_per_s})
        if ray:
            s = batch.run("caption", root / "imgs", root / "ray.jsonl", model="tiny-vlm", max_new_tokens=max_new_tokens,
                          batch_size=8, engine="ray", concurrency=2, num_cpus=1, progress=False)
            rows.append({"kind": "ray", "engine": "ray x2", "batch_size": 8, "records": s.done + s.errors,
                         "seconds": s.seconds, "records_per_s": s.records_per_s, "startup_s": s.startup_s,
                         "steady_records_per_s": s.steady_records_per_s})
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = ("kind", "engine", "batch_size", "records", "seconds", "records_per_s", "speedup", "startup_s",
            "steady_records_per_s", "answers_equal")
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--ray", action="store_true", help="also run the job on Ray Data with 2 local actors")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    rows = measure(args.n, args.repeats, args.max_new_tokens, args.ray)
    md = to_markdown(rows)
    print(md)
    if args.json:
        from mmfast.bench.harness import provenance

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "meta": provenance(), "args": vars(args) | {
            "json": str(args.json), "md": str(args.md)}}, indent=2))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
