#!/usr/bin/env bash
# The ops on ONNX Runtime's CUDA EP (tests/gpu/test_ort_cuda.py), on the device machine.
# onnxruntime-gpu travels in parts (4 of 56 MB with PART_MB=56), one device call each, back to back.
#
# Here (project root):
#   PART_MB=56 ../shared/tools/ort-gpu-parts.sh               # writes .carry/ort-gpu/p0..pN
#   cargo build --release -p scattermoe-ort
#   mkdir -p .carry/ort && objcopy --strip-debug target/release/libscattermoe_ort.so .carry/ort/libscattermoe_ort.so
# Device calls, back to back (the machine stays warm ~30 s between calls):
#   carry [".carry/ort-gpu/p0"]:  mkdir -p /tmp/ortparts && cp .carry/ort-gpu/p0/* /tmp/ortparts/
#   carry [".carry/ort-gpu/pI"]:  cp .carry/ort-gpu/pI/* /tmp/ortparts/            (each part but the last)
#   carry [".carry/ort-gpu/pN", ".carry/ort"]:  bash tests/gpu/run_ort_cuda.sh .carry/ort-gpu/pN
# Output: $OUT/ort-cuda.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/smoe-out}; mkdir -p "$OUT"
last=${1:-}
if [ -n "$last" ]; then
  bash scripts/gpu/ort-unpack.sh "$last" || exit 1
fi
libs=$(ls -d /opt/torch/.venv/lib/python3.12/site-packages/nvidia/*/lib | paste -sd:)
export LD_LIBRARY_PATH=$libs:/tmp/ortgpu/onnxruntime/capi:${LD_LIBRARY_PATH:-}
PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/ortgpu timeout "${ORT_S:-300}" python3 tests/gpu/test_ort_cuda.py \
  --lib "${LIB:-.carry/ort/libscattermoe_ort.so}" 2>&1 | tee "$OUT/ort-cuda.log"
echo "ort-cuda rc=${PIPESTATUS[0]}"
