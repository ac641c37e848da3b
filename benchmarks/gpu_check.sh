#!/usr/bin/env bash
# Issue 15's GPU proof in one go, within 8 minutes on one H100/H200 (so a second run fits a
# 15-minute lease): installs what the machine lacks from wheels carried alongside (no network),
# runs `pytest -m gpu`, then the targets, prints one short table and leaves the results files.
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR                                   # from the repository root
#   KVSTRESS_GPU_CHECK_REHEARSAL=1 bash benchmarks/gpu_check.sh /tmp/rehearsal # the same steps on CPU, tiny sizes
#
# Stages (estimated seconds on an H100; each prints a timestamp and is skipped when what is
# left of GPU_CHECK_BUDGET_S, default 480, is less than half its estimate; a stage running
# over what is left is stopped with Ctrl-C, so a sweep keeps what it measured):
#   setup      10  versions, nvidia-smi, install missing packages from $WHEELS (benchmarks/wheels)
#   pytest    120  pytest -m gpu tests/test_gpu.py: NVML samples, a real OOM, CUDA-graph decode
#   sweep      60  kvstress sweep, random:llama-2-7b bf16, 2k,8k,32k,50000: targets 2, 3, 5
#   reference 200  benchmarks/reference_step.py: interleaved steps, eager and compiled (3 compiles),
#                  StaticCache + compile, DynamicCache, bandwidth floor: targets 1, 2, 4
#   capacity   45  examples/gpu_capacity_study.sh by length (target 6)
#   batch      40  ... and by batch (target 6)
#   table       5  benchmarks/gpu_table.py -> RESULTS_DIR/summary.md
# RESULTS_DIR gets at most 7 files (gpu_check.log, pytest.log, sweep.json, reference.json,
# capacity.json, capacity-batch.json, summary.md), so it fits what a device call brings back.
#
# Settings from the environment: PYTHON (default python3), WHEELS (default benchmarks/wheels),
# GPU_CHECK_BUDGET_S. The script exits 1 when a stage failed, 0 otherwise (targets missed are
# results, shown in the table, not failures).
set -uo pipefail
if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh RESULTS_DIR" >&2
    exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
results=$(mkdir -p "$1" && cd "$1" && pwd)
exec > >(tee "$results/gpu_check.log") 2>&1

python=${PYTHON:-python3}
wheels=${WHEELS:-$repo/benchmarks/wheels}
work=$(mktemp -d "${TMPDIR:-/tmp}/kvstress-gpu-check.XXXXXX")
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo:$work/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${KVSTRESS_GPU_CHECK_REHEARSAL:-0}" = 1 ]; then
    echo "REHEARSAL: CPU, tiny models and lengths; GPU-only checks skip themselves"
    export KVSTRESS_GPU_REHEARSAL=1
    budget=${GPU_CHECK_BUDGET_S:-1500}
    model=tiny-random device=cpu dtype=float32 capacity=64 chunk=128 decode_steps=6
    sweep_lengths=256,512,1024,2048 ttft_length=1024
    ref_contexts=256,512,1024,2048 ref_context=1024 target1=512,1024 rounds=2 steps=5 compile_estimate=20
    capacity_env=(LENGTHS=256,512,1024,2048 BATCH_LENGTH=512 MAX_MEMORY=2000000 WEIGHT_BYTES=435456
                  KV_BYTES_PER_TOKEN=512 CHUNK=128)
else
    budget=${GPU_CHECK_BUDGET_S:-480}
    model=random:llama-2-7b device=cuda dtype=bfloat16 capacity=256 chunk=2048 decode_steps=20
    sweep_lengths=2k,8k,32k,50000 ttft_length=32768
    ref_contexts=2048,8192,32768,50000 ref_context=32768 target1=8192,32768 rounds=5 steps=10 compile_estimate=60
    capacity_env=(LENGTHS=8k,16k,32k,64k BATCH_LENGTH=16k CHUNK=1024)
fi
h2o=h2o_4_$((capacity / 8))_$capacity
streaming=streaming_4_$capacity

started=$(date +%s)
failed=()
skipped=()
left() { echo $((budget - ($(date +%s) - started))); }

# stage NAME ESTIMATE_S FUNCTION ARGS...: run it; $limit (what is left of the budget) is the time
# limit the function gives its long command through `bounded`.
bounded() { timeout -s INT -k 30 "$limit" "$@"; }
stage() {
    local name=$1 estimate=$2
    shift 2
    local remaining
    remaining=$(left)
    if [ "$remaining" -lt $((estimate / 2)) ]; then
        echo "== $(date -u +%H:%M:%S) +$(($(date +%s) - started))s SKIP $name: ${remaining}s left of ${budget}s, it needs ~${estimate}s"
        skipped+=("$name")
        return 0
    fi
    echo "== $(date -u +%H:%M:%S) +$(($(date +%s) - started))s $name (estimate ${estimate}s, ${remaining}s left)"
    local began=$(date +%s) status
    limit=$remaining
    "$@"
    status=$?
    echo "== $(date -u +%H:%M:%S) $name took $(($(date +%s) - began))s, exit $status"
    if [ "$status" -ne 0 ]; then
        failed+=("$name (exit $status)")
    fi
}

setup() {
    "$python" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
        "cuda", torch.version.cuda, "available", torch.cuda.is_available())' || return 1
    if [ "$device" = cuda ] && ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "no CUDA device: this is the GPU check (KVSTRESS_GPU_CHECK_REHEARSAL=1 rehearses it on CPU)"
        return 1
    fi
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    # Distributions whose module is missing (manifest: NAME==VERSION IMPORT_NAME).
    local missing
    missing=$("$python" - "$repo/benchmarks/wheels/manifest.txt" <<'EOF'
import importlib.util, sys
for line in open(sys.argv[1], encoding="utf-8"):
    if line.strip() and not line.startswith("#"):
        requirement, module = line.split()
        if importlib.util.find_spec(module) is None:
            print(requirement.split("==")[0])
EOF
    ) || return 1
    local have=() absent=() dist file
    for dist in $missing; do
        file=$(find "$wheels" -maxdepth 1 -iname "$(echo "$dist" | tr -- '-.' '__')-*.whl" 2>/dev/null | head -1)
        if [ -n "$file" ]; then have+=("$file"); else absent+=("$dist"); fi
    done
    if [ ${#have[@]} -ne 0 ]; then
        echo "installing ${#have[@]} wheels from $wheels into $work/site: $(basename -a "${have[@]}" | tr '\n' ' ')"
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --target "$work/site" "${have[@]}" || return 1
    fi
    if [ ${#absent[@]} -ne 0 ]; then
        # Fatal only if the import check below fails (a newer huggingface_hub may not use httpx, say).
        echo "no wheel in $wheels for: ${absent[*]} (bash benchmarks/wheels/fetch.sh fetches them, where PyPI is reachable)"
    fi
    "$python" - <<'EOF' || return 1
import importlib.metadata as md
import kvstress.cli, kvstress.caches.compiled, pytest  # noqa: F401  what every later stage imports
print(" ".join(f"{d} {md.version(d)}" for d in ("transformers", "huggingface_hub", "typer", "rich", "nvidia-ml-py", "pytest")))
EOF
    # Random weights read bytes as tokens: any text will do, and nothing needs the network.
    "$python" - "$work/text.txt" <<'EOF'
import random, sys
words = "the of and to a in that is was he for it with as his on be at by i this had not".split()
rng, parts, size = random.Random(0), [], 0
while size < 200_000:
    parts.append(rng.choice(words)); size += len(parts[-1]) + 1
open(sys.argv[1], "w", encoding="utf-8").write(" ".join(parts))
EOF
}

gpu_tests() {
    bounded "$python" -m pytest -m gpu tests/test_gpu.py -q -rsxX -n 0 -p no:cacheprovider 2>&1 | tee "$results/pytest.log"
}

sweep() {
    bounded "$python" -m kvstress sweep --model "$model" --device "$device" --dtype "$dtype" --dataset "$work/text.txt" \
        --lengths "$sweep_lengths" --chunk "$chunk" --decode-steps "$decode_steps" \
        -m baseline -m "$streaming" -m "$h2o" --out "$results/sweep.json" --force
}

reference() {
    # It skips the compiled steps (two compressed graphs, then StaticCache's, ~60 s each) that
    # would not fit in what is left, and saves its file after every phase.
    bounded "$python" benchmarks/reference_step.py --model "$model" --device "$device" --dtype "$dtype" \
        --capacity "$capacity" --contexts "$ref_contexts" --reference-context "$ref_context" --chunk "$chunk" \
        --rounds "$rounds" --steps "$steps" --budget-s $(($(left) - 20)) \
        --compile-estimate-s "$compile_estimate" --out "$results/reference.json"
}

capacity_study() {
    bounded env "${capacity_env[@]}" KVSTRESS="$python -m kvstress" PYTHON="$python" MODEL="$model" DEVICE="$device" \
        DTYPE="$dtype" CAPACITY="$capacity" NO_PLOT=1 "$@" bash examples/gpu_capacity_study.sh "$results"
}

table() {
    "$python" benchmarks/gpu_table.py "$results" --capacity "$capacity" --target1-contexts "$target1" \
        --reference-context "$ref_context" --ttft-length "$ttft_length"
}

stage setup 10 setup
if [ ${#failed[@]} -ne 0 ]; then
    echo "setup failed: nothing else can run"
    exit 1
fi
stage pytest 120 gpu_tests
stage sweep 60 sweep
stage reference 200 reference
stage capacity 45 capacity_study BATCH_AXIS=0
stage batch 40 capacity_study LENGTH_AXIS=0
echo "== $(date -u +%H:%M:%S) +$(($(date +%s) - started))s table"
table || failed+=("table")
echo
echo "total $(($(date +%s) - started))s of ${budget}s; results in $results"
[ ${#skipped[@]} -eq 0 ] || echo "skipped: ${skipped[*]}"
rm -rf "$work"
if [ ${#failed[@]} -ne 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
