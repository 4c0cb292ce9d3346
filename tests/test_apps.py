"""The Gradio app (mmfast.apps, `mmfast app`) answers through its public API: launched on 127.0.0.1 and driven by
gradio_client, on tiny random models of the real classes and the toy generators."""

from __future__ import annotations

import os

import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def served(vlm_dirs, tmp_path_factory):
    """One app over a random LLaVA-OneVision, the toy next-token generator and the toy VAR pair."""
    from mmfast.apps import build_app
    from mmfast.train.toy import ToyARAdapter, toy_var_pair

    tmp = tmp_path_factory.mktemp("app")
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    mp.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))
    drafter, refiner = toy_var_pair()
    refiner.save_pretrained(tmp / "refiner")
    code = f"code(refiner={str(tmp / 'refiner')!r},draft_scales=3)"
    demo = build_app(vlm=str(vlm_dirs["llava_onevision"]), gen=ToyARAdapter(vocab=8, grid=(4, 4)), var=drafter,
                     methods=["pool(factor=2)"], gen_methods=["sjd(window=4)"], var_methods=[code], repeats=2)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        yield demo, gradio_client.Client(demo.local_url, verbose=False), code, tmp
    finally:
        demo.close()
        mp.undo()


def test_app_queue_is_bounded(served):
    from mmfast.apps import CONCURRENCY, QUEUE_SIZE

    demo = served[0]
    assert demo._queue.max_size == QUEUE_SIZE and demo._queue.default_concurrency_limit == CONCURRENCY


def test_qa_tab_answers_side_by_side_with_repeated_timings(served):
    from mmfast.train.tiny_models import make_test_image

    _, client, _, tmp = served
    img = tmp / "x.png"
    make_test_image(0).save(img)
    table, note, chart = client.predict(gradio_client.handle_file(str(img)), None, "what is this?", "pool(factor=2)",
                                        4, 8, 3, api_name="/answer")
    rows = table["data"]
    assert [r[0] for r in rows] == ["baseline", "pool(factor=2)"]
    kept = [int(r[6].split(" / ")[0]) for r in rows]
    assert kept[1] * 3 < kept[0]  # pool(factor=2): about a quarter (OneVision adds row-end tokens)
    assert "median of 3 runs" in note
    assert all("(" in r[3] for r in rows)  # "median (min-max)" of the 3 totals
    assert rows[0][2] == 1.0 and rows[1][2] > 0
    which = {r[0]: r[-1] for r in chart["data"]}  # the measured accuracy-vs-speed points (eval/results)
    assert which.get("pool(factor=2)") == "selected" and which.get("baseline") == "baseline"


def test_qa_tab_bad_input_is_a_message(served):
    _, client, _, _ = served
    with pytest.raises(gradio_client.exceptions.AppError, match="Give an image or a video"):
        client.predict(None, None, "what?", "pool(factor=2)", 4, 8, 1, api_name="/answer")


def test_stream_tab_streams_a_video_and_answers_mid_stream(served):
    import av

    from mmfast.train.tiny_models import make_test_video

    _, client, _, tmp = served
    clip = tmp / "clip.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for f in make_test_video(8, seed=1):
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    _, kv, _, status = client.predict(gradio_client.handle_file(str(clip)), 2, api_name="/stream")
    assert status == "4 frames streamed"  # 2 s of video at 2 frames per second
    rows = client.predict("what is this?", api_name="/ask_stream")["data"]
    assert [r[0] for r in rows] == ["full cache", "videoscan"] and all(r[2] == 4 for r in rows)
    assert rows[1][3] < rows[0][3]  # VideoScan holds its carriers, the full cache every frame's tokens


def test_generation_tab_next_token_and_next_scale(served):
    _, client, code, _ = served
    base_img, fast_img, table, note, _ = client.predict("0,1", "sjd(window=4)", 3, 1, 2, api_name="/generate")
    assert os.path.isfile(base_img) and os.path.isfile(fast_img)
    assert [r[0] for r in table["data"]] == ["baseline", "sjd(window=4)"] and "median of 2 runs" in note
    base_img, fast_img, table, _, _ = client.predict("0,7", code, 3, 1, 1, api_name="/generate_scales")
    assert os.path.isfile(base_img) and os.path.isfile(fast_img)
    assert [r[0] for r in table["data"]] == ["baseline", code] and table["data"][0][-1] == 1.0
    with pytest.raises(gradio_client.exceptions.AppError, match="At most 20"):
        client.predict(",".join(["1"] * 21), "sjd(window=4)", 3, 1, 1, api_name="/generate")


def test_accuracy_speed_points_come_from_the_results(tmp_path):
    import json

    from mmfast.apps.common import accuracy_speed_points, chart_frame

    (tmp_path / "vlm-quality.json").write_text(json.dumps({"rows": [
        {"method": "baseline", "accuracy_retained": 1.0, "model": "tiny-vlm"},
        {"method": "turbo(keep=0.25)", "accuracy_retained": 0.9, "model": "tiny-vlm"}]}))
    (tmp_path / "vlm-speed-vision.json").write_text(json.dumps({"rows": [
        {"method": "baseline", "speedup": 1.0, "input": "image"},
        {"method": "turbo(keep=0.25)", "speedup": 3.0, "input": "image"},
        {"method": "turbo(keep=0.25)", "speedup": 2.5, "input": "video16"}]}))
    pts = accuracy_speed_points("vlm", tmp_path)
    assert [(p["method"], p["speed-up"], p["accuracy retained"]) for p in pts] == [
        ("baseline", 1.0, 1.0), ("turbo(keep=0.25)", 3.0, 0.9)]
    os.environ["MMFAST_RESULTS"] = str(tmp_path)
    try:
        assert list(chart_frame("vlm", "turbo(keep=0.5)")["which"]) == ["baseline", "selected"]
    finally:
        del os.environ["MMFAST_RESULTS"]
