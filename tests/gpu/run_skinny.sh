#!/usr/bin/env bash
# The skinny kernel (kernels/skinny_gemm.cu) on the device, in one call of about 5-6 minutes on an
# H100, at most 9 (every stage at its timeout: 2 x 120 + 90 + 60 + 150 s; nothing is built there,
# the fatbins come carried):
#   kernels    tests/gpu/test_kernels.py --only skinny (its own cases: bit-exact dequantization, the
#              GEMM's modes, whole forwards, quantized forwards, both paths) and the generic groups
#              forced onto it (--only pl,fwd,quant --cfgs skinny: every activation, layout, routing and
#              quantized form of the other configurations' tests, plus the automatic choice), against
#              float64 (KERNELS_S)
#   memcheck   compute-sanitizer memcheck on test_kernels.py --mode sanitize --only skinny (MEMCHECK_S)
#   racecheck  compute-sanitizer racecheck on the same, --small (RACECHECK_S)
#   bench      tests/gpu/bench_skinny.py: GEMM1 and GEMM2 alone at Mixtral, Qwen3, DeepSeek-V3 and GPT-OSS
#              at 1, 4, 16, 64, 128 tokens, bf16 / fp8 / int4 (group 128): ms (median of 50, L2 flushed
#              before each launch), GB/s of W, skinny against the mma.sync choice (BENCH_S; SHAPES,
#              TOKENS, FORMATS, REPS to change)
#   rust       tests/gpu_forward.rs, when carried (.carry/gpu/gpu_forward.xz): every configuration of
#              GemmCfg::TENSOR_CORE, the skinny kernel among them, against the float64 oracle (RUST_S)
# usage (device): bash tests/gpu/run_skinny.sh [stages, default kernels,memcheck,racecheck,bench]
# Back in $OUT: skinny-logs.tar.xz (skinny-kernels.log, skinny-memcheck.log, skinny-racecheck.log,
# skinny-bench.log, skinny-forward.log, gpu.txt) and bench_skinny.json; a summary of each stage and the
# whole benchmark table on stdout.
#
# Here, before the call (project root): the fatbins for sm_90a alone, without cargo (about 6 minutes on
# two cores; 8 MiB, nvcc's fatbins are compressed already; scripts/gpu/build_kernels.sh compiles
# kernels/*.cu against kernels/generated/):
#   NVCC=$(ls .venv-nvcc/lib/python3*/site-packages/nvidia/cu13/bin/nvcc)
#   scripts/gpu/build_kernels.sh target/skinny-kernels "$NVCC" sm90
#   mkdir -p .carry/kernels && for f in target/skinny-kernels/*.fatbin; do xz -6 -T2 -c "$f" > .carry/kernels/$(basename "$f").xz; done
# and for the optional rust stage, the test binary (run_quant.sh's recipe: NVCC=$PWD/scripts/gpu/nvcc-sm90a.sh
# CARGO_TARGET_DIR=target/device cargo test --release --no-run --test gpu_forward, then objcopy
# --strip-debug and xz into .carry/gpu/gpu_forward.xz).
# Device call: carry [".carry/kernels"] (and ".carry/gpu" for rust): bash tests/gpu/run_skinny.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
FINAL=${OUT:-/tmp/smoe-out}; mkdir -p "$FINAL"
OUT=/tmp/skinny-out; rm -rf "$OUT"; mkdir -p "$OUT"
pack() { cp "$OUT"/bench_skinny.json "$FINAL"/ 2>/dev/null; (cd "$OUT" && tar cJf "$FINAL/skinny-logs.tar.xz" --exclude 'bench_skinny.json' .); }
trap pack EXIT
STAGES=${1:-kernels,memcheck,racecheck,bench}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader 2>&1 | tee -a "$OUT/gpu.txt"
KB=/tmp/skinny-kernels
mkdir -p $KB && for f in .carry/kernels/*.fatbin.xz; do xz -dc "$f" > $KB/$(basename "$f" .xz); done
if has kernels; then
  timeout "${KERNELS_S:-120}" python3 tests/gpu/test_kernels.py --fatbin-dir $KB --only skinny > "$OUT/skinny-kernels.log" 2>&1
  echo "kernels (skinny cases) rc=$?"; grep -v '^PASS' "$OUT/skinny-kernels.log" | tail -8
  timeout "${KERNELS_S:-120}" python3 tests/gpu/test_kernels.py --fatbin-dir $KB --only pl,fwd,quant --cfgs skinny >> "$OUT/skinny-kernels.log" 2>&1
  echo "kernels (generic groups on skinny) rc=$?"; grep -v '^PASS' "$OUT/skinny-kernels.log" | tail -4
fi
if has memcheck; then
  timeout "${MEMCHECK_S:-90}" compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 tests/gpu/test_kernels.py --fatbin-dir $KB --mode sanitize --only skinny > "$OUT/skinny-memcheck.log" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|Invalid|sanitize skinny" "$OUT/skinny-memcheck.log" | head -10
fi
if has racecheck; then
  timeout "${RACECHECK_S:-60}" compute-sanitizer --tool racecheck --error-exitcode 3 \
    python3 tests/gpu/test_kernels.py --fatbin-dir $KB --mode sanitize --only skinny --small > "$OUT/skinny-racecheck.log" 2>&1
  echo "racecheck rc=$?"; grep -E "RACECHECK SUMMARY|ERROR SUMMARY|hazard|sanitize skinny" "$OUT/skinny-racecheck.log" | head -10
fi
if has bench; then
  timeout "${BENCH_S:-150}" python3 tests/gpu/bench_skinny.py --fatbin-dir $KB --shapes "${SHAPES:-mixtral,qwen3,deepseek,gptoss}" \
    --tokens "${TOKENS:-1,4,16,64,128}" --formats "${FORMATS:-bf16,fp8,int4}" --reps "${REPS:-50}" --out "$OUT" > "$OUT/skinny-bench.log" 2>&1
  echo "bench rc=$?"; cat "$OUT/skinny-bench.log"
fi
if has rust; then
  xz -dc .carry/gpu/gpu_forward.xz > /tmp/gpu_forward && chmod +x /tmp/gpu_forward
  timeout "${RUST_S:-200}" /tmp/gpu_forward --test-threads=1 --nocapture > "$OUT/skinny-forward.log" 2>&1
  echo "rust rc=$?"; grep -E "^(FAIL|test result)|checks,|skipped|panicked" "$OUT/skinny-forward.log" | head -20
fi
