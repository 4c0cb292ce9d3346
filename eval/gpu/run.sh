#!/usr/bin/env bash
# The GPU suite in one command (issue #23): kernels vs their torch references (+ their CUDA tests), vlm-speed at
# LLaVA-OneVision-7B shape and ar-speed on tiny-ar / GPT-B / GPT-L, bf16. eval/gpu/README.md says how to run it on
# a lent GPU and what to do with the results.
#
#   eval/gpu/run.sh                    full run on a CUDA GPU (~5 min on one H200)
#   eval/gpu/run.sh --smoke            the same code at tiny sizes on the CPU (~1 min; Triton through its interpreter)
#   eval/gpu/run.sh --out DIR          results elsewhere (default: $OUT when set, as on the device machine,
#                                      else eval/results/gpu, or out/gpu-smoke with --smoke)
#   eval/gpu/run.sh --no-tests         skip the kernels' CUDA tests (pytest -k cuda)
#   eval/gpu/run.sh -- --opt sections=kernels,ar-speed   anything after -- goes to `mmfast bench gpu`
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), MMFAST_COMMIT (the commit measured,
# when the tree is not a git checkout; else eval/gpu/commit.txt, written by eval/gpu/prepare.sh),
# GPU_SUITE_TIMEOUT (seconds for the suite itself, default 360; a section cut short keeps the sections before it),
# GPU_TESTS_TIMEOUT (the CUDA tests, default 120). Wheels in eval/gpu/wheels/ (eval/gpu/prepare.sh --wheels) are
# installed into a temporary overlay first (PYTHONPATH), never into the interpreter's site-packages.
set -u -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)

SMOKE=0
TESTS=1
DIR=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --no-tests) TESTS=0 ;;
    --out) DIR="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -z "$DIR" ]; then
  if [ -n "${OUT:-}" ]; then DIR="$OUT"
  elif [ "$SMOKE" = 1 ]; then DIR="$ROOT/out/gpu-smoke"
  else DIR="$ROOT/eval/results/gpu"; fi
fi
mkdir -p "$DIR"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -z "${MMFAST_COMMIT:-}" ] && ! git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1 && [ -f eval/gpu/commit.txt ]; then
  export MMFAST_COMMIT=$(cat eval/gpu/commit.txt)
fi

# optional wheels (e.g. transformers 5.23 where the interpreter has another version): a throw-away overlay
if ls eval/gpu/wheels/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d /tmp/mmfast-gpu-site.XXXX)
  echo ">> installing eval/gpu/wheels/*.whl into $SITE (PYTHONPATH overlay)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" eval/gpu/wheels/*.whl \
    || { echo "run.sh: installing the wheels failed" >&2; exit 1; }
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi

SUITE_OPTS=()
if [ "$SMOKE" = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TRITON_INTERPRET=1  # kernels run in Triton's CPU interpreter
  SUITE_OPTS+=(--opt smoke=True)
else
  export TRITON_INTERPRET=0  # compiled kernels (the tests' conftest would otherwise default to the interpreter)
fi

{
  echo "date: $(date -u +%FT%TZ)  smoke: $SMOKE  out: $DIR  commit: ${MMFAST_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null)}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PYTHON" - <<'PY'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| available", torch.cuda.is_available())
for pkg in ("transformers", "triton", "tokenizers", "huggingface_hub", "safetensors", "numpy", "scikit-image", "av"):
    try:
        print(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg} (not installed)")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
PY
} 2>&1 | tee "$DIR/env.txt"

STATUS=0
if [ "$SMOKE" = 0 ] && [ "$TESTS" = 1 ]; then
  echo ">> the kernels' CUDA tests (pytest -k cuda), compiled Triton"
  timeout "${GPU_TESTS_TIMEOUT:-120}" "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda tests/test_kernels_*.py -rs 2>&1 | tee "$DIR/pytest-cuda.log"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo ">> CUDA tests: FAILED or timed out (see pytest-cuda.log)"; STATUS=1; }
fi

echo ">> mmfast bench gpu -> $DIR/gpu.json, gpu.md"
timeout "${GPU_SUITE_TIMEOUT:-360}" "$PYTHON" -m mmfast bench gpu --opt out_dir="$DIR" "${SUITE_OPTS[@]}" "${EXTRA[@]}" \
  2>&1 | grep --line-buffered -v -e "^Loading weights" -e "^Writing model" > "$DIR/run.log"
RC=${PIPESTATUS[0]}
[ "$RC" = 0 ] || { echo ">> the suite exited with $RC (124: timed out; partial results kept), see run.log"; tail -n 30 "$DIR/run.log"; STATUS=1; }

if [ -f "$DIR/gpu.json" ]; then
  "$PYTHON" - "$DIR/gpu.json" <<'PY'
import json, sys
res = json.load(open(sys.argv[1]))
meta, rows = res["meta"], res["rows"]
print(f"\n== {meta.get('device')} | driver {meta.get('driver')} | commit {meta.get('commit')} | "
      f"partial {meta.get('partial')} | wall {meta.get('wall_s')} s | {meta.get('versions')}")
for r in rows:
    if r.get("section") == "kernels-summary":
        print(f"kernel {r['method']:17s} ok={r.get('ok')} cases={r.get('cases')} flip={r.get('flip')} "
              f"failed={r.get('failed')} {r.get('skipped') or ''}")
    elif r.get("section") == "timing":
        print(f"section {r['method']:12s} {r.get('wall_s')} s (expected {r.get('expected_s')})")
    elif r.get("error"):
        print(f"ERROR {r.get('section')} {r['method']}: {r['error'][:200]}")
PY
else
  echo ">> no gpu.json written"; STATUS=1
fi
exit $STATUS
