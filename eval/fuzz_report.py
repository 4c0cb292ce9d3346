"""Run the fuzz suite (tests/test_fuzz.py) and write its counts: cases, typed errors, documented behaviours,
untyped escapes (must be 0).

    python eval/fuzz_report.py --json eval/results/fuzz.json --md eval/results/fuzz.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("eval/results/fuzz.json"))
    ap.add_argument("--md", type=Path, default=Path("eval/results/fuzz.md"))
    args = ap.parse_args()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MMFAST_FUZZ_REPORT": str(args.json.resolve()), "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"],
                         cwd=root, env=env)
    report = json.loads(args.json.read_text())
    from mmfast.bench.harness import provenance

    report["meta"] = provenance()
    report["pytest_exit_code"] = rc
    args.json.write_text(json.dumps(report, indent=2))
    keys = ["cases", "typed_errors", "documented_behaviours", "untyped_escapes", "silently_accepted"]
    md = ["### fuzz suite (tests/test_fuzz.py)", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
          "| " + " | ".join(str(report[k]) for k in keys) + " |", "",
          "Entry points: pipeline(), image-qa / image-caption, video-qa, streaming-video-qa, class-to-image, the CLI "
          "(one `error:` line, exit 2), the batch runner, the app's handlers; plus hypothesis properties over image "
          "bytes / arrays, accelerate specs, generation kwargs and questions. `python eval/fuzz_report.py`."]
    args.md.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    sys.exit(rc)


if __name__ == "__main__":
    main()
