#!/usr/bin/env sh
# Installs pagedserve into ./.venv with the torch build this machine needs: the CUDA build and the `gpu` extra
# (CuPy) where an NVIDIA GPU is visible, the CPU-only build otherwise (PyPI's default Linux torch is the CUDA one,
# 5.7 GB, useless without a GPU). `./install.sh --dev` adds the test and lint tools. An existing torch is kept.
# PAGEDSERVE_TORCH_INDEX_URL replaces the CPU build's index (https://download.pytorch.org/whl/cpu), e.g. a mirror.
set -eu
cd "$(dirname "$0")"
extras=""
if [ "${1:-}" = "--dev" ]; then extras="dev"; fi
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
python=.venv/bin/python
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    has_gpu=1
    extras="${extras:+$extras,}gpu"
else
    has_gpu=0
fi
if "$python" -c "import torch" 2>/dev/null; then
    echo "install.sh: keeping the installed torch $("$python" -c 'import torch; print(torch.__version__)')"
elif [ "$has_gpu" = 1 ]; then
    echo "install.sh: NVIDIA GPU found: installing the CUDA build of torch"
    "$python" -m pip install torch
else
    echo "install.sh: no NVIDIA GPU: installing the CPU-only build of torch"
    "$python" -m pip install torch --index-url "${PAGEDSERVE_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi
"$python" -m pip install -e ".${extras:+[$extras]}"
echo "install.sh: done; activate with: . .venv/bin/activate"
