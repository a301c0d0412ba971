#!/usr/bin/env bash
# Device side of bench/gpu_bench.py: one command, one table, one chart (see that file's docstring).
#
# Assumes onnxruntime-gpu unpacked at /tmp/ortgpu, as tests/gpu/run_ort_cuda.sh leaves it. If it is
# not there yet, ORT_LAST_PART=<dir of the last part> finishes the unpacking first (the earlier parts
# already copied to /tmp/ortparts by the calls tests/gpu/run_ort_cuda.sh describes).
#
# Here (project root), before the device call:
#   cargo build --release -p scattermoe-ort
#   mkdir -p .carry/ort && objcopy --strip-debug target/release/libscattermoe_ort.so .carry/ort/libscattermoe_ort.so
#   scripts/gpu/build_kernels.sh target/scattermoe-kernels <nvcc> all      # our fatbins (tests/gpu/RESULTS.md)
#   ScatterMoE's Triton code, git-ignored, never committed: the search tool's fetch of
#   github:shawntan/scattermoe gives a git dir G; then
#     mkdir -p .carry/scattermoe && git --git-dir=G archive HEAD scattermoe LICENSE | tar x -C .carry/scattermoe
#     git --git-dir=G rev-parse HEAD > .carry/scattermoe/COMMIT
# Device call (carry .carry/ort, target/scattermoe-kernels, .carry/scattermoe):
#   bash bench/run_gpu_bench.sh
# or, unpacking the last onnxruntime-gpu part in the same call (also carry .carry/ort-gpu/pN):
#   ORT_LAST_PART=.carry/ort-gpu/pN bash bench/run_gpu_bench.sh
# Extra arguments go to gpu_bench.py (e.g. --shapes qwen3 --tokens 1,1024 --peers ours,kernels).
# Output in $OUT: gpu_bench.md (tables), gpu_bench.json, gpu_bench.png, gpu-bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/smoe-out}; mkdir -p "$OUT"
if [ ! -d /tmp/ortgpu/onnxruntime ] && [ -n "${ORT_LAST_PART:-}" ]; then
  mkdir -p /tmp/ortparts /tmp/ortgpu && cp "$ORT_LAST_PART"/* /tmp/ortparts/ \
    && cat /tmp/ortparts/part* | xz -d -T8 | tar x -C /tmp/ortgpu || exit 1
fi
[ -d /tmp/ortgpu/onnxruntime ] || echo "warning: /tmp/ortgpu/onnxruntime missing: the ORT columns will be '-'"
libs=$(ls -d /opt/torch/.venv/lib/python3.12/site-packages/nvidia/*/lib 2>/dev/null | paste -sd:)
export LD_LIBRARY_PATH=$libs:/tmp/ortgpu/onnxruntime/capi:${LD_LIBRARY_PATH:-}
export PYTHONPATH=/tmp/ortgpu${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null | tee "$OUT/gpu-bench.log"
PYTHONUNBUFFERED=1 timeout "${BENCH_S:-540}" python3 bench/gpu_bench.py \
  --lib "${LIB:-.carry/ort/libscattermoe_ort.so}" --fatbin-dir "${FATBINS:-target/scattermoe-kernels}" \
  --triton-dir .carry/scattermoe --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu-bench.log"
echo "gpu-bench rc=${PIPESTATUS[0]}" | tee -a "$OUT/gpu-bench.log"
