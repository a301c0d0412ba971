#!/usr/bin/env bash
# Builds the scattermoe wheel (maturin; PyO3 abi3, CPython 3.9+) from what
# `cargo build --release --workspace` built: the op library libscattermoe_ort.so (with the CUDA
# kernels when nvcc was found), libscattermoe_trt.so when it was built with TensorRT's headers,
# and the Python extension (python/scattermoe-py), which maturin rebuilds only for its Python
# configuration. Prints the wheel's path on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
venv=$root/.venv-maturin
if [ ! -x "$venv/bin/maturin" ]; then
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check maturin==1.16.0
fi
pkg=python/scattermoe-py/python/scattermoe
lib=target/release/libscattermoe_ort.so
if [ ! -f "$lib" ]; then
  echo "$lib is missing: run cargo build --release --workspace first" >&2
  exit 1
fi
# The workspace's libraries as built, less their debug info (the release profile keeps line
# tables for backtraces; the wheel ships the code only).
objcopy --strip-debug "$lib" "$pkg/libscattermoe_ort.so"
rm -f "$pkg/libscattermoe_trt.so"
trt=target/release/libscattermoe_trt.so
# Without TensorRT's headers the plugin crate builds a library with no plugins: not shipped.
if [ -f "$trt" ] && nm -D --defined-only "$trt" | grep -qw getCreators; then
  objcopy --strip-debug "$trt" "$pkg/libscattermoe_trt.so"
fi
rm -rf target/wheels
"$venv/bin/maturin" build --release --strip -m python/scattermoe-py/Cargo.toml -o target/wheels >&2
ls target/wheels/scattermoe-*.whl
