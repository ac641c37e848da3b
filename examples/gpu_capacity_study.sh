#!/usr/bin/env bash
# Where does the full cache run out of memory, by length and by batch, while StreamingLLM and
# H2O do not? Llama-2-7B's architecture with random weights (speed and memory do not depend
# on weight values; nothing is downloaded), bf16, on one GPU, sized from the card's memory so
# that the full cache runs out between the last two lengths (and within the batch sizes):
#
#   bash examples/gpu_capacity_study.sh [OUT_DIR]              # ~1 minute on an H100
#   MAX_MEMORY=40GB bash examples/gpu_capacity_study.sh out     # pretend the card is smaller
#
# Writes OUT_DIR/capacity.json (kvstress sweep at a fixed batch, lengths 8k → 64k) and
# OUT_DIR/capacity-batch.json (kvstress batch at a fixed length, increasing batch sizes);
# LENGTH_AXIS=0 or BATCH_AXIS=0 leaves one of them out. Settings come from the environment: KVSTRESS (the command,
# default "kvstress"), MODEL, DEVICE, DTYPE, LENGTHS, BATCH, BATCH_LENGTH, BATCH_SIZES, CHUNK,
# DECODE_STEPS, CAPACITY, TEXT (a text file; default: generated), MAX_MEMORY, and for a model
# other than llama-2-7b WEIGHT_BYTES and KV_BYTES_PER_TOKEN. Plots need matplotlib.
set -euo pipefail
out=${1:-capacity-study}
mkdir -p "$out"
read -r -a kvstress <<<"${KVSTRESS:-kvstress}"
python=${PYTHON:-python3}
model=${MODEL:-random:llama-2-7b}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bfloat16}
lengths=${LENGTHS:-8k,16k,32k,64k}
batch_length=${BATCH_LENGTH:-16k}
chunk=${CHUNK:-1024}
capacity=${CAPACITY:-256}
budget=()
[ -n "${MAX_MEMORY:-}" ] && budget=(--max-memory "$MAX_MEMORY")

# Sizes: a batch whose full cache fills 4/3 of the free memory at the longest length (so
# half of that length fits), and two batch sizes at BATCH_LENGTH: half of what fits and twice.
read -r batch batch_sizes text_chars < <(
    BATCH="${BATCH:-}" BATCH_SIZES="${BATCH_SIZES:-}" LENGTHS="$lengths" BATCH_LENGTH="$batch_length" \
    DEVICE="$device" MAX_MEMORY="${MAX_MEMORY:-}" "$python" - <<'EOF'
import math, os
import torch
from kvstress.config import parse_length
from kvstress.memory import parse_size

weights = int(os.environ.get("WEIGHT_BYTES") or 2 * 6_738_415_616)   # llama-2-7b, bf16
kv = int(os.environ.get("KV_BYTES_PER_TOKEN") or 2 * 32 * 4096 * 2)  # K and V, 32 layers × 4096, bf16
lengths = [parse_length(x) for x in os.environ["LENGTHS"].split(",")]
batch_length = parse_length(os.environ["BATCH_LENGTH"])
if os.environ["MAX_MEMORY"]:
    total = parse_size(os.environ["MAX_MEMORY"])
elif os.environ["DEVICE"].startswith("cuda"):
    total = torch.cuda.get_device_properties(0).total_memory
else:
    total = weights + 64 * kv * lengths[-1]
free = max(total - weights - (4 << 30 if os.environ["DEVICE"].startswith("cuda") else 0), kv * lengths[0])
batch = int(os.environ["BATCH"] or max(1, math.ceil(free / (0.75 * lengths[-1] * kv))))
fits = max(1, free // (batch_length * kv))
sizes = os.environ["BATCH_SIZES"] or f"{max(1, fits // 2)},{2 * fits}"
most = max(int(s) for s in sizes.split(","))
print(batch, sizes, max(batch * (lengths[-1] + 64), most * (batch_length + 64)) + 1000)
EOF
)
echo "capacity study: $model on $device, batch $batch to $lengths; batch sizes $batch_sizes at $batch_length"

text=${TEXT:-}
if [ -z "$text" ]; then
    text=$(mktemp --suffix=.txt)
    "$python" - "$text" "$text_chars" <<'EOF'
import random, sys
words = "the of and to a in that is was he for it with as his on be at by i this had not".split()
rng, parts, size = random.Random(0), [], 0
while size < int(sys.argv[2]):
    parts.append(rng.choice(words)); size += len(parts[-1]) + 1
open(sys.argv[1], "w", encoding="utf-8").write(" ".join(parts))
EOF
fi

common=(--model "$model" --device "$device" --dtype "$dtype" --dataset "$text" --chunk "$chunk"
        --decode-steps "${DECODE_STEPS:-4}" --method baseline --method "streaming_4_$capacity"
        --method "h2o_4_$((capacity / 8))_$capacity" --force "${budget[@]}")
if [ "${LENGTH_AXIS:-1}" != 0 ]; then
    "${kvstress[@]}" sweep "${common[@]}" --lengths "$lengths" --batch-size "$batch" --out "$out/capacity.json"
fi
if [ "${BATCH_AXIS:-1}" != 0 ]; then
    "${kvstress[@]}" batch "${common[@]}" --length "$batch_length" --batch-sizes "$batch_sizes" \
        --out "$out/capacity-batch.json"
fi
if [ "${LENGTH_AXIS:-1}" != 0 ] && [ -z "${NO_PLOT:-}" ] && "$python" -c "import matplotlib" 2>/dev/null; then
    "${kvstress[@]}" plot "$out/capacity.json" --out "$out/capacity.png"
fi
