#!/usr/bin/env bash
# The GPU checks of one tree, in stages that fit the device calls onnxruntime-gpu travels with
# (see tests/gpu/run_ort_cuda.sh). Nothing is built there: the binaries come carried.
#   rust     tests/gpu_forward.rs (full set, then memcheck on the reduced set): $BIN
#            (default .carry/gpu/gpu_forward)
#   kernels  the kernel harness tests/gpu/test_kernels.py on the fatbins in .carry/kernels (*.fatbin.xz)
#   ort      unpacks onnxruntime-gpu from /tmp/ortparts (the wheel, or a tar.xz of its onnxruntime/,
#            split in parts part00.., the last one possibly in $ORT_LAST_PART), then
#            tests/gpu/test_ort_cuda.py on $LIB (default .carry/ort/libscattermoe_ort.so)
#            and the layer benchmark (bench/gpu_bench.py,
#            ours/ORT only) for this library and, when present, $BASE_LIB (default
#            .carry/ort-base/libscattermoe_ort.so: the previous commit's), alternating A B, $ROUNDS times
#   ortmem   tests/gpu/test_ort_cuda.py under compute-sanitizer memcheck (after `ort`, same machine)
# usage (device): bash tests/gpu/run_device_suite.sh rust,kernels,ort,ortmem
# Logs under $OUT: forward.log, memcheck-forward.log, kernels.log, ort-cuda.log,
# ort-cuda-memcheck.log, bench-<lib>-<round>.md, gpu.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/smoe-out}; mkdir -p "$OUT"
STAGES=${1:-rust,kernels,ort}
LIB=${LIB:-.carry/ort/libscattermoe_ort.so}
BASE_LIB=${BASE_LIB:-.carry/ort-base/libscattermoe_ort.so}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$OUT/gpu.txt"
libs=$(ls -d /opt/torch/.venv/lib/python3.12/site-packages/nvidia/*/lib 2>/dev/null | paste -sd:)
if has rust; then
  BIN=${BIN:-.carry/gpu/gpu_forward}
  timeout "${FULL_S:-200}" "$BIN" --test-threads=1 --nocapture > "$OUT/forward.log" 2>&1; echo "forward rc=$?"
  grep -E "^(FAIL|test result)|checks,|skipped|panicked" "$OUT/forward.log" | head -20
  SCATTERMOE_GPU_SMALL=1 timeout "${MEMCHECK_S:-200}" compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$BIN" --test-threads=1 --nocapture > "$OUT/memcheck-forward.log" 2>&1; echo "memcheck forward rc=$?"
  grep -E "^(FAIL|test result)|ERROR SUMMARY|Invalid|checks," "$OUT/memcheck-forward.log" | head -10
fi
if has kernels; then
  KB=/tmp/kernels; mkdir -p $KB
  for f in .carry/kernels/*.fatbin.xz; do xz -dc "$f" > $KB/$(basename "$f" .xz); done
  timeout "${KERNELS_S:-240}" python3 tests/gpu/test_kernels.py --fatbin-dir $KB > "$OUT/kernels.log" 2>&1; echo "kernels rc=$?"
  grep -v '^PASS' "$OUT/kernels.log" | tail -8
fi
if has ort; then
  bash scripts/gpu/ort-unpack.sh "${ORT_LAST_PART:-}" || exit 1
  export LD_LIBRARY_PATH=$libs:/tmp/ortgpu/onnxruntime/capi:${LD_LIBRARY_PATH:-}
  export PYTHONPATH=/tmp/ortgpu
  timeout "${ORT_S:-200}" python3 tests/gpu/test_ort_cuda.py --lib "$LIB" > "$OUT/ort-cuda.log" 2>&1
  echo "ort-cuda rc=$?"; grep -E "^FAIL|failed" "$OUT/ort-cuda.log" | head -10
  libsets="this:$LIB"
  [ -f "$BASE_LIB" ] && libsets="$libsets base:$BASE_LIB"
  for round in $(seq 1 "${ROUNDS:-2}"); do
    for ls in $libsets; do
      name=${ls%%:*}; lib=${ls#*:}; mkdir -p /tmp/bench-$name-$round
      timeout "${BENCH_S:-100}" python3 bench/gpu_bench.py --lib "$lib" --peers ours --shapes "${SHAPES:-mixtral,qwen3}" \
        --tokens "${TOKENS:-16,1024,4096}" --budget "${BUDGET:-0.3}" --out /tmp/bench-$name-$round > "$OUT/bench-$name-$round.log" 2>&1
      echo "bench $name round $round rc=$?"
      cp /tmp/bench-$name-$round/gpu_bench.md "$OUT/bench-$name-$round.md" 2>/dev/null
    done
  done
fi
if has ortmem; then
  export LD_LIBRARY_PATH=$libs:/tmp/ortgpu/onnxruntime/capi:${LD_LIBRARY_PATH:-}
  export PYTHONPATH=/tmp/ortgpu
  timeout "${ORT_MEMCHECK_S:-420}" compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 tests/gpu/test_ort_cuda.py --lib "$LIB" > "$OUT/ort-cuda-memcheck.log" 2>&1
  echo "ort-cuda memcheck rc=$?"; grep -E "^FAIL|failed|ERROR SUMMARY" "$OUT/ort-cuda-memcheck.log" | head -10
fi
