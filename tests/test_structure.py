"""The package's shape: no import cycle, methods free of model-family code, training out of the runtime path."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import mmfast
from mmfast.models.registry import ARGEN_ADAPTERS, VLM_ADAPTERS

PKG = Path(mmfast.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """mmfast modules imported anywhere in ``path`` (function-level imports too; ``if TYPE_CHECKING:`` blocks not)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def test_the_package_has_no_import_cycle():
    mods = _modules()
    graph = {name: _imports(path, name, set(mods)) for name, path in mods.items()}
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert "mmfast.types" in graph and graph["mmfast.types"] <= {"mmfast.errors"}  # the leaf


FAMILY_WORDS = {*VLM_ADAPTERS, *ARGEN_ADAPTERS, "qwen", "llava", "onevision", "siglip", "clip"}


def test_methods_contain_no_model_family_code():
    """No method imports an adapter module, names a family in code, or branches on ``adapter.family``
    (docstrings and messages may cite papers' models)."""
    family_modules = {v.split(":")[0] for v in (*VLM_ADAPTERS.values(), *ARGEN_ADAPTERS.values())}
    bad = []
    for path in sorted((PKG / "accel").glob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                bad += [f"{path.name}: imports {n}" for n in names if n in family_modules]
            elif isinstance(node, ast.Attribute) and node.attr == "family":
                bad.append(f"{path.name}:{node.lineno}: reads .family")
            elif isinstance(node, ast.Name) and node.id != "ClassVar" and any(w in node.id.lower() for w in FAMILY_WORDS):
                bad.append(f"{path.name}:{node.lineno}: {node.id}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value.lower() in FAMILY_WORDS:
                    bad.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not bad, bad


def test_method_files_stay_short():
    long = {p.name: n for p in (PKG / "accel").glob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long


def test_import_and_pipeline_never_import_training_code():
    code = (
        "import sys, mmfast\n"
        "assert not [m for m in sys.modules if m.startswith('mmfast.train')], 'import mmfast'\n"
        "mmfast.pipeline('image-qa')\n"
        "mmfast.pipeline('class-to-image', accelerate='sjd')\n"
        "mmfast.pipeline('video-qa', accelerate='turbo+lookm')\n"
        "print(sorted(m for m in sys.modules if m.startswith('mmfast.train')))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
