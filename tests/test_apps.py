"""The Gradio demo apps answer through their public API (launched on 127.0.0.1, driven by gradio_client)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

APPS = Path(__file__).resolve().parents[1] / "apps"


@pytest.fixture(autouse=True)
def _gradio_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.syspath_prepend(str(APPS))


def _serve(demo):
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    return gradio_client.Client(demo.local_url, verbose=False)


def test_vlm_demo_answers_side_by_side(tmp_path, vlm_dirs):
    import vlm_demo

    from mmfast.train.tiny_models import make_test_image

    demo = vlm_demo.build_demo(str(vlm_dirs["llava"]), methods=["pool(factor=2)"])
    try:
        client = _serve(demo)
        img = tmp_path / "x.png"
        make_test_image(0).save(img)
        base, fast, table = client.predict(
            gradio_client.handle_file(str(img)), None, "what is this?", "pool(factor=2)", 4, 8, api_name="/answer"
        )
        assert isinstance(base, str) and isinstance(fast, str)
        rows = table["data"]
        assert [r[0] for r in rows] == ["baseline", "pool(factor=2)"]
        assert rows[1][2] * 4 == rows[0][2]  # visual_tokens_kept: a quarter
    finally:
        demo.close()


def test_vlm_demo_streams_a_video_and_answers_mid_stream(tmp_path, vlm_dirs):
    import av
    import vlm_demo

    from mmfast.train.tiny_models import make_test_video

    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for f in make_test_video(8, seed=1):
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    demo = vlm_demo.build_demo(str(vlm_dirs["llava_onevision"]), methods=["pool(factor=2)"])
    try:
        client = _serve(demo)
        _, kv, _, status = client.predict(gradio_client.handle_file(str(clip)), 2, api_name="/stream")
        assert status == "4 frames streamed"  # 2 s of video at 2 frames per second
        rows = client.predict("what is this?", api_name="/ask_stream")["data"]
        assert [r[0] for r in rows] == ["full cache", "videoscan"] and all(r[2] == 4 for r in rows)
        assert rows[1][3] < rows[0][3]  # VideoScan holds its carriers, the full cache every frame's tokens
    finally:
        demo.close()


def test_gen_demo_generates_side_by_side(tmp_path):
    import gen_demo

    from mmfast.train.toy import ToyARAdapter, toy_var_pair

    drafter, refiner = toy_var_pair()
    refiner.save_pretrained(tmp_path / "refiner")
    code = f"code(refiner={str(tmp_path / 'refiner')!r},draft_scales=3)"
    demo = gen_demo.build_demo(ToyARAdapter(vocab=8, grid=(4, 4)), methods=["sjd(window=4)"], var_model=drafter,
                               var_methods=[code])
    try:
        client = _serve(demo)
        base_img, fast_img, table = client.predict("0,1", "sjd(window=4)", 3, 1, api_name="/generate")
        assert os.path.isfile(base_img) and os.path.isfile(fast_img)
        assert [r[0] for r in table["data"]] == ["baseline", "sjd(window=4)"]
        base_img, fast_img, table = client.predict("0,7", code, 3, 1, api_name="/generate_scales")
        assert os.path.isfile(base_img) and os.path.isfile(fast_img)
        assert [r[0] for r in table["data"]] == ["baseline", code] and table["data"][0][-1] == 1.0
    finally:
        demo.close()
