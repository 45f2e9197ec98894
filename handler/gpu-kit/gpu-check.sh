#!/bin/sh
# Runs gpu-check from this kit on a GPU host that has torch==2.11.0 installed (python3), no
# internet needed: libtorch is found through that torch's lib directory.
set -e
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
TORCH_LIB="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec ./runpod-worker gpu-check --python "$PYTHON" "$@"
