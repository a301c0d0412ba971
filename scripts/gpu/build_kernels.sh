#!/usr/bin/env bash
# Compile kernels/*.cu into fatbins (sm_80, sm_89, sm_90a SASS + compute_90a PTX).
# usage: scripts/gpu/build_kernels.sh [outdir] [nvcc] [archs: all|sm90]
# SMOE_NVCC_FLAGS: extra nvcc flags (A/B builds of a kernel variant, e.g. -DNAME=VALUE).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUTDIR=${1:-target/scattermoe-kernels}
NVCC=${2:-${NVCC:-nvcc}}
ARCHS=${3:-all}
mkdir -p "$OUTDIR"
if [ "$ARCHS" = all ]; then
  GENCODE="-gencode arch=compute_80,code=sm_80 -gencode arch=compute_89,code=sm_89 -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_90a,code=compute_90a"
else
  GENCODE="-gencode arch=compute_90a,code=sm_90a"
fi
pids=()
for f in routing grouped_gemm combine; do
  "$NVCC" -fatbin -O3 -std=c++17 $GENCODE -Xptxas -v ${SMOE_NVCC_FLAGS:-} -Ikernels kernels/$f.cu -o "$OUTDIR/$f.fatbin" \
    > "$OUTDIR/$f.ptxas.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for f in routing grouped_gemm combine; do
  if grep -qiE "error|warning" "$OUTDIR/$f.ptxas.log"; then grep -iE "error|warning" "$OUTDIR/$f.ptxas.log" | head -20; fi
done
exit $rc
