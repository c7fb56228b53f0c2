#!/usr/bin/env bash
# One-shot check of flaxformer_lite on an NVIDIA GPU machine (H100 / H200), in under 8 minutes:
#
#   bash experiments/gpu_check.sh            # from anywhere; it works in the repository root
#
# 1. nvidia-smi;  2. a venv (.venv-gpu) with `pip install -e '.[test,gpu]'` (jax[cuda12]);  3. jax.devices();
# 4. pytest -q -x of the attention / layers / transformer / training tests with JAX_PLATFORMS=cuda,cpu (the
#    tests are CPU tests; conftest.py only setdefaults JAX_PLATFORMS=cpu, so the GPU is what they run on);
# 5. experiments/benchmark.py on benchmark.py:base, :base_gpu and :big in bfloat16, train + greedy + beam, MFU against
#    the datasheet bf16 peak; 6. the benchmark tables again, from the JSON lines.
#
# Every part runs under `timeout`, cut to what is left of GPU_CHECK_TOTAL_S (default 450 s); a part that
# fails is recorded and the rest go on, except that nothing after a failed install or a missing GPU can.
# Exit status: 0 when every part ran and passed, 1 otherwise; the summary lists passed, failed and skipped.
# Results (log, JSON lines, pip output) go to $OUT if set, else ./gpu_check_results.
#
# Environment: GPU_CHECK_TOTAL_S (time budget), GPU_CHECK_VENV (venv path), GPU_CHECK_CONFIGS (benchmark
# variants, default "base base_gpu big"), GPU_CHECK_PYTEST_S (pytest's cap, 150), GPU_CHECK_MATMUL_PRECISION (float32 matmuls in pytest, default highest: the
# tests' tolerances are for float32, and the GPU's default would use TF32; "default" to see TF32's effect).
# GPU_CHECK_ALLOW_CPU=1: a dry run on a CPU (no nvidia-smi, no CUDA install: reuses GPU_CHECK_VENV, default
# .venv, installing '.[test]' only if it lacks the project; JAX_PLATFORMS=cpu; the tiny config and few steps).
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
START=$SECONDS
TOTAL_S=${GPU_CHECK_TOTAL_S:-450}
DEADLINE=$((START + TOTAL_S - 12))  # timeout's --kill-after margin.
MIN_PART_S=15
ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
RESULTS=${OUT:-$PWD/gpu_check_results}
mkdir -p "$RESULTS" || exit 1
LOG=$RESULTS/gpu_check.log
JSONL=$RESULTS/benchmark.jsonl
TAG=gpu_check_$(date +%Y%m%dT%H%M%S)
exec > >(tee -a "$LOG") 2>&1

if [[ $ALLOW_CPU == 1 ]]; then
  VENV=${GPU_CHECK_VENV:-.venv}
  PLATFORMS=cpu
  TEST_PLATFORMS=cpu
  CONFIGS=${GPU_CHECK_CONFIGS:-tiny}
  PYTEST_S=${GPU_CHECK_PYTEST_S:-240}  # These tests take ~3 min on a 2-core CPU.
else
  VENV=${GPU_CHECK_VENV:-.venv-gpu}
  PLATFORMS=cuda
  TEST_PLATFORMS=cuda,cpu
  CONFIGS=${GPU_CHECK_CONFIGS:-base base_gpu big}
  PYTEST_S=${GPU_CHECK_PYTEST_S:-150}
fi
PY=$VENV/bin/python
PASSED=()
FAILED=()
SKIPPED=()

echo "gpu_check $TAG: repository $PWD, results in $RESULTS, budget ${TOTAL_S}s, dry run on CPU: $ALLOW_CPU"

