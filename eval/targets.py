"""Check the benchmark results in ``eval/results/`` against the project's targets (speed and quality goals
are benchmarks, not timed tests: this script reports them, it does not gate CI).

    python eval/targets.py            # every target whose results file exists
    python eval/targets.py --strict   # exit 1 if a target is missed

Each target names a results file (written by ``mmfast bench SUITE --json``), the rows it applies to and a
condition on a row (``base`` is the baseline row of the same input / model).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
Row = dict[str, Any]


@dataclass
class Target:
    issue: int
    file: str  # results JSON name
    rows: str  # regex on the row's method
    what: str
    check: Callable[[Row, Row], bool]
    value: Callable[[Row, Row], float]
    input: str | None = None  # only rows with this "input"


def _ratio(r: Row, _b: Row) -> float:
    return r["speedup"] / r["ideal_speedup"]


TARGETS = [
    Target(3, "tiny-vlm-heldout.json", r"^image$", "tiny-vlm held-out image QA >= 85%",
           lambda r, b: r["accuracy"] >= 0.85, lambda r, b: r["accuracy"]),
    Target(3, "tiny-vlm-heldout.json", r"^video$", "tiny-vlm held-out video QA >= 75%",
           lambda r, b: r["accuracy"] >= 0.75, lambda r, b: r["accuracy"]),
    Target(2, "vlm-speed-vision.json", r"^pool\(factor=2\)$", "prefill speed-up / ideal", lambda r, b: True, _ratio),
    Target(5, "vlm-speed-vision.json", r"^(turbo|tokenflex)\(keep=0\.25\)$", "prefill speed-up >= 0.8 x ideal at 25%",
           lambda r, b: _ratio(r, b) >= 0.8, _ratio),
    Target(5, "vlm-quality.json", r"^(turbo|tokenflex)\(keep=0\.25\)$", "accuracy retained >= 0.95 at 25% (goal)",
           lambda r, b: r["accuracy_retained"] >= 0.95, lambda r, b: r["accuracy_retained"]),
    Target(3, "vlm-quality.json", r"^random\(keep=0\.25\)$", "random 25% loses >= 10 points (tasks need detail)",
           lambda r, b: b["accuracy"] - r["accuracy"] >= 0.10, lambda r, b: b["accuracy"] - r["accuracy"]),
    Target(7, "vlm-quality.json", r"^lookm\(budget=0\.2", "LOOK-M 20%: within 2 points of baseline",
           lambda r, b: b["accuracy"] - r["accuracy"] <= 0.02, lambda r, b: b["accuracy"] - r["accuracy"]),
    Target(7, "vlm-quality.json", r"^lookm\(budget=0\.2", "LOOK-M 20%: kv_bytes <= 0.25 x baseline",
           lambda r, b: r["kv_bytes"] <= 0.25 * b["kv_bytes"], lambda r, b: r["kv_bytes"] / b["kv_bytes"]),
    Target(5, "vlm-quality.json", r"^(turbo|tokenflex)\(keep=0\.25\)$", "beats random(keep=0.25) and pool(factor=2)",
           lambda r, b: r["accuracy"] > max(_acc(b, "random(keep=0.25)"), _acc(b, "pool(factor=2)")),
           lambda r, b: r["accuracy"] - max(_acc(b, "random(keep=0.25)"), _acc(b, "pool(factor=2)"))),
    Target(7, "vlm-quality.json", r"^zipvl\((?!.*evict)", "ZipVL quant: KV >= 4x smaller than the bf16 baseline",
           lambda r, b: r["kv_ratio_bf16"] <= 0.25, lambda r, b: 1 / r["kv_ratio_bf16"]),
    Target(7, "video-quality.json", r"^zipvl", "ZipVL: video accuracy within 1 point",
           lambda r, b: b["accuracy"] - r["accuracy"] <= 0.01, lambda r, b: b["accuracy"] - r["accuracy"]),
    Target(7, "vlm-speed-kv-long.json", r"^zipvl", "ZipVL prefill speed-up on a long video >= 2x (goal 2.6x)",
           lambda r, b: r["speedup"] >= 2.0, lambda r, b: r["speedup"], input="video128"),
    Target(6, "ar-quality-drafter.json", r"^lantern\(.*drafter", "LANTERN over strict drafter SD >= 1.5x in steps",
           lambda r, b: _steps(b, "eagle_sd()") / r["steps"] >= 1.5, lambda r, b: _steps(b, "eagle_sd()") / r["steps"]),
    Target(6, "ar-speed.json", r"^(sjd|gsd|lantern)", "projected wall speed-up (GPT-B step cost) >= 0.7 x compression",
           lambda r, b: r["projected_speedup"] >= 0.7 * r["tiny_ar_step_compression"],
           lambda r, b: r["projected_speedup"] / r["tiny_ar_step_compression"]),
    Target(6, "ar-quality-jacobi.json", r"^sjd", "SJD step compression >= 2.0",
           lambda r, b: r["step_compression"] >= 2.0, lambda r, b: r["step_compression"]),
    Target(6, "ar-quality-jacobi.json", r"^(sjd|gsd|lantern|eagle_sd)", "wall-clock speed-up >= 0.7 x step compression",
           lambda r, b: r["speedup"] >= 0.7 * r["step_compression"], lambda r, b: r["speedup"] / r["step_compression"]),
]


def _acc(base: Row, method: str) -> float:
    """Accuracy of another row of the same results file (looked up through the baseline row's ``_rows``)."""
    return next(r["accuracy"] for r in base["_rows"] if r["method"] == method and r.get("input") == base.get("input"))


def _steps(base: Row, method: str) -> float:
    return next(r["steps"] for r in base["_rows"] if r["method"] == method)


def _rows(data: dict[str, Any]) -> list[Row]:
    """A bench result's rows; a ``mmfast zoo eval --json`` result becomes one row per modality (+ a baseline)."""
    if "rows" in data:
        return data["rows"]
    return [{"method": "baseline"}] + [{"method": m, "accuracy": data[m]["overall"]} for m in ("image", "video")
                                       if m in data]


def _baseline(rows: list[Row], row: Row) -> Row | None:
    for b in rows:
        if b["method"] == "baseline" and b.get("input") == row.get("input") and b.get("model", "") == row.get(
            "model", b.get("model", "")
        ):
            return b
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strict", action="store_true", help="exit 1 if any target is missed")
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    missed = 0
    for t in TARGETS:
        path = a.results / t.file
        if not path.is_file():
            print(f"#{t.issue} {t.what}: no {t.file} yet")
            continue
        rows = _rows(json.loads(path.read_text()))
        for r in rows:
            if not re.search(t.rows, r["method"]) or (t.input and r.get("input") != t.input):
                continue
            b = _baseline(rows, r)
            if b is None or (t.input and r.get("input") != t.input):
                continue
            b = {**b, "_rows": rows}
            try:
                ok, value = t.check(r, b), t.value(r, b)
            except (KeyError, StopIteration, TypeError):  # a row this target needs is missing
                print(f"#{t.issue} ---- {t.what}: {r['method']}: needed rows / fields missing")
                continue
            missed += not ok
            where = f"[{r['input']}] " if r.get("input") else ""
            print(f"#{t.issue} {'PASS' if ok else 'MISS'} {t.what}: {where}{r['method']} = {value:.3f}")
    return 1 if a.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
