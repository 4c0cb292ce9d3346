"""Fuzzing every public entry point with bad input: each case must end in an ``MMFastError`` subclass (``gr.Error`` in
the app's handlers) whose message says what to do, or in a documented behaviour checked here. The CLI prints one line
and exits 2. The last test reports the counts (cases, typed errors, documented behaviours, untyped escapes: must be
0); ``MMFAST_FUZZ_REPORT=path.json`` also writes them (``python eval/fuzz_report.py``).

Catalogue: media (missing, zero-byte, truncated, wrong type, tiny, huge, odd modes, still-as-video, video-as-image,
huge frame counts / fps), text (empty, huge, non-UTF-8, control characters), generation kwargs (zero, negative, wrong
type), specs (unknown, malformed, out of range), paths (missing, unwritable), plus property-based cases (hypothesis).
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import mmfast
from mmfast.errors import MMFastError

pytestmark = pytest.mark.usefixtures("one_thread")

REPORT: Counter = Counter()
ESCAPES: list[str] = []


def _typed(e: BaseException) -> bool:
    if isinstance(e, MMFastError):
        return True
    gr = sys.modules.get("gradio")
    return gr is not None and isinstance(e, gr.Error)


def run_case(entry: str, name: str, fn: Callable[[], Any], check: Callable[[Any], bool] | None = None,
             either: bool = False) -> str:
    """Run one case: ``check`` None means a typed error is expected; else success with ``check(result)`` true;
    ``either``: a typed error or such a success (property-based cases over valid and invalid inputs)."""
    REPORT["cases"] += 1
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - classifying is the point
        if _typed(e):
            msg = str(e)
            assert len(msg) > 15, f"{entry}/{name}: a typed error with a thin message: {msg!r}"
            REPORT["typed"] += 1
            if check is not None and not either:
                ESCAPES.append(f"{entry}/{name}: documented behaviour expected, got {type(e).__name__}: {msg}")
            return "typed"
        REPORT["escapes"] += 1
        ESCAPES.append(f"{entry}/{name}: {type(e).__name__}: {str(e)[:200]}")
        return "escape"
    if check is None:
        ESCAPES.append(f"{entry}/{name}: accepted silently (expected a typed error), got {str(result)[:120]}")
        REPORT["silent"] += 1
        return "silent"
    if not check(result):
        ESCAPES.append(f"{entry}/{name}: documented behaviour not met: {str(result)[:200]}")
        REPORT["silent"] += 1
        return "silent"
    REPORT["documented"] += 1
    return "documented"


def _all(entry: str, cases: list[tuple]) -> None:
    before = len(ESCAPES)
    for case in cases:
        run_case(entry, *case)
    assert ESCAPES[before:] == [], "\n".join(ESCAPES[before:])


# ---- media files ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    import av

    d = tmp_path_factory.mktemp("fuzz")
    out: dict[str, str] = {}

    def save(name: str, im: Image.Image, **kw: Any) -> None:
        im.save(d / name, **kw)
        out[name] = str(d / name)

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    save("ok.png", photo)
    save("tiny.png", Image.new("RGB", (1, 1), "red"))
    save("2x5.png", Image.new("RGB", (2, 5), "red"))
    save("wide.png", Image.new("L", (17_000, 1)))
    save("cmyk.jpg", photo.convert("CMYK"))
    save("i16.png", Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)))
    pal = photo.convert("P")
    pal.info["transparency"] = 0
    save("palette.png", pal)
    save("la.png", photo.convert("LA"))
    save("bw.png", photo.convert("1"))
    frames = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    out["anim.gif"] = str(d / "anim.gif")
    (d / "empty.png").write_bytes(b"")
    out["empty.png"] = str(d / "empty.png")
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    (d / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["cut.png"] = str(d / "cut.png")
    (d / "text.png").write_text("this is not an image\n")
    out["text.png"] = str(d / "text.png")
    (d / "folder").mkdir()
    out["folder"] = str(d / "folder")
    video = d / "clip.mp4"
    with av.open(str(video), "w") as f:
        st = f.add_stream("mpeg4", rate=8)
        st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
        for i in range(16):
            arr = np.full((48, 64, 3), i * 12, np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                f.mux(pkt)
        for pkt in st.encode():
            f.mux(pkt)
    out["clip.mp4"] = str(video)
    (d / "clip.bin").write_bytes(video.read_bytes())
    out["clip.bin"] = str(d / "clip.bin")
    (d / "cut.mp4").write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    out["cut.mp4"] = str(d / "cut.mp4")
    small = d / "small.mp4"
    with av.open(str(small), "w") as f:
        st = f.add_stream("mpeg4", rate=8)
        st.width, st.height, st.pix_fmt = 2, 2, "yuv420p"
        for _ in range(4):
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.zeros((2, 2, 3), np.uint8), format="rgb24")):
                f.mux(pkt)
        for pkt in st.encode():
            f.mux(pkt)
    out["small.mp4"] = str(small)
    out["missing"] = str(d / "nope.png")
    return out


def _answer(r: Any) -> bool:
    return isinstance(r, dict) and isinstance(r.get("answer"), str) and "empty_answer" in r["stats"]


# ---- pipeline(...) ----------------------------------------------------------------------------------------------
def test_fuzz_pipeline_factory(vlm_dirs):
    llava = str(vlm_dirs["llava"])
    from mmfast.train.toy import ToyARAdapter

    toy = ToyARAdapter(vocab=8, grid=(4, 4))
    cases = [
        ("unknown task", lambda: mmfast.pipeline("image-to-banana", model=llava)),
        ("task not a str", lambda: mmfast.pipeline(42, model=llava)),
        ("missing model dir", lambda: mmfast.pipeline("image-qa", model="/nonexistent/model")),
        ("hub id offline", lambda: mmfast.pipeline("image-qa", model="nobody/never-was-a-model")),
        ("model of wrong type", lambda: mmfast.pipeline("image-qa", model=3.5)),
        ("generator as VLM", lambda: mmfast.pipeline("image-qa", model=toy)),
        ("VLM as generator", lambda: mmfast.pipeline("class-to-image", model=llava)),
        ("unknown method", lambda: mmfast.pipeline("image-qa", model=llava, accelerate="nosuch()")),
        ("malformed spec", lambda: mmfast.pipeline("image-qa", model=llava, accelerate="pool(factor=")),
        ("dangling +", lambda: mmfast.pipeline("image-qa", model=llava, accelerate="pool(factor=2)+")),
        ("code in spec", lambda: mmfast.pipeline("image-qa", model=llava, accelerate="pool(factor=__import__('os'))")),
        ("unknown param", lambda: mmfast.pipeline("image-qa", model=llava, accelerate="pool(size=2)")),
        ("factor 0", lambda: mmfast.pipeline("image-qa", model=llava, accelerate="pool(factor=0)")),
        ("keep > 1", lambda: mmfast.pipeline("image-qa", model=llava, accelerate="turbo(keep=1.5)")),
        ("keep < 0", lambda: mmfast.pipeline("image-qa", model=llava, accelerate="random(keep=-0.1)")),
        ("keep a str", lambda: mmfast.pipeline("image-qa", model=llava, accelerate="random(keep='half')")),
        ("spec an int", lambda: mmfast.pipeline("image-qa", model=llava, accelerate=7)),
        ("AR method on a VLM", lambda: mmfast.pipeline("image-qa", model=llava, accelerate="sjd(window=4)")),
        ("VLM method on AR", lambda: mmfast.pipeline("class-to-image", model=toy, accelerate="pool(factor=2)")),
        ("sjd window 0", lambda: mmfast.pipeline("class-to-image", model=toy, accelerate="sjd(window=0)")),
        ("CoDe on raster", lambda: mmfast.pipeline("class-to-image", model=toy, accelerate="code(draft_scales=2)")),
        ("bad device", lambda: mmfast.pipeline("image-qa", model=llava, device="tpu:9")),
        ("bad dtype", lambda: mmfast.pipeline("image-qa", model=llava, dtype="float13")),
        ("videoscan on image-qa", lambda: mmfast.pipeline("image-qa", model=llava, accelerate="videoscan()")),
    ]
    _all("pipeline()", cases)


# ---- image-qa / image-caption ------------------------------------------------------------------------------------
def test_fuzz_image_qa(vlm_pipes, media):
    pipe = vlm_pipes["llava"][0]
    cap = mmfast.pipeline("image-caption", model=(pipe.model, pipe.processor))
    q = "what is this?"

    def ask(image: Any = media["ok.png"], question: Any = q, **kw: Any) -> Callable[[], Any]:
        return lambda: pipe(image=image, question=question, **{"max_new_tokens": 2, **kw})

    arr = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    cases = [
        ("missing file", ask(media["missing"])),
        ("zero-byte file", ask(media["empty.png"])),
        ("truncated png", ask(media["cut.png"])),
        ("text named .png", ask(media["text.png"])),
        ("a folder", ask(media["folder"])),
        ("a video as image", ask(media["clip.mp4"])),
        ("1x1 image", ask(media["tiny.png"])),
        ("2x5 image (< patch)", ask(media["2x5.png"])),
        ("17000 px side", ask(media["wide.png"])),
        ("url", ask("https://example.com/cat.png")),
        ("empty bytes", ask(b"")),
        ("random bytes", ask(bytes(range(256)) * 4)),
        ("None image", ask(None)),
        ("dict image", ask({"path": media["ok.png"]})),
        ("5-d array", ask(np.zeros((1, 1, 4, 4, 3), np.uint8))),
        ("float array > 1", ask(arr.astype(np.float32))),
        ("NaN array", ask(np.full((40, 40, 3), np.nan, np.float32))),
        ("complex array", ask(arr.astype(np.complex64))),
        ("2 channels", ask(np.zeros((40, 40, 2), np.uint8))),
        ("empty question", ask(question="")),
        ("blank question", ask(question="   \n")),
        ("None question", ask(question=None)),
        ("int question", ask(question=42)),
        ("non-UTF-8 bytes question", ask(question=b"\xff\xfe what")),
        ("lone surrogate question", ask(question="what \udcff is this")),
        ("20,000-char question", ask(question="what color is the star? " * 850)),
        ("max_new_tokens 0", ask(max_new_tokens=0)),
        ("max_new_tokens -5", ask(max_new_tokens=-5)),
        ("max_new_tokens str", ask(max_new_tokens="8")),
        ("max_new_tokens float", ask(max_new_tokens=1.5)),
        ("max_new_tokens bool", ask(max_new_tokens=True)),
        ("min > max", ask(max_new_tokens=2, min_new_tokens=5)),
        ("batch_size 0", lambda: pipe([{"image": media["ok.png"], "question": q}], batch_size=0, max_new_tokens=2)),
        ("list of non-dicts", lambda: pipe([media["ok.png"], 3], question=q, max_new_tokens=2)),
        ("questions != images", lambda: pipe(image=[media["ok.png"]] * 2, question=[q] * 3, max_new_tokens=2)),
        ("caption of a truncated png", lambda: cap(image=media["cut.png"], max_new_tokens=2)),
        ("caption max_new_tokens 0", lambda: cap(image=media["ok.png"], max_new_tokens=0)),
    ]
    documented = [
        ("CMYK jpeg -> RGB", ask(media["cmyk.jpg"]), _answer),
        ("16-bit grey -> RGB", ask(media["i16.png"]), _answer),
        ("palette + transparency -> RGB on white", ask(media["palette.png"]), _answer),
        ("grey + alpha -> RGB", ask(media["la.png"]), _answer),
        ("1-bit -> RGB", ask(media["bw.png"]), _answer),
        ("animated gif -> its first frame", ask(media["anim.gif"]), _answer),
        ("control characters kept", ask(question="what\x00 is\x07 this\x1b?"), _answer),
        ("emoji question", ask(question="what is this 🐈?"), _answer),
        ("bytes UTF-8 question decoded", ask(question=b"what is this?"), _answer),
        ("answers flag empty ones", ask(), lambda r: isinstance(r["stats"]["empty_answer"], bool)),
    ]
    _all("image-qa", cases + documented)


# ---- video-qa -----------------------------------------------------------------------------------------------------
def test_fuzz_video_qa(vlm_pipes, media):
    pipe = vlm_pipes["llava_onevision"][1]
    q = "what happens?"

    def ask(video: Any = media["clip.mp4"], **kw: Any) -> Callable[[], Any]:
        return lambda: pipe(video=video, question=q, **{"max_new_tokens": 2, "num_frames": 4, **kw})

    frames = np.zeros((4, 32, 32, 3), np.uint8)
    cases = [
        ("missing file", ask(media["missing"])),
        ("zero-byte file", ask(media["empty.png"])),
        ("truncated mp4", ask(media["cut.mp4"])),
        ("text file", ask(media["text.png"])),
        ("still png as video", ask(media["ok.png"])),
        ("2x2 frames (< patch)", ask(media["small.mp4"])),
        ("num_frames 0", ask(num_frames=0)),
        ("num_frames -1", ask(num_frames=-1)),
        ("num_frames str", ask(num_frames="4")),
        ("num_frames 10**9", ask(num_frames=10**9)),
        ("fps 0", ask(num_frames=None, fps=0)),
        ("fps -2", ask(num_frames=None, fps=-2.0)),
        ("fps and num_frames", ask(fps=1.0)),
        ("empty frame list", ask([])),
        ("zero-frame array", ask(np.zeros((0, 32, 32, 3), np.uint8))),
        ("frames of two sizes", ask([np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)])),
        ("3-d array", ask(np.zeros((32, 32, 3), np.uint8))),
        ("max_new_tokens 0", ask(max_new_tokens=0)),
        ("url", ask("http://example.com/v.mp4")),
        ("int video", ask(5)),
    ]
    documented = [
        ("a video named .bin", ask(media["clip.bin"]), _answer),
        ("animated gif", ask(media["anim.gif"], num_frames=2), _answer),
        ("fps 1000 -> every frame, fps_sampled says so", ask(num_frames=None, fps=1000.0),
         lambda r: _answer(r) and r["stats"]["frames"] == 16 and r["stats"]["fps_sampled"] == 8.0),
        ("fps with max_frames -> capped and flagged", ask(num_frames=None, fps=8.0, max_frames=5),
         lambda r: _answer(r) and r["stats"]["frames"] == 5 and r["stats"]["frames_capped"]),
        ("frames given as an array", ask(frames, num_frames=2), _answer),
    ]
    _all("video-qa", cases + documented)


# ---- streaming-video-qa ------------------------------------------------------------------------------------------
def test_fuzz_streaming(vlm_pipes, media):
    img = vlm_pipes["llava_onevision"][0]
    s = mmfast.pipeline("streaming-video-qa", model=(img.model, img.processor))
    frame = np.zeros((32, 32, 3), np.uint8)
    cases = [
        ("ask before any frame", lambda: s.ask("what?")),
        ("push None", lambda: s.push(None)),
        ("push []", lambda: s.push([])),
        ("push a 2x2 frame", lambda: s.push(np.zeros((2, 2, 3), np.uint8))),
        ("push a 4-channel 5-d array", lambda: s.push(np.zeros((1, 1, 8, 8, 4), np.uint8))),
        ("push a string that is no file", lambda: s.push("/nope.png")),
        ("feed a missing file", lambda: s.feed(media["missing"])),
        ("feed a truncated mp4", lambda: s.feed(media["cut.mp4"])),
        ("feed fps 0", lambda: s.feed(media["clip.mp4"], fps=0)),
        ("unknown strategy", lambda: mmfast.pipeline("streaming-video-qa", model=(img.model, img.processor),
                                                       strategy="magic")),
    ]
    documented = [("push a frame", lambda: s.push(frame), lambda st: st["frames_seen"] >= 1)]
    more = [
        ("empty question", lambda: s.ask("")),
        ("non-UTF-8 question", lambda: s.ask("what \udcff")),
        ("max_new_tokens 0", lambda: s.ask("what?", max_new_tokens=0)),
        ("huge question", lambda: s.ask("what color is the star? " * 900)),
        ("frame of another size", lambda: s.push(np.zeros((16, 16, 3), np.uint8))),
    ]
    documented2 = [("ask mid-stream", lambda: s.ask("what?", max_new_tokens=2), _answer)]
    _all("streaming-video-qa", cases + documented + more + documented2)


# ---- class-to-image / text-to-image ------------------------------------------------------------------------------
def test_fuzz_generation():
    from mmfast.train.toy import ToyARAdapter

    gen = mmfast.pipeline("class-to-image", model=ToyARAdapter(vocab=8, grid=(4, 4)))

    def g(conds: Any = (0, 1), **kw: Any) -> Callable[[], Any]:
        return lambda: gen(list(conds) if isinstance(conds, tuple) else conds, progress=False, **kw)

    cases = [
        ("no condition", g([])),
        ("None", g(None)),
        ("label out of range", g((99,))),
        ("negative label", g((-1,))),
        ("label a float", g((1.5,))),
        ("prompt for a class model", g(("a cat",))),
        ("num_images 0", g(num_images_per_condition=0)),
        ("num_images str", g(num_images_per_condition="2")),
        ("seed str", g(seed="x")),
        ("guidance -1", g(guidance_scale=-1.0)),
        ("temperature -1", g(temperature=-1.0)),
        ("top_k -3", g(top_k=-3)),
        ("top_p 0", g(top_p=0.0)),
        ("top_p 1.5", g(top_p=1.5)),
        ("batch_size 0", g(batch_size=0)),
        ("output_type jpeg", g(output_type="jpeg")),
    ]
    documented = [("labels as a tuple of ints", g((0, 1)), lambda r: len(r.images) == 2),
                  ("temperature 0 = greedy", g(temperature=0.0), lambda r: len(r.images) == 2),
                  ("top_k 0 = off", g(top_k=0), lambda r: len(r.images) == 2)]
    _all("class-to-image", cases + documented)


# ---- the CLI -------------------------------------------------------------------------------------------------------
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from mmfast import cli

    old = sys.argv
    sys.argv = ["mmfast", *argv]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def test_fuzz_cli(vlm_dirs, media, tmp_path, capsys):
    llava = str(vlm_dirs["llava"])
    ob = str(vlm_dirs["llava_onevision"])
    argvs = {
        "ask missing file": ["ask", media["missing"], "q", "-m", llava],
        "ask truncated png": ["ask", media["cut.png"], "q", "-m", llava],
        "ask 1x1 image": ["ask", media["tiny.png"], "q", "-m", llava],
        "ask max-new-tokens 0": ["ask", media["ok.png"], "q", "-m", llava, "--max-new-tokens", "0"],
        "ask max-new-tokens -5": ["ask", media["ok.png"], "q", "-m", llava, "--max-new-tokens", "-5"],
        "ask max-new-tokens abc": ["ask", media["ok.png"], "q", "-m", llava, "--max-new-tokens", "abc"],
        "ask bad spec": ["ask", media["ok.png"], "q", "-m", llava, "-a", "pool(factor="],
        "ask unknown method": ["ask", media["ok.png"], "q", "-m", llava, "-a", "warp(speed=9)"],
        "ask missing model": ["ask", media["ok.png"], "q", "-m", "/no/such/model"],
        "ask still png as a video with --fps": ["ask", media["ok.png"], "q", "-m", ob, "--fps", "0"],
        "ask video fps 0": ["ask", media["clip.bin"], "q", "-m", ob, "--fps", "0"],
        "ask empty question": ["ask", media["ok.png"], "", "-m", llava],
        "ask non-UTF-8 question": ["ask", media["ok.png"], "what \udcff", "-m", llava],
        "ask no arguments": ["ask"],
        "unknown command": ["frobnicate"],
        "unknown option": ["ask", media["ok.png"], "q", "--frob"],
        "generate to an unwritable path": ["generate", "--labels", "0", "--out", "/proc/nope/g.png"],
        "generate labels not ints": ["generate", "--labels", "a,b", "--out", str(tmp_path / "g.png")],
        "generate neither labels nor prompt": ["generate", "--out", str(tmp_path / "g.png")],
        "caption a missing file": ["caption", media["missing"], "-m", llava],
        "caption max-new-tokens 0": ["caption", media["ok.png"], "-m", llava, "--max-new-tokens", "0"],
        "zoo eval unknown model": ["zoo", "eval", "no-such-model"],
        "app port not a number": ["app", "--port", "abc"],
        "bench repeats 0": ["bench", "vlm-speed", "--repeats", "0"],
        "batch generate n 0": ["batch", "generate", "--labels", "1", "--n", "0", "--out", str(tmp_path / "g.jsonl")],
        "bench unknown suite": ["bench", "no-such-suite"],
        "bench malformed --opt": ["bench", "vlm-speed", "--opt", "novalue"],
        "zoo train unknown": ["zoo", "train", "no-such-model"],
        "batch caption missing input": ["batch", "caption", str(tmp_path / "none"), "--out", str(tmp_path / "o.jsonl")],
        "batch qa unknown engine": ["batch", "qa", media["folder"], "--out", str(tmp_path / "o.jsonl"),
                                    "--engine", "spark", "--question", "q"],
        "batch generate both": ["batch", "generate", "--labels", "1", "--prompt", "x", "--out",
                                str(tmp_path / "o.jsonl")],
    }
    before = len(ESCAPES)
    for name, argv in argvs.items():
        REPORT["cases"] += 1
        code, err = _cli(argv, capsys)
        lines = [ln for ln in err.splitlines() if ln.strip() and "Loading weights" not in ln]  # transformers' bar
        if code == 2 and len(lines) == 1 and lines[0].startswith("error:") and len(lines[0]) > 20:
            REPORT["typed"] += 1
        else:
            REPORT["escapes"] += 1
            ESCAPES.append(f"cli/{name}: exit {code}, stderr {err[-300:]!r}")
    REPORT["cases"] += 1  # documented: a video named .bin is read as a video, the answer printed, exit 0
    code, err = _cli(["ask", media["clip.bin"], "what happens?", "-m", ob, "--max-new-tokens", "2",
                      "--num-frames", "4"], capsys)
    if code == 0:
        REPORT["documented"] += 1
    else:
        REPORT["escapes"] += 1
        ESCAPES.append(f"cli/ask a video named .bin: exit {code}: {err[-300:]}")
    assert ESCAPES[before:] == [], "\n".join(ESCAPES[before:])


# ---- the batch runner -----------------------------------------------------------------------------------------
def test_fuzz_batch(vlm_dirs, media, tmp_path):
    from mmfast.batch import run

    llava = str(vlm_dirs["llava"])
    out = tmp_path / "o.jsonl"
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text('{"path": "a.png"}\n{not json\n')
    no_path = tmp_path / "nopath.jsonl"
    no_path.write_text('{"id": "x"}\n')
    folder = tmp_path / "mixed"
    folder.mkdir()
    for k in ("ok.png", "cut.png", "clip.bin", "text.png", "tiny.png"):
        (folder / k).write_bytes(Path(media[k]).read_bytes())

    def records() -> list[dict]:
        return [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]

    cases = [
        ("unknown task", lambda: run("translate", media["folder"], out, model=llava, progress=False)),
        ("missing input", lambda: run("caption", str(tmp_path / "none"), out, model=llava, progress=False)),
        ("empty folder", lambda: run("caption", media["folder"], out, model=llava, progress=False)),
        ("malformed manifest", lambda: run("caption", str(bad_manifest), out, model=llava, progress=False)),
        ("manifest without path", lambda: run("caption", str(no_path), out, model=llava, progress=False)),
        ("unknown engine", lambda: run("caption", str(folder), out, model=llava, engine="spark", progress=False)),
        ("unknown format", lambda: run("caption", str(folder), out, model=llava, fmt="xml", progress=False)),
        ("batch_size 0", lambda: run("caption", str(folder), out, model=llava, batch_size=0, progress=False)),
        ("concurrency 0", lambda: run("caption", str(folder), out, model=llava, concurrency=0, progress=False)),
        ("max_new_tokens 0", lambda: run("qa", str(folder), out, model=llava, question="q", max_new_tokens=0,
                                         progress=False)),
        ("unwritable out", lambda: run("caption", str(folder), "/proc/nope/o.jsonl", model=llava, progress=False)),
        ("qa without a question", lambda: run("qa", str(folder), out, model=llava, progress=False)),
        ("generate without conditions", lambda: run("generate", None, out, progress=False)),
    ]
    ob = str(vlm_dirs["llava_onevision"])
    documented = [
        # bad files (a text file named .png too) become error records: nothing is lost; the video named .bin is
        # routed to video-qa by content
        ("mixed folder -> one record per file, errors recorded",
         lambda: (run("qa", str(folder), tmp_path / "m.jsonl", model=ob, question="what?", max_new_tokens=2,
                      num_frames=4, progress=False), records())[1],
         lambda recs: sorted(r["id"] for r in recs) == ["clip.bin", "cut.png", "ok.png", "text.png", "tiny.png"]
         and sorted(r["id"] for r in recs if r["status"] == "error") == ["cut.png", "text.png", "tiny.png"]
         and next(r for r in recs if r["id"] == "clip.bin")["stats"]["frames"] == 4),
    ]
    _all("batch", cases + documented)


# ---- the app's handlers -----------------------------------------------------------------------------------------
def test_fuzz_app_handlers(vlm_dirs, media, monkeypatch, tmp_path):
    pytest.importorskip("gradio")
    from mmfast.apps import build_app
    from mmfast.train.toy import ToyARAdapter

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    demo = build_app(vlm=str(vlm_dirs["llava_onevision"]), gen=ToyARAdapter(vocab=8, grid=(4, 4)), var=None,
                     methods=["pool(factor=2)"], gen_methods=["sjd(window=4)"], repeats=1)
    fns = {f.api_name: f.fn for f in demo.fns.values() if f.api_name}
    answer, generate = fns["answer"], fns["generate"]
    cases = [
        ("no media", lambda: answer(None, None, "q", "pool(factor=2)", 2, 4, 1)),
        ("no question", lambda: answer(media["ok.png"], None, "", "pool(factor=2)", 2, 4, 1)),
        ("bad spec", lambda: answer(Image.open(media["ok.png"]), None, "q", "pool(factor=", 2, 4, 1)),
        ("1x1 image", lambda: answer(Image.open(media["tiny.png"]), None, "q", "pool(factor=2)", 2, 4, 1)),
        ("truncated video", lambda: answer(None, media["cut.mp4"], "q", "pool(factor=2)", 2, 4, 1)),
        ("still as video", lambda: answer(None, media["ok.png"], "q", "pool(factor=2)", 2, 4, 1)),
        ("huge question", lambda: answer(Image.open(media["ok.png"]), None, "what? " * 4000, "pool(factor=2)", 2, 4,
                                         1)),
        ("no labels", lambda: generate("", "sjd(window=4)", 0, 1, 1)),
        ("label out of range", lambda: generate("99", "sjd(window=4)", 0, 1, 1)),
        ("too many labels", lambda: generate(",".join("1" * 30), "sjd(window=4)", 0, 1, 1)),
        ("bad decoder spec", lambda: generate("1", "sjd(window=-1)", 0, 1, 1)),
        ("seed None", lambda: generate("1", "nosuch()", None, 1, 1)),
    ]
    documented = [("a real request", lambda: answer(Image.open(media["ok.png"]), None, "q", "pool(factor=2)", 2, 4, 1),
                   lambda r: [row[0] for row in r[0]] == ["baseline", "pool(factor=2)"])]
    _all("app", cases + documented)


# ---- property-based (hypothesis) ---------------------------------------------------------------------------------
hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HSET = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@HSET
@given(st.binary(max_size=2048))
def test_fuzz_property_image_bytes(data):
    from mmfast.media import load_image

    run_case("property/load_image", "bytes", lambda: load_image(data), lambda im: im.mode == "RGB", either=True)


@HSET
@given(st.sampled_from(["uint8", "uint16", "int64", "float32", "float64", "bool"]),
       st.lists(st.integers(0, 9), min_size=0, max_size=4), st.one_of(st.floats(-2, 3), st.just(float("nan"))))
def test_fuzz_property_image_arrays(dtype, shape, fill):
    from mmfast.media import load_image

    arr = np.full(shape, fill).astype(dtype) if dtype != "bool" else np.zeros(shape, bool)
    run_case("property/load_image", f"{dtype}{shape}", lambda: load_image(arr),
             lambda im: im.mode == "RGB" and min(im.size) >= 1, either=True)


@HSET
@given(st.text(alphabet="poolturbsjdkeyfactorandm_(=,.)+0123456789'- ", max_size=40))
def test_fuzz_property_specs(text):
    from mmfast.accel.spec import parse_spec

    run_case("property/spec", text, lambda: parse_spec(text), lambda accs: isinstance(accs, list), either=True)


@HSET
@given(st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True), st.text(max_size=3)),
       st.one_of(st.none(), st.integers(-3, 12)))
def test_fuzz_property_generation_kwargs(max_new, min_new):
    from mmfast.pipelines.base import check_generation_kwargs

    kw = {"max_new_tokens": max_new, "min_new_tokens": min_new}
    ok = (max_new is None or (type(max_new) is int and max_new >= 1)) and (
        min_new is None or (min_new >= 0 and (type(max_new) is not int or min_new <= max_new)))
    run_case("property/generation kwargs", repr(kw), lambda: check_generation_kwargs(kw),
             (lambda _: True) if ok else None)


@HSET
@given(st.text(max_size=60))
def test_fuzz_property_questions(text):
    from mmfast.pipelines.base import check_question

    ok = bool(text.strip())
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        ok = False
    run_case("property/question", repr(text), lambda: check_question(text), (lambda q: q == text) if ok else None)


def test_fuzz_zz_report():
    """The counts (this runs last in the module): untyped escapes and silent acceptances must be 0."""
    report = {"cases": REPORT["cases"], "typed_errors": REPORT["typed"], "documented_behaviours": REPORT["documented"],
              "untyped_escapes": REPORT["escapes"], "silently_accepted": REPORT["silent"]}
    print("\nfuzz report:", json.dumps(report))
    path = os.environ.get("MMFAST_FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps({**report, "failures": ESCAPES}, indent=2))
    assert report["untyped_escapes"] == 0 and report["silently_accepted"] == 0, "\n".join(ESCAPES)
    assert report["cases"] > 0
