#!/usr/bin/env bash
# One device call for the decode kernel (kernels/moe_decode.cu: the whole op in one
# cooperative launch) and the skinny kernel's W prefetch before the dependency wait: correctness,
# then the A/B of three arms, then the sanitizers.
# Build the sm_90a fatbins here and carry them (a call carries 64 MiB at most):
#   scripts/gpu/build_kernels.sh .carry/kd "$NVCC" sm90 && xz .carry/kd/*.fatbin
#   device: carry [".carry/kd"], command `bash tests/gpu/run_decode_ab.sh`
# Correctness: test_kernels.py --only decode (bit for bit against the four kernels, and against
# float64), then --only skinny (the skinny kernel, whose units the decode kernel shares).
# A/B: whole forwards in CUDA graphs (bench_forward.py --only-auto), arms alternating, twice:
#   four   SMOE_FUSED_DECODE=0 SMOE_W_EARLY=0  routing, GEMM1, GEMM2, combine; no prefetch
#   early  SMOE_FUSED_DECODE=0 SMOE_W_EARLY=1  the same with the W prefetch
#   fused  SMOE_FUSED_DECODE=1                 the decode kernel where the choice takes it
# and, once, on GPT-OSS-20B and Qwen3 (FORCE_S), the decode kernel forced (SMOE_FUSED_DECODE=force)
# against the four kernels, where the choice leaves it out (a GEMM off the skinny kernel).
# Then compute-sanitizer memcheck and racecheck over the decode kernel's sanitize launches.
# PARTS (default cases,ab,skinny,sanitize) picks the parts, e.g. two calls on a warm machine:
# PARTS=cases,ab, then PARTS=skinny,sanitize (all four take about 8 of a call's 10 minutes).
# Logs and JSON under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/smoe-out}; mkdir -p "$OUT"
K=/tmp/kd && mkdir -p $K && for f in .carry/kd/*.fatbin.xz; do xz -dc "$f" > $K/$(basename "$f" .xz); done
S=${S:-fine,granite,qwen3,olmoe,gpt_oss20}; T=${T:-1,4,16}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
PARTS=${PARTS:-cases,ab,skinny,sanitize}
has() { case ",$PARTS," in *",$1,"*) return 0;; *) return 1;; esac; }
cd tests/gpu
if has cases; then
  timeout "${CHECK_S:-90}" python3 test_kernels.py --fatbin-dir $K --only decode > "$OUT/decode-kernels.log" 2>&1; echo "decode cases rc=$?"
  grep -E "^FAIL|passed in|note:|Error|error" "$OUT/decode-kernels.log" | head -20
fi
arm() {  # name, then the environment
  local name=$1 rep=$2; shift 2
  env "$@" timeout "${BENCH_S:-60}" python3 bench_forward.py --fatbin-dir $K --shapes $S --tokens $T --only-auto \
    --json "$OUT/$name-$rep.json" > "$OUT/$name-$rep.log" 2>&1; echo "$name rep $rep rc=$?"
}
if has ab; then
for rep in 1 2; do
  arm four $rep SMOE_FUSED_DECODE=0 SMOE_W_EARLY=0
  arm early $rep SMOE_FUSED_DECODE=0 SMOE_W_EARLY=1
  arm fused $rep SMOE_FUSED_DECODE=1
done
# where the choice keeps the four kernels (a GEMM off the skinny kernel: GPT-OSS-20B's and Qwen3's
# long W1), the decode kernel forced, once, against the four kernels: the data for its own rule
S=${FORCE_S:-gpt_oss20,qwen3} arm forced 1 SMOE_FUSED_DECODE=force
S=${FORCE_S:-gpt_oss20,qwen3} arm fourf 1 SMOE_FUSED_DECODE=0
python3 - "$OUT" <<'PY'
import json, os, statistics, sys
o = sys.argv[1]
arms = ("four", "early", "fused")
runs = {a: [json.load(open(f"{o}/{a}-{r}.json")) for r in (1, 2) if os.path.exists(f"{o}/{a}-{r}.json")] for a in arms}
print("us per forward, CUDA graph (median of the runs); ratios to `four`")
print(f"{'shape':<10s} {'T':>4s} {'floor':>7s}  " + "  ".join(f"{a + ' (runs)':>20s}" for a in arms) + "   early/four fused/four")
for i, row in enumerate(runs["four"][0]):
    med = {}
    cells = []
    for a in arms:
        v = [r[i]["ours_auto"] * 1e3 for r in runs[a] if i < len(r)]
        med[a] = statistics.median(v) if v else float("nan")
        cells.append(f"{' '.join(f'{x:.1f}' for x in v):>20s}")
    print(f"{row['shape']:<10s} {row['T']:>4d} {row['floor_ms'] * 1e3:7.1f}  " + "  ".join(cells) +
          f"   {med['early'] / med['four']:.3f}      {med['fused'] / med['four']:.3f}")
PY
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
try:
    a, b = json.load(open(f"{o}/fourf-1.json")), json.load(open(f"{o}/forced-1.json"))
except OSError as e:
    sys.exit(f"forced arm: {e}")
print("decode kernel forced: us per forward, four kernels / forced / ratio")
for x, y in zip(a, b):
    print(f"{x['shape']:<10s} {x['T']:>4d}  {x['ours_auto'] * 1e3:8.1f} {y['ours_auto'] * 1e3:8.1f}  {y['ours_auto'] / x['ours_auto']:.3f}")
PY
fi
if has skinny; then
  timeout "${SKINNY_S:-120}" python3 test_kernels.py --fatbin-dir $K --only skinny > "$OUT/skinny-kernels.log" 2>&1; echo "skinny cases rc=$?"
  tail -1 "$OUT/skinny-kernels.log"
fi
has sanitize && for tool in memcheck racecheck; do
  timeout "${SAN_S:-90}" compute-sanitizer --tool $tool --error-exitcode 3 python3 test_kernels.py --fatbin-dir $K \
    --only decode --mode sanitize > "$OUT/decode-$tool.log" 2>&1; echo "$tool rc=$?"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|sanitize decode" "$OUT/decode-$tool.log" | head -3
done
