"""The batch job: discover -> skip committed ids -> process pending items chunk by chunk -> commit -> summary.

:func:`run` drives the local engine (one :class:`~mmfast.batch.worker.Worker` in this process) or hands the
pending items to :mod:`mmfast.batch.ray_engine`; both commit through the same store, so resuming is the same rule
whichever engine wrote the records.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmfast.batch.inputs import TASKS, Item, discover
from mmfast.batch.store import JsonlStore, RecordStore, open_store
from mmfast.batch.worker import JobSpec, Worker
from mmfast.errors import ConfigError, InvalidInputError
from mmfast.pipelines.base import check_generation_kwargs

ENGINES = ("local", "ray")


@dataclass
class BatchSummary:
    """What :func:`run` returns (and the CLI prints).

    ``done`` / ``errors``: ok and error records this run committed; ``skipped``: inputs already committed before it;
    ``retried``: error records dropped to be redone (``retry_errors``); ``pending``: inputs still without a record
    (``limit``). ``records_per_s`` counts this run's records over its wall time (discovery and model loading
    included); ``startup_s`` is the time to the first commit and ``steady_records_per_s`` the rate after it.
    ``visual_tokens_in`` / ``_kept``, ``kv_bytes`` and ``kv_bytes_baseline``: sums over this run's ok records (the
    baseline KV bytes are what the unaccelerated cache would hold for the same prompts; only with ``accelerate``).
    """

    task: str
    out: str
    engine: str
    model: str
    accelerate: str
    batch_size: int
    total: int
    done: int = 0
    errors: int = 0
    skipped: int = 0
    retried: int = 0
    pending: int = 0
    seconds: float = 0.0
    records_per_s: float = 0.0
    startup_s: float = 0.0
    steady_records_per_s: float = 0.0
    error_types: dict[str, int] = field(default_factory=dict)
    visual_tokens_in: int = 0
    visual_tokens_kept: int = 0
    kv_bytes: int = 0
    kv_bytes_baseline: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add(self, records: Sequence[dict[str, Any]]) -> None:
        for r in records:
            if r["status"] == "error":
                self.errors += 1
                kind = (r.get("error") or {}).get("type", "Error")
                self.error_types[kind] = self.error_types.get(kind, 0) + 1
                continue
            self.done += 1
            s = r.get("stats") or {}
            self.visual_tokens_in += int(s.get("visual_tokens_in", 0))
            self.visual_tokens_kept += int(s.get("visual_tokens_kept", 0))
            self.kv_bytes += int(s.get("kv_bytes", 0))
            self.kv_bytes_baseline += int(s.get("kv_bytes_baseline", s.get("kv_bytes", 0)))

    def format(self) -> str:
        lines = [
            f"{self.task} -> {self.out} [{self.engine}, {self.model}, {self.accelerate}, batch {self.batch_size}]",
            f"  done {self.done}, errors {self.errors}, skipped {self.skipped} (already committed)"
            + (f", retried {self.retried}" if self.retried else "") + (f", pending {self.pending}" if self.pending else ""),
            f"  {self.seconds:.1f} s, {self.records_per_s:.2f} records/s ({self.steady_records_per_s:.2f} after the "
            f"first commit at {self.startup_s:.1f} s)",
        ]
        if self.error_types:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.error_types.items()))
            lines.append(f"  errors by type: {kinds} (records with status=error; redo them with --retry-errors)")
        if self.accelerate != "baseline" and self.visual_tokens_in:
            vt = 1 - self.visual_tokens_kept / self.visual_tokens_in
            kv = 1 - self.kv_bytes / self.kv_bytes_baseline if self.kv_bytes_baseline else 0.0
            lines.append(f"  visual tokens {self.visual_tokens_kept} / {self.visual_tokens_in} ({vt:.0%} saved), "
                         f"KV bytes {self.kv_bytes} / {self.kv_bytes_baseline} baseline ({kv:.0%} saved)")
        return "\n".join(lines)


def _default_images_dir(out: Path) -> Path:
    return out.with_name(out.stem + "_images")


def run(
    task: str,
    inputs: Any = None,
    out: str | os.PathLike[str] = "out.jsonl",
    *,
    model: str | None = None,
    accelerate: str | None = None,
    question: str | None = None,
    prompt: str | None = None,
    labels: Sequence[int | str] | None = None,
    n: int = 1,
    batch_size: int = 1,
    retry_errors: bool = False,
    engine: str = "local",
    address: str | None = None,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    limit: int | None = None,
    fmt: str | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    max_new_tokens: int | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    images_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> BatchSummary:
    """Run (or resume) a batch job; returns its :class:`BatchSummary`.

    Args:
        task: ``"caption"`` (image-caption), ``"qa"`` (image-qa, video-qa for video files) or ``"generate"``
            (class-to-image: writes PNGs to ``images_dir``, default ``<out stem>_images/`` beside ``out``).
        inputs: folder / glob / manifest / ``datasets`` folder / media file / list of paths
            (:func:`mmfast.batch.inputs.discover`); ``generate``: a manifest, or ``labels``.
        out: ``.jsonl`` (default) or ``.parquet`` (a folder of part files); see :mod:`mmfast.batch.store`.
        question: qa question for items without their own; prompt: caption instruction.
        batch_size: prompts per ``generate`` call (VLM tasks; greedy answers equal batch 1's).
        retry_errors: drop the committed error records of these inputs first, so they are redone.
        engine: ``"local"`` or ``"ray"`` (Ray Data, :mod:`mmfast.batch.ray_engine`: ``address``, ``concurrency``
            actors with ``num_cpus`` / ``num_gpus`` each).
        limit: process at most this many pending items (the rest stay pending).
        chunk_size: items per commit (default: ``batch_size`` for JSONL, at least 256 for Parquet parts).
    """
    if task not in TASKS:
        raise ConfigError(f"Unknown batch task {task!r}; choose one of {', '.join(TASKS)}.")
    if engine not in ENGINES:
        raise ConfigError(f"Unknown engine {engine!r}; choose local or ray.")
    for name, value in (("batch_size", batch_size), ("concurrency", concurrency), ("n", n)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    if limit is not None and limit < 0:
        raise ConfigError("limit must be >= 0.")
    if engine == "ray":
        from mmfast.batch.ray_engine import require_ray

        require_ray()  # say how to install it before any work
    if task != "generate":  # the same typed errors as the pipelines, before any model loads
        check_generation_kwargs({"max_new_tokens": max_new_tokens})
    t0 = time.perf_counter()
    items = discover(task, inputs, labels=labels, n=n)
    if task == "qa" and question is None:
        missing = [it.id for it in items if not it.question]
        if missing and len(missing) == len(items):  # every record would fail; some missing: error records for those
            raise InvalidInputError(f"None of the {len(items)} inputs has a question (e.g. {missing[0]!r}): pass "
                                    "--question, or give the manifest a 'question' column.")
    out_path = Path(out)
    try:
        store = open_store(out_path, fmt)
    except OSError as e:
        raise InvalidInputError(f"cannot write the records to {str(out_path)!r}: {e.strerror or e}; pick a writable "
                                "folder.") from e
    wanted = {it.id for it in items}
    retried = 0
    if retry_errors:
        redo = {i for i, status in store.committed().items() if status == "error" and i in wanted}
        store.drop(redo)
        retried = len(redo)
    committed = store.committed()
    pending = [it for it in items if it.id not in committed]
    skipped = len(items) - len(pending)
    left = 0
    if limit is not None:
        pending, left = pending[:limit], max(len(pending) - limit, 0)

    if task == "generate":
        gen = {"guidance_scale": guidance_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    else:
        gen = {"max_new_tokens": max_new_tokens if max_new_tokens is not None else (48 if task == "caption" else 32)}
    spec = JobSpec(task=task, model=model, accelerate=accelerate, question=question, prompt=prompt,
                   batch_size=batch_size, num_frames=num_frames, fps=fps, seed=seed,
                   gen_kwargs={k: v for k, v in gen.items() if v is not None}, device=device, dtype=dtype,
                   images_dir=str(images_dir or _default_images_dir(out_path)), answer_root=str(out_path.parent))
    if chunk_size is None:
        chunk_size = batch_size if isinstance(store, JsonlStore) else max(256, batch_size)
    summary = BatchSummary(task=task, out=str(out_path), engine=engine, model=str(model or "default"),
                           accelerate=accelerate or "baseline", batch_size=batch_size, total=len(items),
                           skipped=skipped, retried=retried, pending=left)
    first = 0  # records of the first commit
    if pending:
        from tqdm.auto import tqdm

        with tqdm(total=len(pending), desc=f"batch {task}", unit="rec", disable=not progress) as bar:
            if engine == "ray":
                from mmfast.batch.ray_engine import run_ray

                chunks = run_ray(spec, pending, chunk_size, address=address, concurrency=concurrency,
                                 num_cpus=num_cpus, num_gpus=num_gpus)
            else:
                chunks = _run_local(spec, pending, chunk_size)
            for records in chunks:
                _commit(store, records, summary)
                if not first:
                    first, summary.startup_s = len(records), time.perf_counter() - t0
                bar.update(len(records))
                bar.set_postfix(errors=summary.errors, refresh=False)
    summary.seconds = time.perf_counter() - t0
    n = summary.done + summary.errors
    summary.records_per_s = n / summary.seconds if summary.seconds else 0.0
    after = summary.seconds - summary.startup_s
    summary.steady_records_per_s = (n - first) / after if after > 0 and n > first else 0.0
    return summary


def _run_local(spec: JobSpec, pending: list[Item], chunk_size: int) -> Any:
    worker = Worker(spec)
    for start in range(0, len(pending), chunk_size):
        records = worker.process(pending[start : start + chunk_size])
        yield records


def _commit(store: RecordStore, records: list[dict[str, Any]], summary: BatchSummary) -> None:
    records = [r for r in records if r["id"] not in store]  # idempotent: a record id is written once
    store.commit(records)
    summary.add(records)
    if summary.model == "default" and records:
        summary.model = records[0]["model"]


__all__ = ["BatchSummary", "run"]
