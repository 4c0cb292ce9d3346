"""Resumable batch jobs: ``mmfast batch caption | qa | generate`` and ``mmfast.batch.run(...)``.

```python
from mmfast import batch

summary = batch.run("caption", "photos/", "captions.jsonl", batch_size=8)   # rerun: skips committed ids
summary = batch.run("qa", "questions.csv", "answers.parquet", accelerate="pool(factor=2)", retry_errors=True)
summary = batch.run("generate", labels=[0, 1, 2], out="gen.jsonl", n=4)   # PNGs in gen_images/
summary = batch.run("caption", "photos/", "captions.jsonl", engine="ray", concurrency=2)
print(summary.format())
```

Modules: :mod:`~mmfast.batch.inputs` (discovery, stable ids), :mod:`~mmfast.batch.store` (atomic commits, the
record schema), :mod:`~mmfast.batch.worker` (pipeline -> records), :mod:`~mmfast.batch.job` (local engine, summary), :mod:`~mmfast.batch.ray_engine` (Ray
Data). User guide: docs/batch.md.
"""

from mmfast.batch.inputs import IMAGE_EXTENSIONS, TASKS, Item, discover, read_manifest
from mmfast.batch.job import BatchSummary, run
from mmfast.batch.store import FIELDS, JsonlStore, ParquetStore, open_store
from mmfast.batch.worker import JobSpec, Worker

__all__ = [
    "FIELDS",
    "IMAGE_EXTENSIONS",
    "TASKS",
    "BatchSummary",
    "Item",
    "JobSpec",
    "JsonlStore",
    "ParquetStore",
    "Worker",
    "discover",
    "open_store",
    "read_manifest",
    "run",
]
