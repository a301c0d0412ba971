#!/usr/bin/env bash
# One device call for the decode kernel (kernels/moe_decode.cu: the whole op in one cooperative
# launch): correctness, the A/B against the four kernels, then the sanitizers.
# Build the sm_90a fatbins here and carry them (a call carries 64 MiB at most):
#   scripts/gpu/build_kernels.sh .carry/kd "$NVCC" sm90 && xz .carry/kd/*.fatbin
#   device: carry [".carry/kd"], command `bash tests/gpu/run_decode_ab.sh`
# Correctness: test_kernels.py --only decode (bit for bit against the four kernels, and against
# float64), then --only skinny (the skinny kernel, whose units the decode kernel shares).
# A/B: whole forwards in CUDA graphs (bench_forward.py --only-auto), arms alternating, twice:
#   four    SMOE_FUSED_DECODE=0       routing, GEMM1, GEMM2, combine
#   fused   SMOE_FUSED_DECODE=1       the decode kernel where the library's choice takes it
#   forced  SMOE_FUSED_DECODE=force   the decode kernel wherever it can run (T * k <= 512): the
#                                     data for its rule (src/cuda/forward/decode.rs decode_applies)
# on S (default: eleven layer shapes) at T (default 1, 2, 4, 8, 16, 32, 64 tokens).
# Then compute-sanitizer memcheck and racecheck over the decode kernel's sanitize launches.
# PARTS (default cases,ab,skinny,sanitize) picks the parts; all four take about 8 of a call's 10
# minutes at the default sizes. Logs and JSON under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/smoe-out}; mkdir -p "$OUT"
K=/tmp/kd && mkdir -p $K && for f in .carry/kd/*.fatbin.xz; do xz -dc "$f" > $K/$(basename "$f" .xz); done
S=${S:-mixtral,qwen3,fine,deepseek_v3,gpt_oss,gpt_oss20,olmoe,qwen2_moe,granite,phimoe,dbrx}; T=${T:-1,2,4,8,16,32,64}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
PARTS=${PARTS:-cases,ab,skinny,sanitize}
has() { case ",$PARTS," in *",$1,"*) return 0;; *) return 1;; esac; }
cd tests/gpu
if has cases; then
  timeout "${CHECK_S:-90}" python3 test_kernels.py --fatbin-dir $K --only decode > "$OUT/decode-kernels.log" 2>&1; echo "decode cases rc=$?"
  grep -E "^FAIL|passed in|note:|Error|error" "$OUT/decode-kernels.log" | head -20
fi
if has ab; then
  for rep in 1 2; do
    for arm in four:0 fused:1 forced:force; do
      SMOE_FUSED_DECODE=${arm#*:} timeout "${BENCH_S:-150}" python3 bench_forward.py --fatbin-dir $K --shapes $S --tokens $T \
        --only-auto --json "$OUT/${arm%%:*}-$rep.json" > /dev/null 2>&1; echo "${arm%%:*} rep $rep rc=$?"
    done
  done
  python3 decode_ab.py "$OUT" | tee "$OUT/decode-ab.txt"
fi
if has skinny; then
  timeout "${SKINNY_S:-120}" python3 test_kernels.py --fatbin-dir $K --only skinny > "$OUT/skinny-kernels.log" 2>&1; echo "skinny cases rc=$?"
  tail -1 "$OUT/skinny-kernels.log"
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    timeout "${SAN_S:-90}" compute-sanitizer --tool $tool --error-exitcode 3 python3 test_kernels.py --fatbin-dir $K \
      --only decode --mode sanitize > "$OUT/decode-$tool.log" 2>&1; echo "$tool rc=$?"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|sanitize decode" "$OUT/decode-$tool.log" | head -3
  done
fi
