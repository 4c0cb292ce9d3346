"""``engine="ray"``: the same batch job on Ray Data, local by default or on a cluster (``address``).

The driver discovers the items and drops the committed ids (the same rule as the local engine), then::

    ray.data.from_items(pending rows)                                  # one row per item: its index + the pickled Item
      .map_batches(_RecordActor, compute=ActorPoolStrategy(size=N),     # an actor pool, ONE pipeline per actor
                   num_cpus=c, num_gpus=g, batch_size=chunk)
      .iter_batches()                                                  # records stream back as actors finish them

and the driver commits every batch of records through the job's store as it arrives, so resume is identical
whichever engine wrote a record, and a record id is committed once even if Ray re-executes a task (the writer
skips ids it already holds). Actors read media themselves: on a multi-machine cluster the input paths (and,
for ``generate``, the images folder) must be on storage every node sees. Ray is an extra
(``pip install 'ray[data]'`` or ``mmfast[dist]``); without it only this engine is unavailable.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from mmfast.batch.inputs import Item
from mmfast.batch.worker import JobSpec, Worker
from mmfast.errors import ConfigError

INSTALL_HINT = "--engine ray needs Ray Data: pip install 'ray[data]' (or pip install 'mmfast[dist]')."


def require_ray() -> Any:
    """Import ray, or raise :class:`~mmfast.errors.ConfigError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    return ray


class _RecordActor:
    """A Ray Data actor: builds one :class:`~mmfast.batch.worker.Worker` (one pipeline), then maps batches of
    pickled items to JSON records."""

    def __init__(self, spec: dict[str, Any]):
        import torch

        if torch.get_num_threads() > 1 and not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(spec.pop("_threads", 1))))
        spec.pop("_threads", None)
        self.worker = Worker(JobSpec(**spec))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        items: list[Item] = [pickle.loads(bytes(b)) for b in batch["item"]]  # our own driver pickled them
        records = self.worker.process(items)
        return {"index": list(batch["index"]), "record": [json.dumps(r, default=str) for r in records]}


def run_ray(
    spec: JobSpec,
    pending: list[Item],
    chunk_size: int,
    *,
    address: str | None = None,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> Iterator[list[dict[str, Any]]]:
    """Yield lists of records for ``pending`` as the actor pool finishes them (order not kept: records are keyed by
    id). Starts a local Ray (``ray.init()``) unless one is running or ``address`` names a cluster, and shuts down
    only a Ray it started."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the job's own bar counts committed records
        rows = [{"index": i, "item": pickle.dumps(it)} for i, it in enumerate(pending)]
        block = max(chunk_size, spec.batch_size)
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / block)))
        actor_spec = {**asdict(spec), "_threads": max(1, int(num_cpus))}
        ds = ds.map_batches(
            _RecordActor,
            fn_constructor_kwargs={"spec": actor_spec},
            batch_size=block,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=num_cpus,
            num_gpus=num_gpus or None,
            batch_format="numpy",
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            yield [json.loads(r) for r in batch["record"]]
    finally:
        if started:
            ray.shutdown()
