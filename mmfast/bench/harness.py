"""The side-by-side benchmark harness: the baseline and every method in ONE process, interleaved, medians.

``mmfast bench SUITE --accelerate SPEC [--accelerate SPEC ...] --repeats N --json out.json --md out.md``

Every suite returns rows of one schema (:data:`ROW_FIELDS`; the unaccelerated row's method is
``"baseline"``); ratios (``speedup``, ``accuracy_retained``, ...) are taken against the baseline row of the same
input measured in the same run. Suites register with :func:`suite`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfast.errors import ConfigError

ROW_FIELDS: tuple[str, ...] = (
    "method",
    "accuracy",
    "accuracy_retained",
    "visual_tokens",
    "kv_bytes",
    "prefill_ms",
    "decode_ms_per_token",
    "steps",
    "step_compression",
    "speedup",
    "ideal_speedup",
)

SUITES: dict[str, Callable[..., list[dict[str, Any]]]] = {}
SUITE_HELP: dict[str, str] = {}


def suite(name: str, help: str = "") -> Callable:
    """Register a suite function ``fn(methods: list[str], repeats: int, **opts) -> list[row dict]``."""

    def deco(fn: Callable[..., list[dict[str, Any]]]) -> Callable[..., list[dict[str, Any]]]:
        SUITES[name] = fn
        SUITE_HELP[name] = help or (fn.__doc__ or "").strip().splitlines()[0]
        return fn

    return deco


def row(method: str, **values: Any) -> dict[str, Any]:
    """A row with every schema field (missing ones ``None``) plus any extra fields given."""
    out: dict[str, Any] = {k: None for k in ROW_FIELDS}
    out["method"] = method
    out.update(values)
    return out


def median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


# --------------------------------------------------------------------------------------------------
# running and reporting
# --------------------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    suite: str
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite, "rows": self.rows, "meta": self.meta}

    def to_markdown(self) -> str:
        extra = [k for r in self.rows for k in r if k not in ROW_FIELDS]
        cols = list(dict.fromkeys(["input", *ROW_FIELDS, *extra])) if any("input" in r for r in self.rows) else list(
            dict.fromkeys([*ROW_FIELDS, *extra])
        )
        cols = [c for c in cols if any(r.get(c) is not None for r in self.rows) or c == "method"]
        lines = [f"### {self.suite}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        if self.meta:
            lines += ["", "; ".join(f"{k}: {v}" for k, v in self.meta.items() if not isinstance(v, (dict, list)))]
        return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, dict):  # e.g. accuracy per question type
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def run(
    suite_name: str,
    methods: Sequence[str] = (),
    repeats: int = 3,
    json_path: str | Path | None = None,
    md_path: str | Path | None = None,
    **opts: Any,
) -> BenchResult:
    """Run a suite (baseline first, then ``methods``), write JSON / markdown if paths are given."""
    if suite_name not in SUITES:
        raise ConfigError(f"Unknown bench suite {suite_name!r}. Suites: {', '.join(sorted(SUITES))}.")
    if repeats < 1:
        raise ConfigError("repeats must be >= 1.")
    from mmfast.accel.spec import resolve

    for m in methods:  # fail fast on a bad spec, before building any model
        resolve(m)
    t0 = time.perf_counter()
    rows = SUITES[suite_name](list(methods), repeats, **opts)
    meta = {"repeats": repeats, "wall_s": round(time.perf_counter() - t0, 1), **provenance()}
    res = BenchResult(suite_name, rows, meta)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res.to_json(), indent=2))
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(res.to_markdown())
    return res


def provenance() -> dict[str, Any]:
    """Where a result was measured: commit (``+dirty`` with local changes; ``MMFAST_COMMIT`` outside a git
    checkout), date, device (and on CUDA the driver and CUDA versions), library versions."""
    import datetime
    import os
    import platform
    import subprocess

    import torch

    from mmfast.envinfo import _version

    root = Path(__file__).resolve().parents[2]
    commit = None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = os.environ.get("MMFAST_COMMIT") or None  # not a git checkout (a wheel, a copied working tree)
    cuda = torch.cuda.is_available()
    return {
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        **({"driver": _driver(), "cuda": torch.version.cuda} if cuda else {}),
        "threads": torch.get_num_threads(),
        "versions": {pkg: _version(pkg) for pkg in ("mmfast", "torch", "transformers", "triton")}
        | {"python": platform.python_version()},
    }


def _driver() -> str | None:
    """The NVIDIA driver version (``nvidia-smi``), or None."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None
