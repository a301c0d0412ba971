#!/usr/bin/env bash
# Device side of the float8 x float8 experiment (tests/gpu/f8x8.cu, tests/gpu/bench_f8x8.py): checks,
# memcheck of the checks, then the timings. Nothing is built there.
# Here, before the call (project root): the library's sm_90a fatbins into .carry/kernels
# (bench/run_gpu_bench.sh's header) and the experiment's:
#   mkdir -p .carry/f8x8 && .venv-nvcc/lib/python3*/site-packages/nvidia/cu13/bin/nvcc -fatbin -O3 -std=c++17 \
#     -lineinfo -Xptxas -v -gencode=arch=compute_90a,code=sm_90a -Ikernels -Ikernels/generated tests/gpu/f8x8.cu \
#     -o /tmp/f8x8.fatbin && xz -6 -c /tmp/f8x8.fatbin > .carry/f8x8/f8x8.fatbin.xz
# Call: carry [".carry/kernels", ".carry/f8x8"]: bash tests/gpu/run_f8x8.sh      (about 3 minutes)
# Output in $OUT: f8x8-check.log, f8x8-memcheck.log, f8x8-bench.log, bench_f8x8.json.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/smoe-out}; mkdir -p "$OUT"
KB=/tmp/f8x8-kernels
mkdir -p $KB && for f in .carry/kernels/*.fatbin.xz; do xz -dc "$f" > $KB/$(basename "$f" .xz); done
xz -dc .carry/f8x8/f8x8.fatbin.xz > $KB/f8x8.fatbin
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONUNBUFFERED=1
T=tests/gpu/bench_f8x8.py
timeout 120 python3 $T --fatbin-dir $KB --f8-fatbin $KB/f8x8.fatbin --check-only > "$OUT/f8x8-check.log" 2>&1
rc=$?; echo "check rc=$rc"; grep -v '^PASS' "$OUT/f8x8-check.log" | tail -30
if [ $rc = 0 ]; then
  timeout "${MEMCHECK_S:-200}" compute-sanitizer --tool memcheck python3 $T --fatbin-dir $KB --f8-fatbin $KB/f8x8.fatbin --check-only \
    > "$OUT/f8x8-memcheck.log" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|checks:" "$OUT/f8x8-memcheck.log" | tail -3
  timeout "${BENCH_S:-240}" python3 $T --fatbin-dir $KB --f8-fatbin $KB/f8x8.fatbin --shapes "${SHAPES:-mixtral,qwen3}" \
    --tokens "${TOKENS:-1024,4096,16384}" --out "$OUT" > "$OUT/f8x8-bench.log" 2>&1
  echo "bench rc=$?"; grep -v '^PASS' "$OUT/f8x8-bench.log"
fi
