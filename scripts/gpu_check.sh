#!/usr/bin/env bash
# scripts/gpu_check.sh: the single prepared command for a lent GPU machine: build, CUDA tests,
# sanitizers, benchmarks, in one call.
#
#   bash scripts/gpu_check.sh            # from anywhere; results under $OUT (default ./gpu_check_out)
#
# Everything within GPU_CHECK_BUDGET seconds (default 450: one device call of ~8 minutes with the
# machine's start, leaving room for a rerun in a 15-minute lease). A step gets min(its cap, what is
# left minus a reserve for the later steps); one that would get < 10 s is SKIPPED and says so.
#
#   env        versions, nvidia-smi, compute-sanitizer, expecttest (installed offline from
#              scripts/wheels/ when missing: nothing else is installed, the package runs from the checkout)
#   build      python -m fused_moe_ops.build --verbose (JIT build of the CPU + CUDA kernels), then
#   backends   python -m fused_moe_ops (which kernel serves CUDA, and why)
#   codegen    python -m fused_moe_ops.codegen --gpu-compare docs/BENCHMARKS.md: the machine-code
#              table (registers, spills, shared memory, blocks per SM, compiled without a GPU) against
#              what this GPU's driver reports for the same images; fails on a difference
#   tests      in parallel (GPU_CHECK_JOBS processes, default 4), each job under its own timeout:
#              * every CUDA test file of tests/ in its OWN pytest process, -v, -m "cuda and not slow":
#                a crash names its test (the last one started) and the other files still run;
#              * scripts/sanitize_kernels.py (both kernels, every code path, checked against float64)
#                under compute-sanitizer: memcheck, racecheck, synccheck on the CUDA kernel, memcheck
#                on the Triton kernel (its small case set: each specialisation is a JIT compile);
#                scripts/sanitize_scatter.py (the scatter form's CUDA kernels, bit for bit the float32
#                reference) under memcheck and racecheck
#   bench      python -m fused_moe_ops.bench --device cuda --grid pass-vs-inductor --compile dynamic:
#              alone on the GPU, after the tests
#   model      python -m fused_moe_ops.bench --device cuda --model (compiled MoE blocks, +- the pass)
#   scatter    scripts/scatter_timing.py: moe::scatter_mul_sum against eager index_add_, decode to prefill
#   ep         torchrun --nproc-per-node 1 examples/expert_parallel.py --backend nccl --scheme both --compile
#              (skipped when the example is absent)
#   slowtests, compiletests   in parallel, with the time left: -m "cuda and slow" per tests/ file,
#              -m cuda per compile_tests/ file (these rarely fit a first run: on a warm machine,
#              GPU_CHECK_STEPS=build,slowtests,compiletests)
#   summary    scripts/gpu_summary.py: a short table, printed LAST (card, versions, date, per-file
#              pass / fail / skip counts, crashes with their signal and test, sanitizer errors, bench)
#
# Files under $OUT (at most 8, for the device tool): gpu_check.log (everything printed),
# summary.txt, codegen_gpu.json, bench_gpu.json, bench_gpu.png, model_gpu.json, logs.tar.gz (one log per step and
# job, the pytest junit XML files, steps.tsv).
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds, default 450), GPU_CHECK_JOBS
# (parallel test/sanitizer processes, default 4), GPU_CHECK_STEPS (comma list, default
# env,build,backends,codegen,tests,sanitize,bench,model,scatter,ep,slowtests,compiletests; `sanitize` selects the
# sanitizer jobs of the tests phase), GPU_CHECK_FILES (space list of test files for the tests phase,
# default: every tests/test_*.py that has CUDA tests), GPU_CHECK_CPU_MARK (without a GPU: run the
# tests phase anyway with this marker, e.g. "not cuda", to check the script), GPU_CHECK_ASSUME_GPU=1
# (take the GPU path without a GPU: its steps fail or skip fast; to check the script), TORCH_CUDA_ARCH_LIST (default: this GPU's arch
# only, to halve nvcc time), CUDA_HOME.
set -u -o pipefail
ulimit -c 0  # no multi-GB core files of a crashed CUDA process in the checkout

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
STEPS=$LOGS/steps.tsv
: > "$STEPS"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-450}
JOBS=${GPU_CHECK_JOBS:-4}
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
SUMMARY_PY=python3
command -v python3 >/dev/null 2>&1 || SUMMARY_PY=$PY

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export FUSED_MOE_OPS_CACHE=${FUSED_MOE_OPS_CACHE:-$HOME/.cache/fused_moe_ops}
export MAX_JOBS=${MAX_JOBS:-16}

