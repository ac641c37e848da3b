#!/usr/bin/env bash
# Where does the full cache run out of memory? Llama-2-7B's architecture with random
# weights (speed and memory do not depend on weight values; no download), bf16,
# streamed to 128k tokens on one GPU, against StreamingLLM and H2O at capacity 1024.
#
#   bash examples/gpu_capacity_study.sh                 # all of the GPU's memory
#   bash examples/gpu_capacity_study.sh --max-memory 40GB   # pretend it is smaller
set -euo pipefail
kvstress sweep \
    --model random:llama-2-7b --device cuda --dtype bfloat16 \
    --method baseline --method streaming_4_1024 --method h2o_4_128_1024 \
    --lengths 4k,8k,16k,32k,64k,96k,128k --chunk 2048 --decode-steps 32 \
    --dataset shakespeare --out capacity_study.json --force "$@"
kvstress plot capacity_study.json --out capacity_study.png
