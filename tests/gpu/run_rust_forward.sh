#!/usr/bin/env bash
# One device call for the Rust GPU forward test (tests/gpu_forward.rs): the full case set, then
# compute-sanitizer memcheck and racecheck on the reduced set (SCATTERMOE_GPU_SMALL=1).
# The test binary is built here (`cargo test --release --no-run`) and carried:
#   mkdir -p .carry/gpu && objcopy --strip-debug target/release/deps/gpu_forward-<hash> .carry/gpu/gpu_forward
#   device: run with carry [".carry/gpu"], command `bash tests/gpu/run_rust_forward.sh`
# Logs under $OUT: forward.log, memcheck.log, racecheck.log, gpu.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/smoe-out}; mkdir -p "$OUT"
BIN=${BIN:-.carry/gpu/gpu_forward}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
timeout "${FULL_S:-130}" "$BIN" --test-threads=1 --nocapture > "$OUT/forward.log" 2>&1; echo "forward rc=$?"
grep -E "^(FAIL|test result)|checks,|skipped|panicked" "$OUT/forward.log" | head -40
SCATTERMOE_GPU_SMALL=1 timeout "${MEMCHECK_S:-150}" compute-sanitizer --tool memcheck --error-exitcode 3 \
  "$BIN" --test-threads=1 --nocapture > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?"
grep -E "^(FAIL|test result)|ERROR SUMMARY|Invalid|checks," "$OUT/memcheck.log" | head -20
SCATTERMOE_GPU_SMALL=1 timeout "${RACECHECK_S:-90}" compute-sanitizer --tool racecheck --error-exitcode 3 \
  "$BIN" --test-threads=1 --nocapture parallel_linear capacity_mask bad_indices cuda_graph async_checks > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$?"
grep -E "^(FAIL|test result)|RACECHECK SUMMARY|ERROR SUMMARY|hazard|checks," "$OUT/racecheck.log" | head -20
