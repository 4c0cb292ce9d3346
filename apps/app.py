"""The mmfast Gradio app as a script (the same as `mmfast app`): image / video QA, streaming video, generation.

    python apps/app.py --port 7860      # then open http://127.0.0.1:7860
"""

from __future__ import annotations

import argparse

from mmfast.apps import launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vlm", default="tiny-vlm", help="VLM for the QA tabs ('none' hides them)")
    ap.add_argument("--gen", default="tiny-ar", help="next-token image generator ('none' hides it)")
    ap.add_argument("--var", default="tiny-var", help="next-scale image generator ('none' hides it)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    a = ap.parse_args()
    none = lambda m: None if m == "none" else m  # noqa: E731
    launch(host=a.host, port=a.port, vlm=none(a.vlm), gen=none(a.gen), var=none(a.var))


if __name__ == "__main__":
    main()
