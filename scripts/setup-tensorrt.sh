#!/usr/bin/env bash
# Creates .venv-trtrtx: TensorRT-RTX 1.7.1 from PyPI (its plugin registry and ONNX parser; the
# full TensorRT builder is not on PyPI) with CUDA 13's runtime, for the plugin registry test
# (plugins/tensorrt/tests/registry.rs). Idempotent; prints the environment's python last.
# scripts/test.sh runs it only where TensorRT's headers are present (docs/tensorrt.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
dir="$root/.venv-trtrtx"
want="tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116 nvidia-cuda-runtime==13.0.96 numpy==2.3.5"
if ! [ -f "$dir/.pins" ] || [ "$(cat "$dir/.pins")" != "$want" ]; then
  echo "setting up $dir: $want" >&2
  rm -rf "$dir"
  "$py" -m venv "$dir"
  # shellcheck disable=SC2086
  "$dir/bin/python" -m pip install -q --disable-pip-version-check $want
  echo "$want" > "$dir/.pins"
fi
echo "$dir/bin/python"