STEPS_WANTED=${GPU_CHECK_STEPS:-env,build,backends,codegen,tests,sanitize,bench,model,scatter,ep,slowtests,compiletests}
remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }
wanted() { case ",$STEPS_WANTED," in *",$1,"*) return 0;; *) return 1;; esac; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS"; }
note() { record "$1" "$2" 0 "$3"; echo "### $1: $2 ($3)"; }

# status_of RC SECONDS TIMEOUT: ok | FAIL(rc) | TIMEOUT | CRASH(SIGNAL)
status_of() {
  local rc=$1 dt=$2 t=$3
  if [ "$rc" -eq 0 ]; then echo ok
  elif [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ "$dt" -ge "$t" ]; }; then echo TIMEOUT
  elif [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ]; then echo "CRASH($(kill -l $(( rc - 128 )) 2>/dev/null || echo $(( rc - 128 ))))"
  else echo "FAIL($rc)"; fi
}

# step NAME CAP RESERVE CMD...: CMD alone, under timeout min(CAP, remaining - RESERVE).
step() {
  local name=$1 cap=$2 reserve=$3; shift 3
  if ! wanted "$name"; then record "$name" SKIPPED 0 "not in GPU_CHECK_STEPS"; return 0; fi
  local left=$(( $(remaining) - reserve ))
  local t=$(( cap < left ? cap : left ))
  if [ "$t" -lt 10 ]; then note "$name" SKIPPED "out of time budget"; return 0; fi
  echo "### $name (timeout ${t}s): $*"
  local t0 rc dt st detail
  t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" > "$LOGS/$name.log" 2>&1 < /dev/null
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  tail -n 25 "$LOGS/$name.log"
  st=$(status_of "$rc" "$dt" "$t")
  detail=$(grep -E "passed|failed|ERROR SUMMARY|^cpu |^cuda |^  cuda  |error|Error" "$LOGS/$name.log" | tail -n 1)
  [ -z "$detail" ] && detail=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1)
  detail=$(printf '%s' "$detail" | tr '\t' ' ' | cut -c1-150)
  record "$name" "$st" "$dt" "$detail"
  echo "### $name: $st in ${dt}s"
}

# ---- a pool of parallel jobs (tests phase, slow phase) -----------------------------------------
# add_job NAME CAP KIND CMD...   (KIND: pytest | sanitize | other: how the summary reads its log)
POOL_NAMES=(); POOL_CAPS=(); POOL_KINDS=(); POOL_CMDS=()
add_job() {
  POOL_NAMES+=("$1"); POOL_CAPS+=("$2"); POOL_KINDS+=("$3"); shift 3
  POOL_CMDS+=("$(printf '%q ' "$@")")
}
# one job: runs in the background, writes LOGS/NAME.log and LOGS/NAME.rc ("rc seconds timeout")
run_job() {
  local name=$1 t=$2 cmd=$3 t0 rc
  t0=$(date +%s)
  ( eval "timeout --kill-after=10 $t $cmd" ) > "$LOGS/$name.log" 2>&1 < /dev/null
  rc=$?
  echo "$rc $(( $(date +%s) - t0 )) $t" > "$LOGS/$name.rc"
}
# run_pool PHASE CAP RESERVE: runs the added jobs, JOBS at a time, in order, all ending within
# min(CAP, remaining - RESERVE); a job not started by then is SKIPPED.
run_pool() {
  local phase=$1 cap=$2 reserve=$3
  local left=$(( $(remaining) - reserve ))
  local t=$(( cap < left ? cap : left ))
  local deadline=$(( $(date +%s) + t ))
  echo "### $phase: ${#POOL_NAMES[@]} jobs, $JOBS at a time, until +${t}s"
  local i running=0 now jt
  local -a pids=()
  for i in "${!POOL_NAMES[@]}"; do
    while [ "$running" -ge "$JOBS" ]; do wait -n 2>/dev/null; running=$(jobs -rp | wc -l); done
    now=$(date +%s)
    jt=$(( deadline - now )); [ "${POOL_CAPS[$i]}" -lt "$jt" ] && jt=${POOL_CAPS[$i]}
    if [ "$jt" -lt 10 ]; then
      echo "SKIPPED (out of time budget)" > "$LOGS/${POOL_NAMES[$i]}.log"; echo "skip 0 0" > "$LOGS/${POOL_NAMES[$i]}.rc"
      continue
    fi
    echo "  start ${POOL_NAMES[$i]} (timeout ${jt}s) at +$(( now - START ))s"
    run_job "${POOL_NAMES[$i]}" "$jt" "${POOL_CMDS[$i]}" &
    pids+=($!)
    running=$(jobs -rp | wc -l)
  done
  [ "${#pids[@]}" -gt 0 ] && wait "${pids[@]}" 2>/dev/null
  for i in "${!POOL_NAMES[@]}"; do
    local name=${POOL_NAMES[$i]} rc dt jt2 st detail
    read -r rc dt jt2 < "$LOGS/$name.rc"
    if [ "$rc" = skip ]; then st=SKIPPED; detail="out of time budget"
    else
      st=$(status_of "$rc" "$dt" "$jt2")
      [ "${POOL_KINDS[$i]}" = pytest ] && [ "$rc" -eq 5 ] && st=none
      detail=$("$SUMMARY_PY" "$ROOT/scripts/gpu_summary.py" --detail "${POOL_KINDS[$i]}" "$LOGS/$name.log" 2>/dev/null | tr '\t' ' ')
    fi
    record "$name" "$st" "$dt" "$detail"
    echo "### $name: $st in ${dt}s  $detail"
  done
  POOL_NAMES=(); POOL_CAPS=(); POOL_KINDS=(); POOL_CMDS=()
}

echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET}s, $JOBS parallel jobs, OUT=$OUT, python=$(command -v "$PY")"

# ---- env ---------------------------------------------------------------------------------------
HAS_GPU=0
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then HAS_GPU=1; fi
[ "${GPU_CHECK_ASSUME_GPU:-0}" = 1 ] && HAS_GPU=1  # to walk the GPU path's plumbing on a machine without one
if [ $HAS_GPU = 1 ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}')" 2>/dev/null)
  export TORCH_CUDA_ARCH_LIST
