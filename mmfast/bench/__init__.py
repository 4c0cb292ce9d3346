"""Benchmarks: ``mmfast bench SUITE --accelerate SPEC [--accelerate SPEC ...] --json out.json --md out.md``.

:mod:`.harness` runs a suite (the baseline and every method in one process, interleaved, medians) and writes rows
of one schema with provenance; :mod:`.flops` counts the ideal speed-up; :mod:`.vlm`, :mod:`.stream`, :mod:`.ar` and :mod:`.var` are the suites;
:mod:`.gpu` runs the GPU suite (kernels, vlm-speed and ar-speed at real sizes) in one command.
The suites know no method by name: methods report their own figures (``Accelerator.extra_stats``, the prefill
stage's per-layer records).
"""

from mmfast.bench import ar, gpu, stream, var, vlm  # noqa: F401  (registers the suites)
from mmfast.bench.harness import ROW_FIELDS, SUITE_HELP, SUITES, BenchResult, median, provenance, row, run, suite

__all__ = ["ROW_FIELDS", "SUITES", "SUITE_HELP", "BenchResult", "median", "provenance", "row", "run", "suite"]
