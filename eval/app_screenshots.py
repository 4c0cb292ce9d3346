"""Screenshots of every tab of the mmfast app, taken with a real headless browser after a real request.

    apt-get install chromium            # Debian's Chromium (the script drives /usr/bin/chromium)
    pip install playwright              # the driver only: no browser download
    python eval/app_screenshots.py --out eval/results/app

Serves the app (zoo models) on 127.0.0.1, opens it at 1400x1000, and per tab fills the inputs, presses the button,
waits for the answer and saves ``qa.png``, ``stream.png``, ``gen-next-token.png``, ``gen-next-scale.png``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

#: true once the stream's status box reads "N frames streamed" for the whole clip (8 frames: 4 s at 2 fps)
_STREAMED = "() => Array.from(document.querySelectorAll('textarea,input')).some(e => (e.value || '') === '8 frames streamed')"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("eval/results/app"))
    ap.add_argument("--port", type=int, default=7871)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch
    from playwright.sync_api import sync_playwright

    from mmfast.apps import build_app
    from mmfast.apps.common import image_examples, video_examples

    torch.set_num_threads(1)
    demo = build_app()
    demo.launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True, quiet=True)
    args.out.mkdir(parents=True, exist_ok=True)
    scene, scene_q = image_examples(True)[0]
    clip = video_examples(True)[0][0]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{args.port}/", wait_until="networkidle")

            # image / video QA: a held-out scene, its question, pool(factor=2)
            page.locator("#qa-image input[type=file]").set_input_files(scene)
            page.get_by_label("question").first.fill(scene_q)
            page.get_by_role("button", name="Ask", exact=True).click()
            page.get_by_text("median of 3 runs").first.wait_for(timeout=120_000)
            time.sleep(1.5)  # the chart redraws
            page.screenshot(path=str(args.out / "qa.png"))

            # streaming: the held-out clip at 4 fps, then a question mid-stream
            page.get_by_role("tab", name="Streaming video").click()
            page.locator("#stream-video input[type=file]").set_input_files(clip)
            time.sleep(2)
            page.get_by_role("button", name="Stream", exact=True).click()
            page.wait_for_function(_STREAMED, timeout=120_000)
            page.get_by_role("button", name="Ask now").click()
            page.get_by_text("videoscan", exact=True).first.wait_for(timeout=60_000)
            time.sleep(1.5)
            page.screenshot(path=str(args.out / "stream.png"))

            # generation: tiny-ar with SJD, then tiny-var with CoDe
            page.get_by_role("tab", name="Generation").click()
            page.locator("button:visible", has_text="Generate").click()
            page.get_by_text("same seed on both sides").first.wait_for(timeout=180_000)
            time.sleep(1.5)
            page.screenshot(path=str(args.out / "gen-next-token.png"))
            page.get_by_role("tab", name="next-scale (VAR + CoDe)").click()
            page.locator("button:visible", has_text="Generate").click()
            page.locator("p:visible", has_text="same seed on both sides").wait_for(timeout=180_000)
            time.sleep(1.5)
            page.screenshot(path=str(args.out / "gen-next-scale.png"))
            browser.close()
    finally:
        demo.close()
    print("wrote", *sorted(str(p) for p in args.out.glob("*.png")))


if __name__ == "__main__":
    main()
