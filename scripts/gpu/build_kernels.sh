#!/usr/bin/env bash
# Compile kernels/*.cu into fatbins with the flags and targets of kernels/manifest.toml (the ones
# build.rs uses): native code for every target and PTX for the newest. The entry points and the
# activation codes come from the headers build.rs generates from the manifest, committed in
# kernels/generated/ (a unit test of the crate keeps them current; this script runs without cargo).
# usage: scripts/gpu/build_kernels.sh [outdir] [nvcc] [archs: all|sm90]
#   sm90: native sm_90a code only (a quicker build for the H100/H200).
# SMOE_NVCC_FLAGS: extra nvcc flags (A/B builds of a kernel variant, e.g. -DNAME=VALUE).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUTDIR=${1:-target/scattermoe-kernels}
NVCC=${2:-${NVCC:-nvcc}}
ARCHS=${3:-all}
mkdir -p "$OUTDIR"
# flags, gencodes and modules from the manifest (python 3.11+ reads TOML)
read -r -a ARGS < <(python3 - "$ARCHS" <<'PY'
import sys, tomllib
m = tomllib.load(open("kernels/manifest.toml", "rb"))
n = m["nvcc"]
targets = [t for t in n["targets"] if sys.argv[1] == "all" or t["arch"] == "sm90a"]
gencode = [f"-gencode={t['gencode']}" for t in targets] + ([f"-gencode={n['ptx']}"] if sys.argv[1] == "all" else [])
print(" ".join(n["flags"] + gencode))
PY
)
read -r -a MODULES < <(python3 -c 'import tomllib; print(" ".join(tomllib.load(open("kernels/manifest.toml", "rb"))["modules"]))')
pids=()
for f in "${MODULES[@]}"; do
  "$NVCC" -fatbin "${ARGS[@]}" -Xptxas -v ${SMOE_NVCC_FLAGS:-} -Ikernels -Ikernels/generated kernels/$f.cu -o "$OUTDIR/$f.fatbin" \
    > "$OUTDIR/$f.ptxas.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for f in "${MODULES[@]}"; do
  if grep -qiE "error|warning" "$OUTDIR/$f.ptxas.log"; then grep -iE "error|warning" "$OUTDIR/$f.ptxas.log" | head -20; fi
done
exit $rc
