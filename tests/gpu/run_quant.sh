#!/usr/bin/env bash
# Quantized expert weights on the device, in one call of about 8 minutes on an H100 (stages, each
# under its own timeout; nothing is built there, the binaries come carried):
#   kernels    tests/gpu/test_kernels.py --only quant on the fatbins in .carry/kernels (*.fatbin.xz):
#              dequantization bit for bit, the GEMM's modes on every tile, whole forwards (KERNELS_S)
#   rust       the quantized test of tests/gpu_forward.rs (.carry/gpu/gpu_forward.xz) against the
#              float64 oracle (RUST_S)
#   memcheck   compute-sanitizer memcheck on the quantized sanitize launches of test_kernels.py and on
#              the Rust quantized test's reduced set (SCATTERMOE_GPU_SMALL=1) (MEMCHECK_S, RUST_MEMCHECK_S)
#   racecheck  compute-sanitizer racecheck on test_kernels.py --mode sanitize --only quant --small
#              (RACECHECK_S)
#   ort        onnxruntime-gpu from /tmp/ortparts (ORT_LAST_PART: the folder of the last part, as
#              ../shared/tools/ort-gpu-parts.sh splits it), then tests/gpu/test_ort_cuda.py --only quant
#              on .carry/ort/libscattermoe_ort.so(.xz) (ORT_S)
#   bench      bench/gpu_bench.py, mixtral and qwen3 at 1, 16, 128, 1024, 4096 tokens: ours bf16 / fp8 /
#              int4 / int8 on ORT's CUDA EP, QMoE int4 / int8, our kernels bf16 / fp8 / int4, the floors
#              (BENCH_S; SHAPES, TOKENS, BUDGET, SETTLE to change)
# usage (device): bash tests/gpu/run_quant.sh [stages, default all of the above]
# Back in $OUT (a call returns at most 8 files): gpu_bench.md, gpu_bench.json, gpu_bench.png and
# quant-logs.tar.xz (quant-kernels.log, quant-forward.log, quant-memcheck-kernels.log,
# quant-memcheck-forward.log, quant-racecheck.log, quant-ort.log, quant-bench.log, gpu.txt); a summary
# of each stage on stdout.
#
# Here, before the calls (project root): one build for the device, sm_90a code only (a third of the
# fatbins' size; scripts/gpu/nvcc-sm90a.sh wraps .venv-nvcc's nvcc), in a target dir of its own:
#   export NVCC=$PWD/scripts/gpu/nvcc-sm90a.sh CARGO_TARGET_DIR=target/device
#   cargo test --release --no-run --test gpu_forward && cargo build --release -p scattermoe-ort
#   O=$(ls -d target/device/release/build/scattermoe-*/out | while read d; do [ -f $d/quant_gemm.fatbin ] && echo $d; done | head -1)
#   mkdir -p .carry/kernels .carry/gpu .carry/ort
#   for f in $O/*.fatbin; do xz -6 -T2 -c "$f" > .carry/kernels/$(basename "$f").xz; done
#   objcopy --strip-debug $(ls -t target/device/release/deps/gpu_forward-* | grep -v '\.d$' | head -1) /tmp/gpu_forward \
#     && xz -6 -T2 -c /tmp/gpu_forward > .carry/gpu/gpu_forward.xz
#   objcopy --strip-debug target/device/release/libscattermoe_ort.so /tmp/libscattermoe_ort.so \
#     && xz -6 -T2 -c /tmp/libscattermoe_ort.so > .carry/ort/libscattermoe_ort.so.xz
#   PART_MB=40 ../shared/tools/ort-gpu-parts.sh                   # .carry/ort-gpu/p0 .. pN
# Device calls, back to back (the machine stays warm ~30 s between calls; carried paths stay there):
#   carry [".carry/ort-gpu/p0", ".carry/kernels"]:   mkdir -p /tmp/ortparts && cp .carry/ort-gpu/p0/* /tmp/ortparts/
#   carry [".carry/ort-gpu/p1", ".carry/gpu"]:       cp .carry/ort-gpu/p1/* /tmp/ortparts/
#   carry [".carry/ort-gpu/pI"] (each further part but the last): cp .carry/ort-gpu/pI/* /tmp/ortparts/
#   carry [".carry/ort-gpu/pN", ".carry/ort"]:       ORT_LAST_PART=.carry/ort-gpu/pN bash tests/gpu/run_quant.sh
# (each call's carry plus the tracked tree, about 13 MiB, must stay under 64 MiB).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
FINAL=${OUT:-/tmp/smoe-out}; mkdir -p "$FINAL"
OUT=/tmp/quant-out; rm -rf "$OUT"; mkdir -p "$OUT"
pack() { cp "$OUT"/gpu_bench.* "$FINAL"/ 2>/dev/null; (cd "$OUT" && tar cJf "$FINAL/quant-logs.tar.xz" --exclude 'gpu_bench.*' .); }
trap pack EXIT
STAGES=${1:-kernels,rust,memcheck,racecheck,ort,bench}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
unxz_to() { if [ -f "$1.xz" ]; then xz -dc "$1.xz" > "$2"; else cp "$1" "$2"; fi; chmod +x "$2"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$OUT/gpu.txt"
KB=/tmp/quant-kernels
if has kernels || has memcheck || has racecheck || has bench; then
  mkdir -p $KB && for f in .carry/kernels/*.fatbin.xz; do xz -dc "$f" > $KB/$(basename "$f" .xz); done
fi
if has rust || has memcheck; then
  unxz_to .carry/gpu/gpu_forward /tmp/gpu_forward
fi
if has kernels; then
  timeout "${KERNELS_S:-60}" python3 tests/gpu/test_kernels.py --fatbin-dir $KB --only quant > "$OUT/quant-kernels.log" 2>&1
  echo "kernels rc=$?"; grep -v '^PASS' "$OUT/quant-kernels.log" | tail -8
fi
if has rust; then
  timeout "${RUST_S:-45}" /tmp/gpu_forward --test-threads=1 --nocapture quantized > "$OUT/quant-forward.log" 2>&1
  echo "rust rc=$?"; grep -E "^(FAIL|test result)|checks,|skipped|panicked" "$OUT/quant-forward.log" | head -20
fi
if has memcheck; then
  timeout "${MEMCHECK_S:-80}" compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 tests/gpu/test_kernels.py --fatbin-dir $KB --mode sanitize --only quant > "$OUT/quant-memcheck-kernels.log" 2>&1
  echo "memcheck kernels rc=$?"; grep -E "ERROR SUMMARY|Invalid|sanitize quant" "$OUT/quant-memcheck-kernels.log" | head -10
  SCATTERMOE_GPU_SMALL=1 timeout "${RUST_MEMCHECK_S:-45}" compute-sanitizer --tool memcheck --error-exitcode 3 \
    /tmp/gpu_forward --test-threads=1 --nocapture quantized > "$OUT/quant-memcheck-forward.log" 2>&1
  echo "memcheck forward rc=$?"; grep -E "^(FAIL|test result)|ERROR SUMMARY|Invalid|checks," "$OUT/quant-memcheck-forward.log" | head -10
fi
if has racecheck; then
  timeout "${RACECHECK_S:-40}" compute-sanitizer --tool racecheck --error-exitcode 3 \
    python3 tests/gpu/test_kernels.py --fatbin-dir $KB --mode sanitize --only quant --small > "$OUT/quant-racecheck.log" 2>&1
  echo "racecheck rc=$?"; grep -E "RACECHECK SUMMARY|ERROR SUMMARY|hazard|sanitize quant" "$OUT/quant-racecheck.log" | head -10
fi
if has ort || has bench; then
  bash scripts/gpu/ort-unpack.sh "${ORT_LAST_PART:-}" || echo "onnxruntime-gpu not unpacked: the ORT columns and tests will fail"
  unxz_to .carry/ort/libscattermoe_ort.so /tmp/libscattermoe_ort.so
  libs=$(ls -d /opt/torch/.venv/lib/python3.12/site-packages/nvidia/*/lib 2>/dev/null | paste -sd:)
  export LD_LIBRARY_PATH=$libs:/tmp/ortgpu/onnxruntime/capi:${LD_LIBRARY_PATH:-}
  export PYTHONPATH=/tmp/ortgpu
fi
if has ort; then
  timeout "${ORT_S:-40}" python3 tests/gpu/test_ort_cuda.py --lib /tmp/libscattermoe_ort.so --only quant > "$OUT/quant-ort.log" 2>&1
  echo "ort rc=$?"; grep -E "^FAIL|failed" "$OUT/quant-ort.log" | head -10
fi
if has bench; then
  timeout "${BENCH_S:-170}" python3 bench/gpu_bench.py --lib /tmp/libscattermoe_ort.so --fatbin-dir $KB \
    --peers ours,kernels,ours_fp8,ours_int4,ours_int8,qmoe_int4,qmoe_int8,kernels_fp8,kernels_int4 \
    --shapes "${SHAPES:-mixtral,qwen3}" --tokens "${TOKENS:-1,16,128,1024,4096}" --budget "${BUDGET:-0.15}" \
    --settle "${SETTLE:-0.05}" --time-limit "${TIME_LIMIT:-140}" --hard-extra 20 --out "$OUT" > "$OUT/quant-bench.log" 2>&1
  echo "bench rc=$?"; grep -E "failed|refused|unavailable" "$OUT/quant-bench.log" | head -10
fi
