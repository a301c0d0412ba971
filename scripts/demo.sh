#!/usr/bin/env bash
# The main job on the embedded example: rewrite models/mixtral.onnx (a tiny Hugging Face Mixtral
# MoE block exported by torch's TorchScript exporter, 607 nodes, committed with torch's outputs)
# into one ScatterMoE op, report what was found, and verify the rewritten model against the
# original in ONNX Runtime with the plugin. Installs what it needs into the project folder.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/mixtral.onnx}
scripts/setup-python.sh
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n 1)}
cargo build --release --workspace
out=$(mktemp -d)/$(basename "${model%.onnx}").scattermoe.onnx
target/release/scattermoe rewrite "$model" "$out" --report --verify
echo "rewritten model: $out"
