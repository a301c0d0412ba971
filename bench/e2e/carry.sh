#!/usr/bin/env bash
# Here (project root), before the device calls of bench/e2e/run.sh: packs what they carry into
# .carry/e2e-cli and .carry/e2e (git-ignored, as all of .carry/).
#
#   .carry/e2e-cli/scattermoe.xz          the CLI (stripped; the rewrite runs on the device)
#   .carry/e2e/libscattermoe_ort.so.xz    the op library with its CUDA kernels (stripped)
#   .carry/e2e/whl/                       onnxruntime-genai 0.18.0 (CPython 3.12, the device's) and onnx-ir 1.1.0
#                                         (the builder's IR library, newer than the device's 1.0.0), from PyPI
#
# Needs target/release/scattermoe and target/release/libscattermoe_ort.so built with nvcc
# (`scripts/setup-nvcc.sh`, then `cargo build --release --workspace` without SCATTERMOE_NO_KERNELS):
# a library built without kernels loads on the device but its CUDA ops fail.
set -euo pipefail
cd "$(dirname "$0")/../.."
cli=${CLI:-target/release/scattermoe}
lib=${LIB:-target/release/libscattermoe_ort.so}
for f in "$cli" "$lib"; do [ -f "$f" ] || { echo "missing $f: build it first" >&2; exit 1; }; done
if ! grep -q "sm_90a" "$lib"; then
  echo "warning: $lib names no sm_90a kernel: was it built with nvcc?" >&2
fi
mkdir -p .carry/e2e-cli .carry/e2e/whl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
objcopy --strip-debug "$cli" "$tmp/scattermoe" && xz -T0 -6 -c "$tmp/scattermoe" > .carry/e2e-cli/scattermoe.xz
objcopy --strip-debug "$lib" "$tmp/lib.so" && xz -T0 -6 -c "$tmp/lib.so" > .carry/e2e/libscattermoe_ort.so.xz
rm -f .carry/e2e/whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .carry/e2e/whl onnxruntime-genai==0.18.0 onnx-ir==1.1.0
du -sh .carry/e2e-cli .carry/e2e
git rev-parse HEAD > .carry/e2e/COMMIT
