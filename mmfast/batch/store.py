"""Committed-record stores of batch jobs: what is written stays written, exactly once per id.

Two formats, one contract (:class:`RecordStore`): ``committed()`` lists the ids already written (a rerun skips
them), ``commit(records)`` makes a chunk durable before it returns, ``drop(ids)`` removes records (``--retry-errors``)
atomically.

* :class:`JsonlStore` (``out.jsonl``, the default): one JSON object per line. A chunk is appended with one
  ``write``, then ``flush`` + ``fsync``. A process killed mid-write (SIGKILL, power loss) can leave at most a torn
  last line, without its newline: the store cuts it off when it opens the file (that record is redone). ``drop``
  rewrites the file to a temporary name, fsyncs it and ``os.replace`` s it over the old one.
* :class:`ParquetStore` (``out.parquet``, a folder like Spark's / Ray's): every chunk is one
  ``part-NNNNNN.parquet`` file, written to a hidden temporary name, fsynced, then renamed; leftover temporary
  files of a killed run are deleted on open. Readable as one table: ``pandas.read_parquet("out.parquet")``.
  Parquet cells are typed columns, so ``stats`` and ``error`` are stored there as JSON text.

Record schema (JSONL; Parquet the same, ``stats`` / ``error`` as JSON strings)::

    id          str    the item's stable id (unique)
    task        str    "caption" | "qa" | "generate"
    source      str    the input path (generate: the condition)
    status      str    "ok" | "error"
    answer      str    the caption / answer (generate: the image path relative to the output); null on error
    question    str    the question asked (caption: the prompt; generate: null)
    error       {"type": str, "message": str} | null    the typed error of a bad input
    model       str    the model name
    accelerate  str    the accelerate spec ("baseline" without one)
    stats       dict   the pipeline's per-record stats (visual_tokens_in / _kept, kv_bytes, prefill_ms, ...)
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from mmfast.errors import ConfigError, InvalidInputError

logger = logging.getLogger(__name__)

#: record fields, in order
FIELDS = ("id", "task", "source", "status", "answer", "question", "error", "model", "accelerate", "stats")


class RecordStore(Protocol):
    path: Path

    def committed(self) -> dict[str, str]:
        """id -> status of every committed record."""

    def __contains__(self, item_id: object) -> bool:
        """Whether a record with this id is committed."""

    def commit(self, records: list[dict[str, Any]]) -> None:
        """Write ``records`` durably (returns after fsync)."""

    def drop(self, ids: set[str]) -> None:
        """Remove the records with these ids (atomically per file)."""

    def records(self) -> list[dict[str, Any]]:
        """Every committed record, in commit order."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it to ``path``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class JsonlStore:
    """Append-only JSON-lines store (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._ids: dict[str, str] = {}
        if self.path.exists():
            self._load()
        else:
            self.path.touch()
            _fsync_dir(self.path.parent)

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line: the process died while appending it
            logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run.", self.path,
                           len(data) - end)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self._ids[str(rec["id"])] = str(rec.get("status", "ok"))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InvalidInputError(
                    f"{str(self.path)!r} line {n} is not an mmfast batch record ({e}); pass another --out."
                ) from e

    def committed(self) -> dict[str, str]:
        return dict(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._ids

    def commit(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records).encode()
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._ids.update({str(r["id"]): r["status"] for r in records})

    def records(self) -> list[dict[str, Any]]:
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def drop(self, ids: set[str]) -> None:
        if not ids & self._ids.keys():
            return
        kept = [line for line in self.path.read_bytes().splitlines(keepends=True)
                if line.strip() and str(json.loads(line)["id"]) not in ids]
        _write_durably(self.path, b"".join(kept))
        for i in ids:
            self._ids.pop(i, None)


class ParquetStore:
    """A folder of Parquet part files, one per committed chunk (see the module docstring)."""

    PART = re.compile(r"part-(\d+)\.parquet$")

    def __init__(self, path: str | os.PathLike[str]):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ConfigError("Parquet output needs pyarrow: pip install pyarrow (or mmfast[dist]); or write .jsonl.") from e
        self.pa, self.pq = pa, pq
        self.schema = pa.schema([(f, pa.string()) for f in FIELDS])
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInputError(f"{str(self.path)!r} is a file; Parquet output is a folder of part files.")
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in self.path.glob(".part-*"):  # a killed run's unfinished part
            tmp.unlink()
        self._ids: dict[str, str] = {}
        for part in self._parts():
            table = pq.read_table(part, columns=["id", "status"])
            self._ids.update(zip(table.column("id").to_pylist(), table.column("status").to_pylist()))

    def _parts(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if self.PART.match(p.name))

    def committed(self) -> dict[str, str]:
        return dict(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._ids

    def _table(self, records: Iterable[dict[str, Any]]) -> Any:
        rows = []
        for r in records:
            row = {f: r.get(f) for f in FIELDS}
            for f in ("stats", "error"):
                row[f] = None if row[f] is None else json.dumps(row[f], default=str)
            rows.append(row)
        return self.pa.Table.from_pylist(rows, schema=self.schema)

    def _write(self, path: Path, table: Any) -> None:
        import io

        buf = io.BytesIO()
        self.pq.write_table(table, buf)
        _write_durably(path, buf.getvalue())

    def commit(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        parts = self._parts()
        seq = int(self.PART.match(parts[-1].name).group(1)) + 1 if parts else 0
        self._write(self.path / f"part-{seq:06d}.parquet", self._table(records))
        self._ids.update({str(r["id"]): r["status"] for r in records})

    def records(self) -> list[dict[str, Any]]:
        out = []
        for part in self._parts():
            for row in self.pq.read_table(part).to_pylist():
                for f in ("stats", "error"):
                    row[f] = None if row[f] is None else json.loads(row[f])
                out.append(row)
        return out

    def drop(self, ids: set[str]) -> None:
        if not ids & self._ids.keys():
            return
        for part in self._parts():
            table = self.pq.read_table(part)
            keep = [i not in ids for i in table.column("id").to_pylist()]
            if all(keep):
                continue
            if any(keep):
                self._write(part, table.filter(self.pa.array(keep)))
            else:
                part.unlink()
                _fsync_dir(self.path)
        for i in ids:
            self._ids.pop(i, None)


def open_store(out: str | os.PathLike[str], fmt: str | None = None) -> JsonlStore | ParquetStore:
    """The store for ``out``: ``fmt`` ``"jsonl"`` / ``"parquet"``, or from the suffix (``.parquet`` -> Parquet,
    anything else -> JSONL)."""
    fmt = fmt or ("parquet" if Path(out).suffix.lower() == ".parquet" else "jsonl")
    if fmt == "jsonl":
        return JsonlStore(out)
    if fmt == "parquet":
        return ParquetStore(out)
    raise ConfigError(f"Unknown output format {fmt!r}; use jsonl or parquet.")
