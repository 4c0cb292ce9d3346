"""Input discovery for batch jobs: what to run on, each with a stable id.

:func:`discover` turns one input spec into a list of :class:`Item` s, in a deterministic order:

* a **folder**: every image (and, for ``qa``, video) file below it, recursively, sorted; hidden files and
  folders (``.name``) are skipped; id = the path relative to the folder (``"cats/001.jpg"``);
* a **glob** (``"photos/**/*.jpg"``): the matching files, sorted; id = the path relative to the glob's fixed
  prefix (the folders before the first wildcard);
* a **manifest**, ``.jsonl`` / ``.csv`` / ``.parquet``: one row per item with ``path`` (relative paths are read
  relative to the manifest's folder), optional ``question`` and ``id``; for ``generate``: ``label`` or ``prompt``,
  optional ``id`` and ``seed``. Without an ``id`` column the id is the ``path`` as written, plus
  ``"#" + sha1(question)[:8]`` when the row carries its own question (one image, several questions);
* a **local ``datasets`` dataset** (a folder written by ``save_to_disk``; a ``DatasetDict``'s splits in name
  order): column ``image`` (or ``video`` / ``path``), optional ``question`` / ``id``; id = ``id``, else
  ``"{split}/{row}"`` (``"{row}"`` for a plain ``Dataset``);
* a single media file, or (Python API) a list of paths.

Ids must be unique: a duplicate raises :class:`~mmfast.errors.InvalidInputError` naming it. Discovery never opens
the media: a corrupt file is found here and becomes an error record when the job reaches it.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfast.errors import ConfigError, InvalidInputError
from mmfast.media import VIDEO_EXTENSIONS, probe_kind

#: file extensions a folder / glob discovery takes as images
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"})
MANIFEST_EXTENSIONS = (".jsonl", ".csv", ".parquet")
#: the tasks a batch job runs (``mmfast batch TASK``)
TASKS = ("caption", "qa", "generate")


@dataclass(frozen=True)
class Item:
    """One input of a batch job.

    id: stable key of its record (resume skips committed ids). source: the path, or for ``generate`` the
    condition as text (``"7"``, ``"digit 7"``); a dataset row's ``"<dataset dir>[split][row]"``. kind: ``"image"``,
    ``"video"`` or ``"condition"``. media: in-memory media (a dataset row's PIL image / bytes / frames), else None
    (read ``source``). question: the row's own question (qa). condition: the label (int) or prompt (str) of a
    ``generate`` item. seed: the row's own seed (``generate``), else None (derived from the id).
    """

    id: str
    source: str
    kind: str
    media: Any = None
    question: str | None = None
    condition: int | str | None = None
    seed: int | None = None


#: sidecar files a media folder often holds: never probed as media
SIDECAR_EXTENSIONS = frozenset({".json", ".jsonl", ".csv", ".txt", ".md", ".parquet", ".yaml", ".yml", ".py", ".log"})


def _kind(path: str | os.PathLike[str]) -> str | None:
    """The item kind by content (a video named ``.bin`` is a video, a PNG named ``.mp4`` an image), else by
    extension for files that cannot be read (their record then holds the loader's typed error); None when the file
    is neither (folder scans skip it)."""
    ext = Path(path).suffix.lower()
    if ext in SIDECAR_EXTENSIONS:
        return None
    kind = probe_kind(path)
    if kind is not None:
        return kind
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


def _wanted(task: str) -> tuple[str, ...]:
    return ("image", "video") if task == "qa" else ("image",)


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def discover(task: str, inputs: Any, labels: Sequence[int | str] | None = None, n: int = 1) -> list[Item]:
    """The items of a batch job, in a deterministic order (see the module docstring for the input kinds).

    Args:
        task: ``"caption"``, ``"qa"`` or ``"generate"``.
        inputs: a folder, glob, manifest, ``datasets`` folder or media file (str / Path), or a list of paths;
            for ``generate`` a manifest, or None with ``labels``.
        labels: ``generate`` conditions (class labels or prompts) instead of a manifest.
        n: ``generate``: images per condition (ids ``"{condition}/{k}"``).
    """
    if task not in TASKS:
        raise ConfigError(f"Unknown batch task {task!r}; choose one of {', '.join(TASKS)}.")
    if task == "generate":
        items = _conditions(inputs, labels, n)
    elif inputs is None:
        raise InvalidInputError("No input: pass a folder, a glob, a manifest (.jsonl / .csv / .parquet) or a dataset.")
    elif isinstance(inputs, (list, tuple)):
        items = [_file_item(p, str(p)) for p in inputs]
    else:
        items = _from_spec(task, os.fspath(inputs))
    _check_unique(items)
    return items


def _file_item(path: Any, item_id: str, question: str | None = None) -> Item:
    text = os.fspath(path)
    return Item(id=item_id, source=text, kind=_kind(text) or "image", question=question)


def _from_spec(task: str, spec: str) -> list[Item]:
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        return _manifest(path)
    if _is_dataset_dir(path):
        return _dataset(path)
    if path.is_dir():
        files = (p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        return _files(task, files, path)
    if glob.has_magic(spec):
        root = Path(*[part for part in Path(spec).parts[: _first_magic(Path(spec).parts)]] or ["."])
        files = (Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        items = _files(task, files, root.expanduser())
        if not items:
            raise InvalidInputError(f"The glob {spec!r} matches no {' or '.join(_wanted(task))} file.")
        return items
    if path.is_file():
        return [_file_item(path, path.name)]
    raise InvalidInputError(
        f"Input {spec!r} does not exist; pass a folder, a glob, a manifest (.jsonl / .csv / .parquet) or a "
        "datasets folder (save_to_disk)."
    )


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _first_magic(parts: Sequence[str]) -> int:
    return next(i for i, part in enumerate(parts) if glob.has_magic(part))


def _files(task: str, files: Iterable[Path], root: Path) -> list[Item]:
    wanted = _wanted(task)
    out = []
    for p in sorted(files):
        kind = _kind(p)
        if kind in wanted:
            try:
                rel = p.relative_to(root).as_posix()
            except ValueError:
                rel = p.as_posix()
            out.append(Item(id=rel, source=str(p), kind=kind))
    if not out and root.is_dir():
        raise InvalidInputError(f"{str(root)!r} holds no {' or '.join(wanted)} files (searched recursively).")
    return out


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` / ``.csv`` / ``.parquet`` manifest as dicts (Parquet needs ``pyarrow``)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InvalidInputError(f"{str(path)!r} line {n} is not JSON: {e}.") from e
                    if not isinstance(row, dict):
                        raise InvalidInputError(f"{str(path)!r} line {n} is not a JSON object.")
                    rows.append(row)
        return rows
    if ext == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [{k: v for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(f)]
    if ext == ".parquet":
        pq = _pyarrow_parquet("read a Parquet manifest")
        return pq.read_table(path).to_pylist()
    raise InvalidInputError(f"{str(path)!r}: a manifest is .jsonl, .csv or .parquet.")


def _pyarrow_parquet(what: str) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError(f"To {what}, install pyarrow: pip install pyarrow (or mmfast[dist]).") from e
    return pq


def _question_suffix(question: str) -> str:
    return "#" + hashlib.sha1(question.encode()).hexdigest()[:8]


def _manifest(path: Path) -> list[Item]:
    items = []
    for n, row in enumerate(read_manifest(path), 1):
        src = row.get("path")
        if not isinstance(src, str) or not src:
            raise InvalidInputError(f"{str(path)!r} row {n} has no 'path'; a manifest row is {{'path', 'question', 'id'}}.")
        question = row.get("question")
        question = str(question) if question not in (None, "") else None
        item_id = row.get("id")
        if item_id in (None, ""):
            item_id = src + (_question_suffix(question) if question else "")
        full = Path(src).expanduser()
        full = full if full.is_absolute() else path.parent / full
        items.append(Item(id=str(item_id), source=str(full), kind=_kind(full) or "image", question=question))
    if not items:
        raise InvalidInputError(f"The manifest {str(path)!r} has no rows.")
    return items


def _dataset(path: Path) -> list[Item]:
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"{str(path)!r} is a datasets folder: install datasets to read it (pip install datasets).") from e
    loaded = datasets.load_from_disk(str(path))
    splits = sorted(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    items = []
    for split, ds in splits:
        column = next((c for c in ("image", "video", "path") if c in ds.column_names), None)
        if column is None:
            raise InvalidInputError(f"The dataset {str(path)!r} has no 'image', 'video' or 'path' column.")
        for i, row in enumerate(ds):
            key = row.get("id")
            item_id = str(key) if key not in (None, "") else (f"{split}/{i}" if split else str(i))
            value = row[column]
            where = f"{path}[{split}][{i}]" if split else f"{path}[{i}]"
            question = row.get("question") or None
            if column == "path":
                items.append(Item(id=item_id, source=str(value), kind=_kind(value) or "image", question=question))
            else:
                items.append(Item(id=item_id, source=where, kind=column, media=value, question=question))
    return items


def _conditions(inputs: Any, labels: Sequence[int | str] | None, n: int) -> list[Item]:
    if not isinstance(n, int) or n < 1:
        raise InvalidInputError("n (images per condition) must be a positive integer.")
    rows: list[dict[str, Any]]
    if labels is not None:
        if inputs is not None:
            raise InvalidInputError("generate: pass a manifest or labels, not both.")
        rows = [{"label" if isinstance(c, int) else "prompt": c} for c in labels]
    elif inputs is not None:
        path = Path(os.fspath(inputs))
        if not (path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS):
            raise InvalidInputError(f"generate reads a manifest (.jsonl / .csv / .parquet) with 'label' or 'prompt'; got {str(path)!r}.")
        rows = read_manifest(path)
    else:
        raise InvalidInputError("generate: pass --labels 0,1,2 or a manifest with a 'label' or 'prompt' column.")
    items = []
    for i, row in enumerate(rows, 1):
        cond: Any = row.get("label", row.get("prompt"))
        if cond in (None, ""):
            raise InvalidInputError(f"generate row {i} has no 'label' or 'prompt'.")
        if "label" in row and isinstance(cond, str) and cond.strip().lstrip("-").isdigit():
            cond = int(cond)  # CSV cells are text
        seed = row.get("seed")
        seed = int(seed) if seed not in (None, "") else None
        base = row.get("id")
        for k in range(n):
            item_id = f"{cond}/{k}" if base in (None, "") else (str(base) if n == 1 else f"{base}/{k}")
            items.append(Item(id=item_id, source=str(cond), kind="condition", condition=cond,
                              seed=None if seed is None else seed + k))
    return items


def _check_unique(items: list[Item]) -> None:
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise InvalidInputError(
                f"Two inputs have the id {it.id!r}; ids key the records, so each must be unique (give the manifest "
                "an 'id' column)."
            )
        seen.add(it.id)
