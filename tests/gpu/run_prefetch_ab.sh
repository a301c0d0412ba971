#!/usr/bin/env bash
# One device call for the skinny kernel's W prefetch before the dependency wait (kernels/skinny_gemm.cu,
# prefetch_hit_w): its A/B in whole forwards in CUDA graphs, then its device checks.
# Build the sm_90a fatbins here and carry them (a call carries 64 MiB at most):
#   scripts/gpu/build_kernels.sh .carry/kp "$NVCC" sm90 && xz .carry/kp/*.fatbin
#   device: carry [".carry/kp"], command `bash tests/gpu/run_prefetch_ab.sh`
# The A/B: SMOE_W_EARLY=0 (no routing indices passed: the wait first) against 1, alternating, twice
# (tests/gpu/bench_forward.py --only-auto; the Python host launches with programmatic dependent
# launch, as the library). Then test_kernels.py's skinny group (every case's GEMM2 with the
# prefetch) and its sanitize launches under memcheck and racecheck. Logs and JSON under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/smoe-out}; mkdir -p "$OUT"
K=/tmp/kp && mkdir -p $K && for f in .carry/kp/*.fatbin.xz; do xz -dc "$f" > $K/$(basename "$f" .xz); done
S=${S:-fine,granite,qwen3,olmoe,gpt_oss20,mixtral}; T=${T:-1,4,16}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
cd tests/gpu
for rep in 1 2; do
  for e in 0 1; do
    SMOE_W_EARLY=$e timeout "${BENCH_S:-90}" python3 bench_forward.py --fatbin-dir $K --shapes $S --tokens $T --only-auto \
      --json "$OUT/early$e-$rep.json" > "$OUT/early$e-$rep.log" 2>&1; echo "early=$e rep $rep rc=$?"
  done
done
python3 - "$OUT" <<'PY'
import json, sys, statistics
o = sys.argv[1]
runs = {e: [json.load(open(f"{o}/early{e}-{r}.json")) for r in (1, 2)] for e in (0, 1)}
print("shape     tokens  floor   no prefetch (2 runs)   prefetch (2 runs)   ratio (medians)")
for i, row in enumerate(runs[0][0]):
    a = [r[i]["ours_auto"] * 1e3 for r in runs[0]]
    b = [r[i]["ours_auto"] * 1e3 for r in runs[1]]
    print(f"{row['shape']:<9s} {row['T']:>6d} {row['floor_ms']*1e3:6.1f}  {a[0]:7.1f} {a[1]:7.1f} us      {b[0]:7.1f} {b[1]:7.1f} us   "
          f"{statistics.median(b) / statistics.median(a):.3f}")
PY
timeout "${CHECK_S:-150}" python3 test_kernels.py --fatbin-dir $K --only skinny > "$OUT/skinny-kernels.log" 2>&1; echo "kernels rc=$?"
tail -3 "$OUT/skinny-kernels.log"
for tool in memcheck racecheck; do
  timeout "${SAN_S:-120}" compute-sanitizer --tool $tool --error-exitcode 3 python3 test_kernels.py --fatbin-dir $K \
    --only skinny --mode sanitize --small > "$OUT/skinny-$tool.log" 2>&1; echo "$tool rc=$?"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard" "$OUT/skinny-$tool.log" | head -3
done
