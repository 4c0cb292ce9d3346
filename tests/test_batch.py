"""Batch jobs (mmfast.batch, `mmfast batch`): resume after SIGKILL with nothing lost or duplicated, bad inputs as
error records, --retry-errors, manifests / Parquet / datasets inputs, generate, batched VLM inference identical to
batch 1 on every family, and the Ray engine giving the same records as the local one."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmfast import batch
from mmfast.errors import ConfigError, InvalidInputError

pytestmark = pytest.mark.usefixtures("one_thread")

N_KILL = 200  # inputs of the kill test
TOKENS = 4  # answer length: keeps each record a few ms on the tiny random LLaVA


def _images(folder: Path, n: int, start: int = 0) -> list[Path]:
    from mmfast.train.tiny_models import make_test_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"{i // 50:02d}" / f"img{i:04d}.png"  # nested: ids are relative paths
        p.parent.mkdir(exist_ok=True)
        make_test_image(i, 32 + 4 * (i % 3)).save(p)
        paths.append(p)
    return paths


def _bad_inputs(folder: Path) -> dict[str, str]:
    """id -> what is wrong: corrupt, truncated, zero-byte, and a text file with an image extension."""
    from mmfast.train.tiny_models import make_test_image

    folder.mkdir(parents=True, exist_ok=True)
    make_test_image(99, 32).save(folder / "good.png")
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is text, not a JPEG")
    (folder / "readme.txt").write_text("not media: never discovered")
    return {"truncated.png": "truncated", "corrupt.jpg": "corrupt", "empty.png": "empty", "notes.jpg": "wrong ext"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def llava(vlm_dirs) -> str:
    return str(vlm_dirs["llava"])


# ---------------------------------------------------------------------------------------------- kill + resume


def test_sigkill_at_random_points_then_resume_loses_and_duplicates_nothing(tmp_path, llava):
    """>= 200 inputs; the CLI is SIGKILLed three times at random points after records start appearing; the
    resumed job then has exactly one record per input, with answers byte-identical to an uninterrupted run."""
    paths = _images(tmp_path / "imgs", N_KILL)
    ref = batch.run("caption", tmp_path / "imgs", tmp_path / "ref.jsonl", model=llava, max_new_tokens=TOKENS,
                    batch_size=2, progress=False)
    assert (ref.done, ref.errors) == (N_KILL, 0)
    expected = {r["id"]: r["answer"] for r in _lines(tmp_path / "ref.jsonl")}
    assert len(expected) == N_KILL and set(expected) == {p.relative_to(tmp_path / "imgs").as_posix() for p in paths}

    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "mmfast", "batch", "caption", str(tmp_path / "imgs"), "--out", str(out),
           "--model", llava, "--max-new-tokens", str(TOKENS), "-b", "2", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rng = random.Random(21)
    kills = 0
    for _ in range(3):
        before = out.stat().st_size if out.exists() else 0
        log = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 120
        while proc.poll() is None and (not out.exists() or out.stat().st_size <= before):
            assert time.monotonic() < deadline, "the batch job wrote no record"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        log.close()
    assert kills >= 2, (tmp_path / "stderr.txt").read_text()[-2000:]
    committed = out.read_bytes().count(b"\n")  # complete lines (a torn last one has no newline)
    assert 0 < committed < N_KILL  # killed mid-job, with work done

    resumed = batch.run("caption", tmp_path / "imgs", out, model=llava, max_new_tokens=TOKENS, batch_size=2,
                        progress=False)
    records = _lines(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == N_KILL  # exactly one record per input
    assert resumed.skipped + resumed.done == N_KILL and resumed.errors == 0
    assert {r["id"]: r["answer"] for r in records} == expected  # byte-identical answers
    assert all(r["status"] == "ok" for r in records)


def test_torn_last_line_is_cut_and_redone(tmp_path, llava):
    paths = _images(tmp_path / "imgs", 4)
    out = tmp_path / "out.jsonl"
    batch.run("caption", tmp_path / "imgs", out, model=llava, max_new_tokens=TOKENS, progress=False)
    full = out.read_bytes()
    lines = full.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # a SIGKILL inside the third append
    summary = batch.run("caption", tmp_path / "imgs", out, model=llava, max_new_tokens=TOKENS, progress=False)
    assert (summary.skipped, summary.done) == (2, 2)
    records = _lines(out)
    assert sorted(r["id"] for r in records) == sorted(p.relative_to(tmp_path / "imgs").as_posix() for p in paths)
    assert [r["answer"] for r in records] == [json.loads(line)["answer"] for line in lines]


# ---------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_become_error_records_and_retry_errors_redoes_only_them(tmp_path, llava):
    bad = _bad_inputs(tmp_path / "in")
    out = tmp_path / "caps.jsonl"
    summary = batch.run("caption", tmp_path / "in", out, model=llava, max_new_tokens=TOKENS, batch_size=4,
                        progress=False)
    records = {r["id"]: r for r in _lines(out)}
    assert set(records) == {"good.png", *bad}  # readme.txt is not media
    assert records["good.png"]["status"] == "ok" and records["good.png"]["answer"]
    for item_id in bad:
        rec = records[item_id]
        assert rec["status"] == "error" and rec["answer"] is None
        assert rec["error"]["type"] == "InvalidInputError" and item_id in rec["error"]["message"]
    assert (summary.done, summary.errors) == (1, 4) and summary.error_types == {"InvalidInputError": 4}
    assert "--retry-errors" in summary.format()

    # a plain rerun redoes nothing; --retry-errors redoes the error records only (one was repaired meanwhile)
    again = batch.run("caption", tmp_path / "in", out, model=llava, max_new_tokens=TOKENS, progress=False)
    assert (again.done, again.errors, again.skipped) == (0, 0, 5)
    (tmp_path / "in" / "empty.png").write_bytes((tmp_path / "in" / "good.png").read_bytes())
    retry = batch.run("caption", tmp_path / "in", out, model=llava, max_new_tokens=TOKENS, retry_errors=True,
                      progress=False)
    assert (retry.retried, retry.done, retry.errors, retry.skipped) == (4, 1, 3, 1)
    records = _lines(out)
    assert len(records) == 5 == len({r["id"] for r in records})
    fixed = next(r for r in records if r["id"] == "empty.png")
    assert fixed["status"] == "ok" and fixed["answer"] == next(r for r in records if r["id"] == "good.png")["answer"]


# ---------------------------------------------------------------------------------------------- inputs and outputs


def test_manifests_questions_and_ids(tmp_path, llava):
    _images(tmp_path / "imgs", 3)
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"path": "imgs/00/img0000.png", "question": "what shape?", "id": "a"},
        {"path": "imgs/00/img0001.png", "question": "what color?"},
        {"path": "imgs/00/img0001.png", "question": "where?"},
        {"path": "imgs/00/img0002.png"},  # no question: an error record in qa without --question
    ]) + "\n")
    out = tmp_path / "qa.jsonl"
    s = batch.run("qa", tmp_path / "q.jsonl", out, model=llava, max_new_tokens=TOKENS, batch_size=2, progress=False)
    recs = {r["id"]: r for r in _lines(out)}
    assert recs["a"]["question"] == "what shape?" and recs["a"]["status"] == "ok"
    two = [i for i in recs if i.startswith("imgs/00/img0001.png#")]
    assert len(two) == 2 and {recs[i]["question"] for i in two} == {"what color?", "where?"}
    assert recs["imgs/00/img0002.png"]["error"]["type"] == "InvalidInputError"
    assert (s.done, s.errors) == (3, 1)

    (tmp_path / "m.csv").write_text("path,id\nimgs/00/img0000.png,x\nimgs/00/img0002.png,y\n")
    s = batch.run("qa", tmp_path / "m.csv", tmp_path / "csv.jsonl", model=llava, question="what shape?",
                  max_new_tokens=TOKENS, progress=False)
    assert [r["id"] for r in _lines(tmp_path / "csv.jsonl")] == ["x", "y"] and s.done == 2
    # the same image + question gives the same answer whatever the manifest
    assert _lines(tmp_path / "csv.jsonl")[0]["answer"] == recs["a"]["answer"]

    (tmp_path / "dup.csv").write_text("path,id\nimgs/00/img0000.png,x\nimgs/00/img0001.png,x\n")
    with pytest.raises(InvalidInputError, match="'x'"):
        batch.run("qa", tmp_path / "dup.csv", tmp_path / "dup.jsonl", model=llava, question="q", progress=False)


def test_glob_input_and_parquet_output(tmp_path, llava):
    pq = pytest.importorskip("pyarrow.parquet")
    _images(tmp_path / "imgs", 60)
    out = tmp_path / "caps.parquet"
    s1 = batch.run("caption", str(tmp_path / "imgs" / "**" / "img000*.png"), out, model=llava, max_new_tokens=TOKENS,
                   batch_size=4, limit=6, progress=False)
    assert (s1.done, s1.pending) == (6, 4)
    s2 = batch.run("caption", str(tmp_path / "imgs" / "**" / "img000*.png"), out, model=llava, max_new_tokens=TOKENS,
                   batch_size=4, progress=False)
    assert (s2.skipped, s2.done) == (6, 4)
    table = pq.read_table(out).to_pylist()  # the folder reads as one table
    assert sorted(r["id"] for r in table) == [f"00/img000{i}.png" for i in range(10)]
    assert all(json.loads(r["stats"])["visual_tokens_in"] > 0 for r in table)
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary part left


def test_datasets_folder_input(tmp_path, llava):
    datasets = pytest.importorskip("datasets")
    from mmfast.train.tiny_models import make_test_image

    ds = datasets.Dataset.from_dict({"image": [make_test_image(i, 32) for i in range(3)], "question": ["a", "b", "c"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    s = batch.run("qa", tmp_path / "ds", tmp_path / "out.jsonl", model=llava, max_new_tokens=TOKENS, progress=False)
    recs = _lines(tmp_path / "out.jsonl")
    assert [r["id"] for r in recs] == ["0", "1", "2"] and [r["question"] for r in recs] == ["a", "b", "c"]
    assert s.done == 3


def test_accelerate_summary_reports_savings_vs_baseline(tmp_path):
    _images(tmp_path / "imgs", 2)
    base = batch.run("caption", tmp_path / "imgs", tmp_path / "b.jsonl", model="tiny-vlm", max_new_tokens=2,
                     progress=False)
    fast = batch.run("caption", tmp_path / "imgs", tmp_path / "f.jsonl", model="tiny-vlm", max_new_tokens=2,
                     accelerate="pool(factor=2)", progress=False)
    assert fast.visual_tokens_in == base.visual_tokens_in > fast.visual_tokens_kept > 0
    assert fast.kv_bytes_baseline == base.kv_bytes > fast.kv_bytes  # the baseline figure is what the baseline held
    assert "saved" in fast.format() and all(r["accelerate"] == "pool(factor=2)" for r in _lines(tmp_path / "f.jsonl"))


def test_generate_writes_images_and_resumes_deterministically(tmp_path):
    full = batch.run("generate", labels=[1, 7], n=2, out=tmp_path / "full.jsonl", progress=False)
    assert full.done == 4
    part = batch.run("generate", labels=[1, 7], n=2, out=tmp_path / "part.jsonl", limit=1, progress=False)
    rest = batch.run("generate", labels=[1, 7], n=2, out=tmp_path / "part.jsonl", progress=False)
    assert (part.done, rest.skipped, rest.done) == (1, 1, 3)
    a, b = _lines(tmp_path / "full.jsonl"), _lines(tmp_path / "part.jsonl")
    assert [r["id"] for r in a] == ["1/0", "1/1", "7/0", "7/1"] and sorted(r["id"] for r in b) == [r["id"] for r in a]
    for ra in a:  # each image depends on its id only, not on where a run stopped
        rb = next(r for r in b if r["id"] == ra["id"])
        assert (tmp_path / ra["answer"]).read_bytes() == (tmp_path / rb["answer"]).read_bytes()
    assert ra["answer"].startswith("full_images/")


def test_cli_batch_and_ray_install_hint(tmp_path, llava, monkeypatch):
    from typer.testing import CliRunner

    from mmfast.cli import app

    _bad_inputs(tmp_path / "in")
    res = CliRunner().invoke(app, ["batch", "caption", str(tmp_path / "in"), "--out", str(tmp_path / "o.jsonl"),
                                   "--model", llava, "--max-new-tokens", "2", "--json", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{\"task\""):])
    assert (summary["done"], summary["errors"]) == (1, 4)

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"pip install 'ray\[data\]'"):
        batch.run("caption", tmp_path / "in", tmp_path / "r.jsonl", engine="ray")


# ---------------------------------------------------------------------------------------------- batched inference


def test_batched_answers_equal_batch_one_on_every_family(vlm_pipes):
    """Left-padded batches (images of different sizes, so different prompt lengths) answer exactly as one at a
    time, with the same per-record token / KV figures, on every family; videos too where the family takes them."""
    from mmfast.train.tiny_models import make_test_image, make_test_video

    images = [make_test_image(i, (32 + 16 * (i % 3), 32 + 8 * (i % 2))) for i in range(5)]
    keys = ("visual_tokens_in", "visual_tokens_kept", "prompt_tokens", "kv_bytes", "kv_bytes_end", "new_tokens")
    for fam, (img, vid) in vlm_pipes.items():
        one = img(image=images, question="what is it?", max_new_tokens=6)
        many = img(image=images, question="what is it?", max_new_tokens=6, batch_size=4)
        assert [o["answer"] for o in many] == [o["answer"] for o in one], fam
        assert [[o["stats"][k] for k in keys] for o in many] == [[o["stats"][k] for k in keys] for o in one], fam
        assert [o["stats"].get("batch_size") for o in many] == [4, 4, 4, 4, None], fam
        if vid is not None:
            videos = [make_test_video(4, 32, seed=0), make_test_video(6, 32, seed=1)]
            one = vid(video=videos, question="what happens?", max_new_tokens=4, num_frames=4)
            many = vid(video=videos, question="what happens?", max_new_tokens=4, num_frames=4, batch_size=2)
            assert [o["answer"] for o in many] == [o["answer"] for o in one], fam


def test_methods_that_cannot_batch_fall_back_one_at_a_time(vlm_pipes, caplog):
    import mmfast
    from mmfast.train.tiny_models import make_test_image

    img = vlm_pipes["llava"][0]
    pipe = mmfast.pipeline("image-qa", model=(img.model, img.processor), accelerate="kv_window(sink=2,recent=8)")
    images = [make_test_image(i, 32) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        many = pipe(image=images, question="q", max_new_tokens=4, batch_size=3)
    assert "one prompt at a time" in caplog.text and "kv_window" in caplog.text
    assert [o["answer"] for o in many] == [o["answer"] for o in pipe(image=images, question="q", max_new_tokens=4)]
    vision = mmfast.pipeline("image-qa", model=(img.model, img.processor), accelerate="pool(factor=2)")
    many = vision(image=images, question="q", max_new_tokens=4, batch_size=3)  # vision methods batch
    assert [o["stats"]["batch_size"] for o in many] == [3, 3, 3]
    assert [o["answer"] for o in many] == [o["answer"] for o in vision(image=images, question="q", max_new_tokens=4)]


# ---------------------------------------------------------------------------------------------- Ray


@pytest.mark.ray
def test_ray_engine_with_two_workers_gives_the_local_records(tmp_path, llava):
    pytest.importorskip("ray.data")
    _images(tmp_path / "imgs", 12)
    _bad_inputs(tmp_path / "imgs" / "bad")
    kw = dict(model=llava, max_new_tokens=TOKENS, batch_size=2, progress=False)
    local = batch.run("caption", tmp_path / "imgs", tmp_path / "local.jsonl", **kw)
    ray_run = batch.run("caption", tmp_path / "imgs", tmp_path / "ray.jsonl", engine="ray", concurrency=2,
                        num_cpus=0.5, **kw)
    strip = [{k: v for k, v in r.items() if k != "stats"} for r in _lines(tmp_path / "local.jsonl")]
    got = [{k: v for k, v in r.items() if k != "stats"} for r in _lines(tmp_path / "ray.jsonl")]
    assert sorted(got, key=lambda r: r["id"]) == sorted(strip, key=lambda r: r["id"])
    assert (ray_run.done, ray_run.errors) == (local.done, local.errors) == (13, 4)
    again = batch.run("caption", tmp_path / "imgs", tmp_path / "ray.jsonl", engine="ray", concurrency=2,
                      num_cpus=0.5, **kw)  # resume: everything committed, Ray never started
    assert (again.skipped, again.done) == (17, 0)
    print(f"\nthroughput: local {local.records_per_s:.1f} rec/s, ray x2 {ray_run.records_per_s:.1f} rec/s")
