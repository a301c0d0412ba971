#!/usr/bin/env bash
# One device call for the Rust GPU forward test (tests/gpu_forward.rs): the full case set, then
# compute-sanitizer memcheck, racecheck and synccheck on the reduced set (SCATTERMOE_GPU_SMALL=1).
# The test binary is built here (`cargo test --release --no-run`, with nvcc) and carried:
#   mkdir -p .carry/gpu && objcopy --strip-debug target/release/deps/gpu_forward-<hash> .carry/gpu/gpu_forward
#   && xz .carry/gpu/gpu_forward      (a call carries 64 MiB at most)
#   device: run with carry [".carry/gpu"], command `bash tests/gpu/run_rust_forward.sh`
# SAN_FILTER: the tests the sanitizers run (a test-name filter; default: all but the slow big cases'
# own tests, as listed below); e.g. SAN_FILTER=topk_router for a change to the router kernel alone.
# Logs under $OUT: forward.log, memcheck.log, racecheck.log, synccheck.log, gpu.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/smoe-out}; mkdir -p "$OUT"
CARRY=${CARRY:-.carry/gpu}  # the carried folder (another one for a branch's binary)
BIN=${BIN:-$CARRY/gpu_forward}
if [ -f "$CARRY/gpu_forward.xz" ] && [ ! -f "$BIN" ]; then
  BIN=/tmp/gpu_forward && xz -dc "$CARRY/gpu_forward.xz" > "$BIN" && chmod +x "$BIN"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
timeout "${FULL_S:-200}" "$BIN" --test-threads=1 --nocapture > "$OUT/forward.log" 2>&1; echo "forward rc=$?"
grep -E "^(FAIL|test result)|checks,|skipped|panicked" "$OUT/forward.log" | head -40
# shellcheck disable=SC2086
SCATTERMOE_GPU_SMALL=1 timeout "${MEMCHECK_S:-150}" compute-sanitizer --tool memcheck --error-exitcode 3 \
  "$BIN" --test-threads=1 --nocapture ${SAN_FILTER:-} > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?"
grep -E "^(FAIL|test result)|ERROR SUMMARY|Invalid|checks," "$OUT/memcheck.log" | head -20
# shellcheck disable=SC2086
SCATTERMOE_GPU_SMALL=1 timeout "${RACECHECK_S:-150}" compute-sanitizer --tool racecheck --error-exitcode 3 \
  "$BIN" --test-threads=1 --nocapture ${SAN_FILTER:-parallel_linear capacity_mask bad_indices cuda_graph async_checks topk_router} > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$?"
grep -E "^(FAIL|test result)|RACECHECK SUMMARY|ERROR SUMMARY|hazard|checks," "$OUT/racecheck.log" | head -20
# shellcheck disable=SC2086
SCATTERMOE_GPU_SMALL=1 timeout "${SYNCCHECK_S:-100}" compute-sanitizer --tool synccheck --error-exitcode 3 \
  "$BIN" --test-threads=1 ${SAN_FILTER:-topk_router} > "$OUT/synccheck.log" 2>&1; echo "synccheck rc=$?"
grep -E "^(FAIL|test result)|ERROR SUMMARY" "$OUT/synccheck.log" | head -5
