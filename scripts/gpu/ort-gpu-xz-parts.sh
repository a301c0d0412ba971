#!/usr/bin/env bash
# onnxruntime-gpu for the device machine as a tar.xz of the wheel's onnxruntime/ folder, split into
# parts that travel one device call each (.carry/ort-gpux/p0 .. pN, git-ignored): 198 MiB in five
# parts for 1.31.1, smaller than the zip-deflated wheel. Unpacked on the device by
# scripts/gpu/ort-unpack.sh (for every device script; it also takes the wheel's own parts,
# ../shared/tools/ort-gpu-parts.sh).
# usage (project root): scripts/gpu/ort-gpu-xz-parts.sh      (ORT_GPU_VERSION, PART_MB: default 1.31.1, 40)
set -euo pipefail
cd "$(dirname "$0")/../.."
version=${ORT_GPU_VERSION:-1.31.1}
out=.carry/ort-gpux
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 "onnxruntime-gpu==$version" -d "$work"
python3 -m zipfile -e "$work"/onnxruntime_gpu-*.whl "$work/x"
tar c -C "$work/x" onnxruntime | xz -9 -T0 > "$work/ort.tar.xz"
rm -rf "$out" && mkdir -p "$out"
(cd "$work" && split -b "${PART_MB:-40}M" -d ort.tar.xz part)
i=0
for p in "$work"/part*; do mkdir -p "$out/p$i"; mv "$p" "$out/p$i/"; i=$((i + 1)); done
echo "$version" > "$out/VERSION"
du -sh "$out"/p*
