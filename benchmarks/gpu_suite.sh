#!/usr/bin/env bash
# The GPU session's whole job, from the repository root on a CUDA machine (H100 / H200):
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh            # every step, in order
#   OUT=/some/dir bash benchmarks/gpu_suite.sh vit_targets  # chosen steps only
#
# Steps: env install tests vit_targets vit_more ops plan vllm sglang (see below). The device tool limits a
# command to 10 minutes, so run "env install tests" in one call and each benchmark step in its own
# (every step re-runs "install" cheaply only if the package is not importable).
#
# Expected there: torch (CUDA build), triton, transformers preinstalled, no network, no flash-attn.
# Nothing is downloaded: the install is --no-deps and the benchmarks use seeded random weights.
# The install compiles the optional C++/CUDA extension (minutes); IPCV_SKIP_BUILD=1 skips it (the
# Triton and PyTorch backends still run). Checks that fail are recorded and the case still timed
# (--on-check-failure warn), so that one session yields numbers; read "Checks" in the .md files.
# Raw results go under $OUT: logs/<step>.log, results/*.json|csv|md|png, pytest-gpu.xml, and
# summary.txt (one line per step with its exit status). A failing step does not stop the others.
# tests/bench/test_gpu_suite.py runs every step here with python and nvidia-smi stubbed, checking
# the commands each step runs (and that its benchmark command lines parse).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/out/gpu}"
mkdir -p "$OUT/logs" "$OUT/results"
# Triton must compile for the GPU: the CPU interpreter of the test suite would run (slowly) instead.
unset TRITON_INTERPRET

