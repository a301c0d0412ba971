#!/usr/bin/env bash
# nvcc with only the sm_90a native target of kernels/manifest.toml (no sm_80 / sm_89 code, no PTX):
# the fatbins a build for the H100 / H200 device machine needs, about a third of their full size, so
# that the test binary and the plugin it carries fit a device call. For such a build, in a target dir
# of its own (build.rs keeps fatbins by a stamp of nvcc's version and arguments, which this wrapper
# does not change):
#   NVCC=$PWD/scripts/gpu/nvcc-sm90a.sh CARGO_TARGET_DIR=target/device cargo test --release --no-run --test gpu_forward
#   NVCC=$PWD/scripts/gpu/nvcc-sm90a.sh CARGO_TARGET_DIR=target/device cargo build --release -p scattermoe-ort
# (the crate's fatbin test fails for such a build, by design: it wants every target). REAL_NVCC: the
# nvcc to run (default: the project's .venv-nvcc, scripts/setup-nvcc.sh).
root=$(cd "$(dirname "$0")/../.." && pwd)
real=${REAL_NVCC:-$(ls "$root"/.venv-nvcc/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -1)}
args=()
for a in "$@"; do
  case "$a" in
    -gencode=arch=compute_80,*|-gencode=arch=compute_89,*|-gencode=arch=compute_90a,code=compute_90a) ;;
    *) args+=("$a") ;;
  esac
done
exec "$real" "${args[@]}"
