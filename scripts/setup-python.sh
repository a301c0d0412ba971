#!/usr/bin/env bash
# Creates the project's Python environments (idempotent; re-run after changing a pin):
#   .venv         onnxruntime 1.31.1 (the newest ORT we claim), onnx, numpy, pytest: tests and benchmarks
#   .venv-ort120  onnxruntime 1.20.1 (the oldest ORT we claim): the compatibility test
#   .venv-serving PyTriton 0.7.0 (a Triton server with its Python backend) and tritonclient 2.73,
#                 onnxruntime 1.31.1: the serving test (python/tests/test_serving.py). Its own venv
#                 because PyTriton requires numpy < 2.
# Prints nothing but errors when already up to date.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}

make_venv() {
  local dir=$1; shift
  local stamp="$dir/.pins"
  local want="$*"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  echo "setting up $dir: $want" >&2
  rm -rf "$dir"
  "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
  echo "$want" > "$stamp"
}

make_venv "$root/.venv" onnxruntime==1.31.1 onnx==1.20.1 numpy==2.3.5 ml-dtypes==0.5.4 pytest==8.4.2
make_venv "$root/.venv-ort120" onnxruntime==1.20.1 onnx==1.20.1 numpy==2.1.3 ml-dtypes==0.5.4 pytest==8.4.2
make_venv "$root/.venv-serving" nvidia-pytriton==0.7.0 "tritonclient[http,grpc]==2.73.0" onnxruntime==1.31.1 numpy==1.26.4
