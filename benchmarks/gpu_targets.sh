#!/usr/bin/env bash
# Issue 6's targets on one GPU, eager and with --compile, in one go. Not yet run: expect
# 15-20 minutes on an H100 (each --compile run spends 1-2 minutes compiling). Prints each
# script's table; the targets' results files land in gpu-results/.
#
#   bash benchmarks/gpu_targets.sh              # from the repository root, CUDA torch installed
#
# Model: random:llama-2-7b in bf16 (speed and memory do not depend on weight values, so
# nothing is downloaded); text: the bundled Shakespeare.
set -euo pipefail
out=gpu-results
mkdir -p "$out"
python -c "import kvstress" 2>/dev/null || pip install -q -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# What the cache itself costs per decode step, all 32 Llama-2-7B layers, without the model.
python benchmarks/cache_step.py --device cuda --dtype bfloat16 --layers 32 --context 32768 --steps 50

# H2O against StreamingLLM at 8k and 32k, and each against itself at 2k (targets 1 and 2),
# interleaved in one run, eager and then compiled (target 4's step).
for compile in "" "--compile"; do
    python benchmarks/interleaved_tpot.py --model random:llama-2-7b --device cuda --dtype bfloat16 \
        --context 2048,8192,32768 --chunk 2048 --methods streaming_4_256,h2o_4_32_256 --rounds 6 --steps 20 $compile
done

# Targets 1–5 as ratios from the sweep runner: eager, then the compressed caches compiled.
python benchmarks/targets.py --out "$out/targets-eager.json"
python benchmarks/targets.py --compile --out "$out/targets-compiled.json"
