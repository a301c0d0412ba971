#!/usr/bin/env bash
# One device call: correctness, compute-sanitizer (memcheck, racecheck), timing. Logs under $OUT.
# usage (device): scripts/gpu/device_run.sh [sections: correct,memcheck,racecheck,bench] [bench args...]
# Uses fatbins from target/scattermoe-kernels (built here by scripts/gpu/build_kernels.sh and carried);
# compiles them on the device (sm_90a only) when absent.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/smoe-out}; mkdir -p "$OUT"
KB=target/scattermoe-kernels
SECTIONS=${1:-correct,memcheck,racecheck,bench}; shift || true
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if [ ! -f $KB/grouped_gemm.fatbin ]; then
  scripts/gpu/build_kernels.sh $KB nvcc sm90 || { cat $KB/*.log; exit 1; }
fi
if command -v cuobjdump >/dev/null; then
  for fn in wgmma_mc wgmma_ws 128x128 32x64; do
    fb=$KB/grouped_gemm.fatbin; [[ $fn == wgmma_* ]] && fb=$KB/grouped_gemm_ws.fatbin
    echo "SASS bf16_$fn: HGMMA $(cuobjdump -sass -fun scattermoe_gemm_bf16_$fn $fb 2>/dev/null | grep -c HGMMA)" \
      "HMMA $(cuobjdump -sass -fun scattermoe_gemm_bf16_$fn $fb 2>/dev/null | grep -c HMMA)"
  done
fi
has() { [[ ",$SECTIONS," == *",$1,"* ]]; }
if has correct; then
  python3 tests/gpu/test_kernels.py --fatbin-dir $KB > "$OUT/correct.log" 2>&1; echo "correct rc=$?"
  grep -v '^PASS' "$OUT/correct.log" | tail -40
fi
for tool in memcheck racecheck; do
  if has $tool; then
    timeout 150 compute-sanitizer --tool $tool python3 tests/gpu/test_kernels.py --fatbin-dir $KB --mode sanitize \
      > "$OUT/$tool.log" 2>&1; echo "$tool rc=$?"; tail -4 "$OUT/$tool.log"
  fi
done
if has bench; then
  python3 tests/gpu/bench_forward.py --fatbin-dir $KB --json "$OUT/bench.json" "$@" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -E "ERR|Error|error" "$OUT/bench.log" | head -5; sed -n '/^shape/,$p' "$OUT/bench.log"
fi
