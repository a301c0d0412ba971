#!/usr/bin/env bash
# wgmma_ws's quantized forms (gemm_hopper_ws.cuh, "Quantized W") on the device, in one call of at
# most 9.5 minutes (the stages' timeouts; nothing is built there, the fatbins come carried):
#   kernels    tests/gpu/test_kernels.py --only quant --cfgs wgmma_ws: every quantized case forced onto
#              the form (bit-exact dequantization through the GEMM, the GEMM's modes, whole forwards;
#              the packed and the element-wise path), then --only pl,fwd --cfgs wgmma_ws: the 16-bit
#              form of the same template (KERNELS_S, PL_S)
#   memcheck   compute-sanitizer memcheck on --mode sanitize --only quant --cfgs wgmma_ws (MEMCHECK_S)
#   racecheck  compute-sanitizer racecheck on the same, --small (RACECHECK_S)
#   bench      tests/gpu/bench_qgemm.py: GEMM1 and GEMM2 alone, fp8 and int4, wgmma_ws's form against
#              the mma.sync choice and against bf16 on the 16-bit choice (BENCH_S; SHAPES, TOKENS, REPS)
#   rust       tests/gpu_forward.rs when carried (.carry/gpu/gpu_forward.xz) (RUST_S)
# usage (device): bash tests/gpu/run_quant_wgmma.sh [stages, default kernels,memcheck,racecheck,bench]
# Back in $OUT: qwgmma-logs.tar.xz (the stages' logs, gpu.txt) and bench_qgemm.json; a summary of
# each stage and the benchmark table on stdout.
# Here, before the call: the sm_90a fatbins into .carry/kernels (tests/gpu/run_skinny.sh's header);
# device call: carry [".carry/kernels"] (and ".carry/gpu" for rust).
# A/B of a kernel change: OVERLAY=DIR (a carried folder of *.fatbin.xz) replaces those modules of
# .carry/kernels for every stage, and the bench stage then also times wgmma_ws's form with
# .carry/kernels alone (bench_qgemm-base.json, qwgmma-bench-base.log), in the same call.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
FINAL=${OUT:-/tmp/smoe-out}; mkdir -p "$FINAL"
OUT=/tmp/qwgmma-out; rm -rf "$OUT"; mkdir -p "$OUT"
pack() { cp "$OUT"/bench_qgemm*.json "$FINAL"/ 2>/dev/null; (cd "$OUT" && tar cJf "$FINAL/qwgmma-logs.tar.xz" --exclude 'bench_qgemm*.json' .); }
trap pack EXIT
STAGES=${1:-kernels,memcheck,racecheck,bench}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader 2>&1 | tee -a "$OUT/gpu.txt"
KB=/tmp/qwgmma-kernels
mkdir -p $KB && for f in .carry/kernels/*.fatbin.xz; do xz -dc "$f" > $KB/$(basename "$f" .xz); done
BASE=
if [ -n "${OVERLAY:-}" ]; then
  BASE=/tmp/qwgmma-kernels-base && rm -rf $BASE && cp -a $KB $BASE
  for f in "$OVERLAY"/*.fatbin.xz; do xz -dc "$f" > $KB/$(basename "$f" .xz); echo "overlay: $(basename "$f" .xz)" | tee -a "$OUT/gpu.txt"; done
fi
T=tests/gpu/test_kernels.py
if has kernels; then
  timeout "${KERNELS_S:-120}" python3 $T --fatbin-dir $KB --only quant --cfgs wgmma_ws > "$OUT/qwgmma-kernels.log" 2>&1
  echo "kernels (quantized cases on wgmma_ws) rc=$?"; grep -v '^PASS' "$OUT/qwgmma-kernels.log" | tail -12
  timeout "${PL_S:-80}" python3 $T --fatbin-dir $KB --only pl,fwd --cfgs wgmma_ws > "$OUT/qwgmma-16bit.log" 2>&1
  echo "kernels (16-bit groups on wgmma_ws) rc=$?"; grep -v '^PASS' "$OUT/qwgmma-16bit.log" | tail -6
fi
if has memcheck; then
  timeout "${MEMCHECK_S:-80}" compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 $T --fatbin-dir $KB --mode sanitize --only quant --cfgs wgmma_ws > "$OUT/qwgmma-memcheck.log" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|Invalid|sanitize" "$OUT/qwgmma-memcheck.log" | head -10
fi
if has racecheck; then
  timeout "${RACECHECK_S:-70}" compute-sanitizer --tool racecheck --error-exitcode 3 \
    python3 $T --fatbin-dir $KB --mode sanitize --only quant --cfgs wgmma_ws --small > "$OUT/qwgmma-racecheck.log" 2>&1
  echo "racecheck rc=$?"; grep -E "RACECHECK SUMMARY|ERROR SUMMARY|hazard|sanitize" "$OUT/qwgmma-racecheck.log" | head -10
fi
if has bench; then
  timeout "${BENCH_S:-150}" python3 tests/gpu/bench_qgemm.py --fatbin-dir $KB --shapes "${SHAPES:-mixtral,qwen3}" \
    --tokens "${TOKENS:-128,1024,4096}" --reps "${REPS:-10}" --out "$OUT" > "$OUT/qwgmma-bench.log" 2>&1
  echo "bench rc=$?"; cat "$OUT/qwgmma-bench.log"
  if [ -n "$BASE" ]; then
    mkdir -p "$OUT/base"
    timeout "${BENCH_S:-150}" python3 tests/gpu/bench_qgemm.py --fatbin-dir $BASE --shapes "${SHAPES:-mixtral,qwen3}" \
      --tokens "${TOKENS:-128,1024,4096}" --reps "${REPS:-10}" --cfgs wgmma_ws --out "$OUT/base" > "$OUT/qwgmma-bench-base.log" 2>&1
    echo "bench (base fatbins, before OVERLAY) rc=$?"; cat "$OUT/qwgmma-bench-base.log"
    mv "$OUT/base/bench_qgemm.json" "$OUT/bench_qgemm-base.json" 2>/dev/null
  fi
fi
if has rust; then
  xz -dc .carry/gpu/gpu_forward.xz > /tmp/gpu_forward && chmod +x /tmp/gpu_forward
  timeout "${RUST_S:-60}" /tmp/gpu_forward --test-threads=1 --nocapture > "$OUT/qwgmma-forward.log" 2>&1
  echo "rust rc=$?"; grep -E "^(FAIL|test result)|checks,|skipped|panicked" "$OUT/qwgmma-forward.log" | head -20
fi