fi
CS=$(command -v compute-sanitizer || { [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ] && echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"; } || true)

# expecttest (compile_tests/test_fusion_expected_graphs.py): the GPU machine has no network and no
# expecttest; the wheel in scripts/wheels/ goes in offline (or on PYTHONPATH as a zip).
if ! "$PY" -c "import expecttest" >/dev/null 2>&1; then
  whl=$(ls "$ROOT"/scripts/wheels/expecttest-*.whl 2>/dev/null | head -n 1)
  if [ -n "$whl" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$whl" >/dev/null 2>&1; then
    export PYTHONPATH=$PYTHONPATH:$WORK/site; echo "expecttest: installed from $whl"
  elif [ -n "$whl" ]; then
    export PYTHONPATH=$PYTHONPATH:$whl; echo "expecttest: $whl on PYTHONPATH (pip failed)"
  else
    echo "expecttest: missing, and no wheel in scripts/wheels/: its tests skip"
  fi
fi

envinfo() {
  date -u; uname -a; nvidia-smi 2>&1 | head -n 15
  command -v nvcc && nvcc --version | tail -n 2
  echo "compute-sanitizer: ${CS:-not found}"
  echo "CUDA_HOME=${CUDA_HOME:-} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
  "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for mod in ("torch", "triton", "pytest", "hypothesis", "expecttest", "numpy", "matplotlib", "transformers"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"{mod} MISSING ({type(e).__name__})")
import torch
print("cuda available", torch.cuda.is_available(), "cuda runtime", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
EOF
}
export PY CS
step env 40 0 bash -c "$(declare -f envinfo); envinfo"

# ---- build -------------------------------------------------------------------------------------
step build 150 150 "$PY" -m fused_moe_ops.build --verbose
step backends 30 150 "$PY" -m fused_moe_ops
# The first GPU run checks the model too: the table's registers / spills / shared memory / blocks per
# SM for this GPU's arch against the driver's (cuFuncGetAttribute, its occupancy calculator).
if [ $HAS_GPU = 1 ]; then
  step codegen 60 150 "$PY" -m fused_moe_ops.codegen --gpu-compare "$ROOT/docs/BENCHMARKS.md" --json "$OUT/codegen_gpu.json"
elif wanted codegen; then
  note codegen SKIPPED "no CUDA device visible to torch"
fi

# The CUDA test files of tests/: those that mark tests `cuda` (a file with none would only cost a start, and
# end as pytest's "no tests ran", exit 5: `cuda\b`, so that `cuda_emulated` is not taken for it).
if [ -n "${GPU_CHECK_FILES:-}" ]; then
  TEST_FILES=$GPU_CHECK_FILES
else
  # longest first (better packing of the parallel jobs), then the rest alphabetically
  TEST_FILES=""
  for f in tests/test_cuda_graphs.py tests/test_triton.py tests/test_op.py tests/test_export.py \
           tests/test_property.py tests/test_examples.py $(ls tests/test_*.py); do
    case " $TEST_FILES " in *" $f "*) continue;; esac
    [ -f "$f" ] && grep -qE 'pytest\.mark\.cuda\b|MARK_CUDA|\bDEVICES\b' "$f" && TEST_FILES="$TEST_FILES $f"
  done
fi
# pytest per file: -v (each test's name is printed when it starts, so a crash names it), junit XML.
# FUSED_MOE_OPS_TRITON_AUTOTUNE=0: one Triton config in tests (autotuning is the benchmark's business).
pytest_job() {  # pytest_job NAME CAP MARK FILE
  add_job "$1" "$2" pytest env FUSED_MOE_OPS_TRITON_AUTOTUNE=0 OMP_NUM_THREADS=4 TORCHINDUCTOR_COMPILE_THREADS=4 \
    "$PY" -m pytest -v -rfEs -p no:cacheprovider -o faulthandler_timeout=60 -m "$3" "$4" \
    --junitxml="$LOGS/junit_$1.xml"
}
sanitize_job() {  # sanitize_job NAME CAP TOOL BACKEND
  add_job "$1" "$2" sanitize env OMP_NUM_THREADS=4 "$CS" --tool "$3" --target-processes application-only \
    --report-api-errors no --error-exitcode 86 "$PY" scripts/sanitize_kernels.py --device cuda --backend "$4"
}
sanitize_scatter_job() {  # sanitize_scatter_job NAME CAP TOOL: the scatter form's CUDA kernels (CUB's sort included)
  add_job "$1" "$2" sanitize env OMP_NUM_THREADS=4 "$CS" --tool "$3" --target-processes application-only \
    --report-api-errors no --error-exitcode 86 "$PY" scripts/sanitize_scatter.py --device cuda
}

if [ $HAS_GPU = 0 ]; then
  for s in tests sanitize bench model scatter ep slowtests compiletests; do
    if wanted "$s"; then note "$s" SKIPPED "no CUDA device visible to torch"; fi
  done
  if [ -n "${GPU_CHECK_CPU_MARK:-}" ]; then
    # Dry run of the tests phase without a GPU (to check this script): the same per-file jobs with
    # another marker, and the sanitizer script on CPU without compute-sanitizer.
    for f in $TEST_FILES; do pytest_job "$(basename "$f" .py)" 150 "$GPU_CHECK_CPU_MARK" "$f"; done
    add_job sanitize_cpu 120 sanitize "$PY" scripts/sanitize_kernels.py --device cpu --backend both --quick
    run_pool "tests (dry run on CPU, -m '$GPU_CHECK_CPU_MARK')" 150 0
  fi
else
  # ---- tests + sanitizers, in parallel -----------------------------------------------------------
  add_sanitizers() {
    if ! wanted sanitize; then return 0; fi
    if [ -z "$CS" ]; then note sanitize SKIPPED "compute-sanitizer not found"; return 0; fi
    sanitize_job memcheck_cuda 120 memcheck cuda
    sanitize_job racecheck_cuda 120 racecheck cuda
    sanitize_job synccheck_cuda 120 synccheck cuda
    sanitize_job memcheck_triton 120 memcheck triton
    sanitize_scatter_job memcheck_scatter 90 memcheck
    sanitize_scatter_job racecheck_scatter 90 racecheck
  }
  n=0
  for f in $TEST_FILES; do
    if wanted tests; then pytest_job "$(basename "$f" .py)" 150 "cuda and not slow" "$f"; fi
    n=$(( n + 1 ))
    # the sanitizer jobs start once the longest test files are running
    if [ $n -eq 3 ]; then add_sanitizers; fi
  done
  if [ $n -lt 3 ]; then add_sanitizers; fi
  if [ ${#POOL_NAMES[@]} -gt 0 ]; then run_pool tests 150 170; fi

  # ---- measurements, alone on the GPU ------------------------------------------------------------
  # dynamic: one compile per (topk, K) with the token count symbolic, as serving engines compile
  # (88 static compiles would not fit the step's time)
  step bench 150 75 "$PY" -m fused_moe_ops.bench --device cuda --grid pass-vs-inductor --compile dynamic \
    --json "$OUT/bench_gpu.json" --plot "$OUT/bench_gpu.png"
  step model 120 30 "$PY" -m fused_moe_ops.bench --device cuda --model --model-set qwen3_moe,tiny \
    --model-m 4096,512,64,8,1 --budget 0.05 --json "$OUT/model_gpu.json"
  step scatter 30 0 "$PY" scripts/scatter_timing.py --iters 50
  if [ -f examples/expert_parallel.py ]; then
    step ep 45 0 "$PY" -m torch.distributed.run --nproc-per-node 1 examples/expert_parallel.py \
      --backend nccl --scheme both --compile
  elif wanted ep; then
    note ep SKIPPED "examples/expert_parallel.py not in this checkout"
  fi

  # ---- with the time left: slow CUDA tests, the fusion pass on CUDA --------------------------------
  if wanted slowtests; then
    for f in tests/test_op.py tests/test_triton.py tests/test_export.py tests/test_examples.py tests/test_cuda_graphs.py; do
      [ -f "$f" ] && grep -q "mark.slow" "$f" && pytest_job "slow_$(basename "$f" .py)" 300 "cuda and slow" "$f"
    done
  fi
  if wanted compiletests; then
    for f in compile_tests/test_*.py; do
      [ -f "$f" ] && pytest_job "compile_$(basename "$f" .py)" 300 "cuda" "$f"
    done
  fi
  if [ ${#POOL_NAMES[@]} -gt 0 ]; then run_pool slow 600 0; fi
fi

# ---- logs + summary (LAST) -----------------------------------------------------------------------
tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs 2>/dev/null || true
echo "total $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
"$SUMMARY_PY" "$ROOT/scripts/gpu_summary.py" "$OUT" "$STEPS" || cat "$STEPS"
rm -rf "$WORK"
exec >&- 2>&-          # let tee write the summary out before this script (and the device call) ends
wait "$TEE_PID" 2>/dev/null
exit 0