STEPS=("$@")
if [ ${#STEPS[@]} -eq 0 ]; then
  STEPS=(env install tests vit_targets vit_more ops host_overhead plan vllm sglang)
fi

run_step() {
  local name="$1"
  shift
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$OUT/logs/$name.log"
  "$@" >>"$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  tail -n 40 "$OUT/logs/$name.log"
  return 0
}

# The checkout is importable whatever the install does; the install adds the compiled extension
# (and the lmms-eval entry point). A marker (in the ignored out/, kept while the machine is warm)
# makes later steps skip an install that was already attempted.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
INSTALL_MARKER="$PWD/out/install-attempted"

ensure_installed() {
  [ -f "$INSTALL_MARKER" ] || step_install
}

step_env() {
  nvidia-smi
  python - <<'EOF'
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for name in ("triton", "transformers"):
    try:
        info[name] = __import__(name).__version__
    except ImportError:
        info[name] = None
print(json.dumps(info, indent=2))
EOF
}

step_install() {
  mkdir -p "$(dirname "$INSTALL_MARKER")" && touch "$INSTALL_MARKER"
  # --no-build-isolation: compile the optional extension against this machine's torch.
  python -m pip install --no-deps --no-build-isolation -e . && return 0
  # A setuptools older than 70.1 with no `wheel` package cannot build an editable wheel: build
  # the extension in place instead (the checkout is on PYTHONPATH).
  echo "editable install failed; building the compiled extension in place"
  python setup.py build_ext --inplace
}

# The whole suite, compiled: the gpu-marked tests (bf16, CUDA ops, larger shapes), the Triton tests
# (their triton_device fixture puts them on CUDA when TRITON_INTERPRET is unset) and the rest.
step_tests() {
  ensure_installed
  python -m pytest -q -rs tests --junitxml="$OUT/pytest-gpu.xml"
}

# The GPU targets: full Qwen2-VL-7B tower, bf16, ratio 0.65, prune layer 3, 7 stabilisation
# blocks, at 1k / 4k / 16k tokens per image (448, 896, 1792 pixels square). Also IPCV with PyTorch's
# varlen (flash) attention in the stabilisation blocks, which tells whether `auto` should prefer it
# to the Triton kernel (dropped when this torch has no varlen attention).
step_vit_targets() {
  ensure_installed
  local variants=(unpatched paper ipcv)
  if python -c "import torch.nn.attention.varlen" 2>/dev/null; then variants+=(ipcv_torch_varlen); fi
  python benchmarks/bench_vit.py --suite gpu --device cuda --cases 448x448 896x896 1792x1792 \
    --variants "${variants[@]}" \
    --out "$OUT/results" --name vit_gpu_targets --no-progress --breakdown --on-check-failure warn
}

# The other inputs: 1024 / 2048 pixel images, a batch of 8 images, a 16-frame video.
step_vit_more() {
  ensure_installed
  python benchmarks/bench_vit.py --suite gpu --device cuda --cases 1024x1024 2048x2048 "448x448*8" "448x448@16" \
    --out "$OUT/results" --name vit_gpu_more --no-progress --check none --on-check-failure warn
}

# Op level: knn, kept-query attention and the restore, at 1k / 4k / 16k tokens.
step_ops() {
  ensure_installed
  python benchmarks/bench_ops.py --device cuda --out "$OUT/results" --on-check-failure warn --keep-going
}

# vLLM's vision-encoder time and time to first token with and without IPCV, when this
# machine has vLLM: the full Qwen2-VL-7B tower in bf16 at 1k / 4k tokens per image, the family's
# recommended setting. Without vLLM (the GPU image has none) the step is skipped, and says so in
# its log and in summary.txt (rc=0).
# Host time of the op layer and of the patched tower per block, and the GPU synchronisations per
# patched forward (host_overhead_cuda.*).
step_host_overhead() {
  ensure_installed
  python benchmarks/bench_ops.py --mode host-overhead --device cuda --out "$OUT/results"
}

step_vllm() {
  if ! python -c "import vllm.entrypoints.llm" 2>/dev/null; then
    echo "vllm: skipped, vLLM is not importable here" | tee -a "$OUT/summary.txt"
    return 0
  fi
  ensure_installed
  python benchmarks/bench_vllm.py --preset qwen2-vl-7b --dtype bfloat16 --cases 448x448 896x896 \
    --out "$OUT/results" --name vllm_gpu --no-progress --on-check-failure warn
}

# SGLang's server end to end, when this machine has SGLang: two servers (plain and with the
# plugin's --json-model-override-args '{"ipcv": ...}') on the Qwen2-VL-7B tower in bf16, the time to
# first token of OpenAI-API chat requests with a new 448x448 / 896x896 image each, interleaved.
# Without SGLang (the GPU image has none) the step is skipped, and says so in its log and in
# summary.txt (rc=0).
step_sglang() {
  if ! python -c "import sglang.srt.entrypoints.http_server" 2>/dev/null; then
    echo "sglang: skipped, SGLang is not importable here" | tee -a "$OUT/summary.txt"
    return 0
  fi
  ensure_installed
  python benchmarks/bench_sglang.py --preset qwen2-vl-7b --dtype bfloat16 --cases 448x448 896x896 \
    --out "$OUT/results" --name gpu
}

# Any other benchmark script in benchmarks/ (bench_plan.py, ...), with its own defaults on the GPU.
run_other_benchmark() {
  ensure_installed
  python "benchmarks/$1" --device cuda --out "$OUT/results"
}

for step in "${STEPS[@]}"; do
  case "$step" in
    env | install | tests | vit_targets | vit_more | ops | vllm | sglang) run_step "$step" "step_$step" ;;
    plan) run_step "$step" run_other_benchmark bench_plan.py ;;
    *) echo "unknown step: $step (steps: env install tests vit_targets vit_more ops plan vllm sglang)" >&2 ;;
  esac
done
# Benchmark scripts this list does not know yet: run them too, so none is forgotten.
if [ $# -eq 0 ]; then
  for script in benchmarks/bench_*.py; do
    name="$(basename "$script" .py)"
    case "$name" in bench_vit | bench_ops | bench_plan | bench_vllm | bench_sglang) continue ;; esac
    run_step "$name" run_other_benchmark "$name.py"
  done
fi
cat "$OUT/summary.txt"
