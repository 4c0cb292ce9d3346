#!/usr/bin/env bash
# Run HERE (not on the device machine) before a device run of eval/gpu/run.sh:
#   * writes eval/gpu/commit.txt: the commit being measured (+dirty with local changes), which run.sh records in the
#     results (the device machine gets a copy of the working tree without .git);
#   * with --wheels, downloads the transformers wheel of constraints.txt into eval/gpu/wheels/, which run.sh
#     installs into a throw-away PYTHONPATH overlay there. Not needed with the device image's transformers 5.17
#     (the suite patches the one difference it meets: mmfast.bench.gpu.transformers_compat); use it to measure on
#     the exact tested version. Pure-Python wheel (~12 MB): the working tree plus carried paths must stay < 64 MiB.
# Both paths are git-ignored: name them in the device tool's `carry` (eval/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
commit=$(git rev-parse HEAD)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then commit="$commit+dirty"; fi
echo "$commit" > eval/gpu/commit.txt
echo ">> eval/gpu/commit.txt: $commit"
if [ "${1:-}" = "--wheels" ]; then
  PY=${PYTHON:-.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  version=$(sed -n 's/^transformers==//p' constraints.txt)
  rm -rf eval/gpu/wheels && mkdir -p eval/gpu/wheels
  # the device runs CPython 3.12; transformers is pure Python, so one py3-none-any wheel serves it (its
  # requirements: huggingface-hub>=1.31 <3, tokenizers>=0.23.1 <0.24, safetensors>=0.8 are already there)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d eval/gpu/wheels "transformers==$version"
  ls -la eval/gpu/wheels
  du -sh eval/gpu/wheels
fi
