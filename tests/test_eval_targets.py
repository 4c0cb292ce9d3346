"""eval/targets.py reads bench JSON and reports PASS / MISS per target against the row's own baseline."""

import importlib.util
import json
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("targets", Path(__file__).parents[1] / "eval" / "targets.py")
targets = importlib.util.module_from_spec(spec)
sys.modules["targets"] = targets  # dataclasses look their module up
spec.loader.exec_module(targets)


def _rows(sjd_compression: float, sjd_speedup: float) -> dict:
    base = {"method": "baseline", "input": None, "steps": 65, "step_compression": 1.0, "speedup": 1.0}
    sjd = {"method": "sjd()", "input": None, "steps": 30, "step_compression": sjd_compression, "speedup": sjd_speedup}
    return {"suite": "ar-quality", "rows": [base, sjd]}


def test_pass_and_miss(tmp_path, capsys):
    (tmp_path / "ar-quality-jacobi.json").write_text(json.dumps(_rows(2.2, 2.0)))
    assert targets.main(["--results", str(tmp_path), "--strict"]) == 0
    out = capsys.readouterr().out
    assert "PASS SJD step compression >= 2.0: sjd() = 2.200" in out
    (tmp_path / "ar-quality-jacobi.json").write_text(json.dumps(_rows(1.8, 1.0)))
    assert targets.main(["--results", str(tmp_path), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "MISS SJD step compression" in out and "MISS wall-clock" in out
    assert targets.main(["--results", str(tmp_path)]) == 0  # report only


def test_zoo_eval_json_is_checked_per_modality(tmp_path, capsys):
    # the shape `mmfast zoo eval --json` writes: per-type accuracies + "overall" for each modality
    res = {"image": {"color": 0.9, "overall": 0.86}, "video": {"count": 0.8, "overall": 0.74}}
    (tmp_path / "tiny-vlm-heldout.json").write_text(json.dumps(res))
    assert targets.main(["--results", str(tmp_path), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "PASS tiny-vlm held-out image QA >= 85%: image = 0.860" in out
    assert "MISS tiny-vlm held-out video QA >= 75%: video = 0.740" in out