# part NAME CAP_S RESERVE_S COMMAND...: runs COMMAND under timeout, for at most CAP_S and never into the
# RESERVE_S seconds kept for the parts after it (nor past the deadline); records the outcome.
part() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local left=$((DEADLINE - SECONDS))
  ((cap > left - reserve)) && cap=$((left - reserve))
  ((cap > left)) && cap=$left
  if ((cap < MIN_PART_S)); then
    echo "=== SKIPPED $name: ${left}s left of the budget"
    SKIPPED+=("$name (out of time: ${left}s left)")
    return 125
  fi
  echo "=== $name (timeout ${cap}s, $((SECONDS - START))s elapsed)"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$cap" "$@"
  rc=$?
  if ((rc == 0)); then
    PASSED+=("$name ($((SECONDS - t0))s)")
  elif ((rc == 124 || rc == 137)); then
    FAILED+=("$name: timed out after ${cap}s")
  else
    FAILED+=("$name: exit $rc after $((SECONDS - t0))s")
  fi
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  return "$rc"
}

finish() {
  echo
  echo "=== gpu_check summary ($((SECONDS - START))s; log $LOG, JSON lines $JSONL)"
  local item
  for item in "${PASSED[@]}"; do echo "passed:  $item"; done
  for item in "${FAILED[@]}"; do echo "FAILED:  $item"; done
  for item in "${SKIPPED[@]}"; do echo "skipped: $item"; done
  if ((${#FAILED[@]} > 0)); then
    echo "gpu_check: ${#FAILED[@]} part(s) failed"
    exit 1
  fi
  local missed=0
  for item in "${SKIPPED[@]}"; do [[ $item == *"dry run"* ]] || missed=1; done
  if ((missed)); then
    echo "gpu_check: nothing failed, but parts were skipped: incomplete"
    exit 1
  fi
  echo "gpu_check: all parts passed"
  exit 0
}

skip_all() {  # skip_all REASON PART...
  local reason=$1 name
  shift
  for name in "$@"; do SKIPPED+=("$name ($reason)"); done
}

BENCH_PARTS=()
for config in $CONFIGS; do BENCH_PARTS+=("benchmark $config"); done
LATER_PARTS=("jax devices" pytest "${BENCH_PARTS[@]}" tables)

# 1. The GPU as the driver sees it.
if [[ $ALLOW_CPU == 1 ]] && ! command -v nvidia-smi >/dev/null; then
  SKIPPED+=("nvidia-smi (dry run on CPU)")
else
  part nvidia-smi 20 0 nvidia-smi
fi

# 2. The venv and the project with jax[cuda12].
if [[ ! -x $PY ]]; then
  part venv 60 0 python3 -m venv "$VENV" || { skip_all "no venv" install "${LATER_PARTS[@]}"; finish; }
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP_LOG=$RESULTS/pip_install.log
if [[ $ALLOW_CPU == 1 ]]; then
  if "$PY" -c "import flaxformer_lite, pytest" 2>/dev/null; then
    SKIPPED+=("install (dry run on CPU: $VENV already has the project; no CUDA install)")
  else
    part install 300 60 "$PY" -m pip install --timeout 20 --retries 1 -e ".[test]"
  fi
else
  extras=".[test,gpu]"
  jax_cuda=()
  if ! grep -Eq '^[[:space:]]*gpu[[:space:]]*=' pyproject.toml; then
    echo "NOTE: pyproject.toml has no 'gpu' extra yet: installing '.[test]' and jax[cuda12] by name"
    extras=".[test]"
    jax_cuda=("jax[cuda12]>=0.10,<0.11")
  fi
  if ! part install 240 90 "$PY" -m pip install --timeout 20 --retries 1 --log "$PIP_LOG" -q -e "$extras" \
    "${jax_cuda[@]}"; then
    echo "ERROR: pip install -e '$extras' ${jax_cuda[*]} failed: jax[cuda12] (or another package) could not be"
    echo "installed; is PyPI (or the configured index) reachable from this machine? Last lines of $PIP_LOG:"
    grep -E "Could not|No matching|ConnectionError|Max retries|HTTP error|ResolutionImpossible" "$PIP_LOG" \
      2>/dev/null | tail -n 5
    tail -n 8 "$PIP_LOG" 2>/dev/null
    skip_all "install failed" "${LATER_PARTS[@]}"
    finish
  fi
fi

# 3. What JAX sees; stops here without a GPU (JAX_PLATFORMS=cuda fails loudly when CUDA cannot start).
NGPU_FILE=$RESULTS/num_gpus
rm -f "$NGPU_FILE"
if ! part "jax devices" 90 60 env JAX_PLATFORMS="$PLATFORMS" "$PY" -c "
import sys, jax
print('jax', jax.__version__, 'backend', jax.default_backend(), 'devices', jax.devices())
for d in jax.devices():
    print(' ', d.id, d.device_kind)
gpus = [d for d in jax.devices() if d.platform == 'gpu']
open('$NGPU_FILE', 'w').write(str(len(gpus)))
sys.exit(0 if gpus or '$ALLOW_CPU' == '1' else 'no GPU visible to jax')
"; then
  skip_all "jax found no usable GPU" pytest "${BENCH_PARTS[@]}" tables
  finish
fi
NGPU=$(cat "$NGPU_FILE" 2>/dev/null || echo 0)

# 4. The tests that touch attention and sharding, on the GPU (float32 matmuls at full precision, see above).
DESELECT=()
if [[ $ALLOW_CPU != 1 ]] && ((NGPU < 8)); then
  # It builds (8,1,1) and (2,2,2) meshes from jax.devices(): 8 devices, which one GPU is not.
  DESELECT=(--deselect tests/test_train_step.py::test_data_fsdp_tensor_meshes_train_like_one_device)
  SKIPPED+=("pytest test_data_fsdp_tensor_meshes_train_like_one_device (needs 8 devices, $NGPU GPU(s))")
fi
part pytest "$PYTEST_S" 120 env JAX_PLATFORMS="$TEST_PLATFORMS" XLA_PYTHON_CLIENT_PREALLOCATE=false \
  JAX_DEFAULT_MATMUL_PRECISION="${GPU_CHECK_MATMUL_PRECISION:-highest}" \
  "$PY" -m pytest -q -x -p no:cacheprovider "${DESELECT[@]}" tests/test_attention.py tests/test_layers.py \
  tests/test_transformer.py tests/test_train_step.py

# 5. The benchmark, one process per config (train, greedy, beam), JSON lines appended after each mode.
if [[ $ALLOW_CPU == 1 ]]; then
  BENCH_FLAGS=(--config=experiments/configs/tiny.py --config.data.batch_size=4 --steps=3 --warmup=1
    --decode_batch=3 --decode_length=5 --decode_reps=2 --peak=measured --peak_size=256)
else
  BENCH_FLAGS=(--peak=datasheet --peak_size=8192)
fi
i=0
for config in $CONFIGS; do
  i=$((i + 1))
  left_after=$(( (${#BENCH_PARTS[@]} - i) * 90 + 15 ))  # Keeps time for the configs after this one.
  config_flag=()
  [[ $ALLOW_CPU == 1 ]] || config_flag=("--config=experiments/configs/benchmark.py:$config")
  part "benchmark $config" 200 "$left_after" env JAX_PLATFORMS="$PLATFORMS" "$PY" experiments/benchmark.py \
    "${BENCH_FLAGS[@]}" "${config_flag[@]}" --config.model.dtype=bfloat16 --modes=train,greedy,beam \
    --tag="$TAG" --out="$JSONL"
done

# 6. Every table of this run again, from the JSON lines (also those of a config cut short by its timeout).
part tables 30 0 env JAX_PLATFORMS=cpu "$PY" -c "
import importlib.util, json, sys, warnings
warnings.simplefilter('ignore', DeprecationWarning)
spec = importlib.util.spec_from_file_location('benchmark', 'experiments/benchmark.py')
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
try:
    rows = [json.loads(line) for line in open('$JSONL') if line.strip()]
except FileNotFoundError:
    rows = []
rows = [r for r in rows if r.get('tag') == '$TAG']
for config in dict.fromkeys(r['config'] for r in rows):
    print(config)
    print(bench.format_table([r for r in rows if r['config'] == config]))
sys.exit(0 if rows else 'no benchmark rows for tag $TAG in $JSONL')
"

finish
