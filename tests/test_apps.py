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


def test_gen_demo_generates_side_by_side():
    import gen_demo

    from mmfast.train.toy import ToyARAdapter

    demo = gen_demo.build_demo(ToyARAdapter(vocab=8, grid=(4, 4)), methods=["sjd(window=4)"])
    try:
        client = _serve(demo)
        base_img, fast_img, table = client.predict("0,1", "sjd(window=4)", 3, 1, api_name="/generate")
        assert os.path.isfile(base_img) and os.path.isfile(fast_img)
        assert [r[0] for r in table["data"]] == ["baseline", "sjd(window=4)"]
    finally:
        demo.close()
