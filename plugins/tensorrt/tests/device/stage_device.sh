#!/usr/bin/env bash
# Stages what run_device.sh (beside this file) needs on the GPU machine into the git-ignored .carry/trt:
# the harness and libscattermoe_trt.so from the last release build (debug info stripped), and the
# harness cases with their CPU reference outputs (written by plugins/tensorrt/tests/harness.rs).
set -euo pipefail
cd "$(dirname "$0")/../../../.."  # the repository root
target=${CARGO_TARGET_DIR:-target}/release
dir=.carry/trt
rm -rf "$dir" && mkdir -p "$dir/cases"
harness=$(ls -t "$target"/build/scattermoe-trt-*/out/scattermoe_trt_harness | head -n 1)
cp "$harness" "$dir/"
strip --strip-debug -o "$dir/libscattermoe_trt.so" "$target/libscattermoe_trt.so"
SCATTERMOE_TRT_CASES_OUT="$PWD/$dir/cases" cargo test --release -q -p scattermoe-trt --test harness >/dev/null
ls -la "$dir" "$dir/cases"
du -sh "$dir"
