#!/usr/bin/env bash
# Passes every test on a fresh machine: installs what it needs (project venvs with pinned ONNX
# Runtime 1.31.1 and 1.20.1, and PyTriton for the serving test; ONNX Runtime's C header; nvcc 13.0
# from PyPI, so every CUDA kernel is compiled on every run),
# builds the workspace, then runs the Rust and Python suites.
# GPU tests run only where a GPU is present; they say so when skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-python.sh
# ONNX Runtime's C header, for compiling the README's C snippet (Debian 13's libonnxruntime-dev, unpacked)
export SCATTERMOE_ORT_INCLUDE=${SCATTERMOE_ORT_INCLUDE:-$(scripts/setup-ort-headers.sh | tail -n 1)}
export NVCC=${NVCC:-$(scripts/setup-nvcc.sh | tail -n 1)}
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n 1)}
# With TensorRT's headers (docs/tensorrt.md) the TensorRT plugin is built and tested; its
# registry test needs TensorRT-RTX from PyPI. Without them both say they were skipped.
if [ -f "${TENSORRT_INCLUDE_DIR:-third_party/tensorrt/include}/NvInferRuntime.h" ]; then
  export SCATTERMOE_TRT_PYTHON=${SCATTERMOE_TRT_PYTHON:-$(scripts/setup-tensorrt.sh | tail -n 1)}
fi
cargo build --release --workspace
export SCATTERMOE_ORT_LIB=${SCATTERMOE_ORT_LIB:-$PWD/target/release/libscattermoe_ort.so}
cargo test --release --workspace
# python/tests/test_wheel.py builds the wheel (scripts/build-wheel.sh: maturin reuses the build above)
# and installs it into fresh venvs with ONNX Runtime 1.31.1 and 1.20.1 (SCATTERMOE_WHEEL=0 skips it).
.venv/bin/python -m pytest python/tests -q
# Bounded fuzzing (about a minute, plus cargo-fuzz's first build): docs/hardening.md.
fuzz/ci.sh
