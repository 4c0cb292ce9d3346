"""docs/methods/*.md are generated from eval/results (eval/method_pages.py): they must match the results."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_method_pages_are_current():
    spec = importlib.util.spec_from_file_location("method_pages", ROOT / "eval" / "method_pages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pages = mod.render_all()
    stale = [str(p.relative_to(ROOT)) for p, text in pages.items() if not p.is_file() or p.read_text() != text]
    assert not stale, f"regenerate with `python eval/method_pages.py`: {stale}"
    assert {p.stem for p in (ROOT / "docs" / "methods").glob("*.md")} == {p.stem for p in pages}  # no orphan page
