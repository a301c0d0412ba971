#!/usr/bin/env bash
# Runs the TensorRT plugin harness on the GPU machine (no cargo, no TensorRT there). Build and
# stage here first:
#   cargo build --release --workspace                     (with nvcc and TensorRT's headers)
#   plugins/tensorrt/tests/device/stage_device.sh          (harness, library and cases into .carry/trt)
# then, on the device: plugins/tensorrt/tests/device/run_device.sh   (logs under $OUT)
set -uo pipefail
cd "$(dirname "$0")/../../../.."  # the repository root
dir=.carry/trt
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader | tee "$out/device.txt"
"$dir/scattermoe_trt_harness" "$dir/libscattermoe_trt.so" "$dir"/cases/*.case 2>&1 | tee "$out/harness.log"
status=${PIPESTATUS[0]}
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -n "$sanitizer" ]; then
  # memcheck over every case (bad-index case included: the kernels clamp, nothing reads out of bounds)
  timeout "${MEMCHECK_TIMEOUT:-120}" "$sanitizer" --tool memcheck --error-exitcode 3 "$dir/scattermoe_trt_harness" "$dir/libscattermoe_trt.so" "$dir"/cases/*.case \
    > "$out/harness-memcheck.log" 2>&1
  echo "compute-sanitizer memcheck exit status: $?" | tee -a "$out/harness-memcheck.log"
  grep -E "ERROR SUMMARY|passed, .* failed" "$out/harness-memcheck.log"
else
  echo "compute-sanitizer not found: memcheck skipped"
fi
exit "$status"
