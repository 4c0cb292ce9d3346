"""The GPU suite (``mmfast bench gpu``) through its smoke path: tiny sizes on the CPU, Triton in its interpreter
(conftest sets ``TRITON_INTERPRET=1``), every section, the harness schema, the per-section result files."""

import json

import pytest
import torch

from mmfast.bench.gpu import AR_MODELS, KERNEL_OPS, _kernel_cases, markdown, transformers_compat
from mmfast.bench.harness import ROW_FIELDS, run
from mmfast.errors import ConfigError
from mmfast.kernels import GPU_VERIFIED, triton_available

pytestmark = pytest.mark.usefixtures("one_thread")


def test_real_sizes_and_full_mode_needs_cuda():
    cases = _kernel_cases(False, KERNEL_OPS)
    assert {op for op, _, _ in cases} == set(KERNEL_OPS) == set(GPU_VERIFIED)
    attn = [s for op, s, _ in cases if op == "packed_attention"]
    assert {(s["heads"], s["kv_heads"], s["dim"]) for s in attn} == {(32, 8, 128)}
    assert {s["length"] for s in attn} == {4096, 32768}
    assert {dt for op, _, dt in cases if op != "spec_verify"} == {torch.float16, torch.bfloat16}
    assert "GPT-B" in AR_MODELS and "GPT-L" in AR_MODELS
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="smoke"):
            run("gpu", repeats=1)
    with pytest.raises(ConfigError, match="unknown section"):
        run("gpu", repeats=1, smoke=True, sections="nope")


@pytest.mark.skipif(not triton_available(), reason="needs triton (the kernels run in its interpreter)")
def test_smoke_every_section_schema_and_files(tmp_path):
    """A reduced smoke (fewer methods; the full smoke is ``eval/gpu/run.sh --smoke``): rows of the harness schema
    for every section, kernels checked against their references in the interpreter, the files written per section."""
    out = tmp_path / "gpu"
    res = run(
        "gpu", repeats=3, json_path=tmp_path / "final.json", md_path=tmp_path / "final.md",
        smoke=True, out_dir=str(out), prefill_methods="pool(factor=2);fastv(keep=0.25)",
        kv_methods="kv_window(sink=4,recent=64)", ar_models="tiny", ar_methods="sjd()",
    )
    rows = res.rows
    for r in rows:
        assert set(ROW_FIELDS) <= set(r) and r["section"], r
    assert not [r for r in rows if r.get("error")]
    by = lambda s: [r for r in rows if r["section"] == s]  # noqa: E731

    kernels = by("kernels")
    assert {r["method"] for r in kernels} == set(KERNEL_OPS)
    assert all(r["ok"] is not False and r["torch_ms"] > 0 and r["triton_ms"] > 0 for r in kernels)
    assert {r["dtype"] for r in kernels} == {"float16", "float32"}  # bf16 dots are wrong in the interpreter
    summary = by("kernels-summary")
    assert [r["method"] for r in summary] == list(KERNEL_OPS)
    assert all(r["ok"] is True and r["flip"] is False and r["ran_on"].startswith("cpu") for r in summary)

    prefill = by("vlm-prefill")
    assert [(r["input"], r["method"]) for r in prefill] == [
        (i, m) for i in ("image", "video16") for m in ("baseline", "pool(factor=2)", "fastv(keep=0.25)")
    ]
    pool = next(r for r in prefill if r["method"] == "pool(factor=2)" and r["input"] == "image")
    assert pool["ideal_speedup"] > 2 and pool["visual_tokens"] < prefill[0]["visual_tokens"]
    kv = by("vlm-kv")
    assert {r["input"] for r in kv} == {"video16", "video64"}
    window = [r for r in kv if r["method"] != "baseline"]
    assert all(r["kv_ratio"] < 1 and r["decode_ms_per_token"] > 0 for r in window)
    video64 = next(r for r in kv if r["input"] == "video64" and r["method"] == "baseline")
    assert video64["visual_tokens"] > 3 * next(r for r in kv if r["input"] == "video16")["visual_tokens"]

    ar = by("ar-speed")
    assert [r["method"] for r in ar] == ["baseline", "sjd()"] and all(r["ar_model"] == "tiny" for r in ar)
    assert ar[0]["step_cost"] == 1.0 and ar[1]["steps"] < ar[0]["steps"] and "bfloat16" in ar[0]["model"]
    assert [r["method"] for r in by("timing")] == ["kernels", "vlm-prefill", "vlm-kv", "ar-speed"]

    # the harness' final files and the suite's own per-section files: one schema, provenance in meta
    final = json.loads((tmp_path / "final.json").read_text())
    own = json.loads((out / "gpu.json").read_text())
    for doc in (final, own):
        assert doc["suite"] == "gpu" and len(doc["rows"]) == len(rows)
        assert {"commit", "date", "device", "versions"} <= set(doc["meta"])
        assert {"torch", "transformers", "triton"} <= set(doc["meta"]["versions"])
    assert own["meta"]["partial"] is False and own["meta"]["smoke"] is True
    assert own["meta"]["sections_done"] == ["kernels", "vlm-prefill", "vlm-kv", "ar-speed"]
    md = (out / "gpu.md").read_text()
    assert md.startswith("# mmfast GPU suite (smoke") and md.index("### kernels") < md.index("### timing")
    assert markdown(rows, own["meta"]) == md


def test_transformers_compat_is_a_no_op_on_the_tested_version():
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) >= (5, 23):
        assert transformers_compat() == []
