#!/usr/bin/env bash
# Installs nvcc (CUDA 13.0) from PyPI into .venv-nvcc, so build.rs compiles the CUDA kernels on
# any machine, GPU or not. Every piece is pinned to 13.0: a newer nvidia-nvvm breaks 13.0's ptxas.
# Idempotent; prints the nvcc path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.venv-nvcc
pins="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85"
if [ ! -f "$venv/.pins" ] || [ "$(cat "$venv/.pins")" != "$pins" ]; then
  echo "setting up $venv: $pins" >&2
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q --disable-pip-version-check $pins
  echo "$pins" > "$venv/.pins"
fi
ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc
