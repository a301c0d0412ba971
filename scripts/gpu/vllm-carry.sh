#!/usr/bin/env bash
# vLLM's fused_moe for the benchmark's vLLM column (bench/peers/vllm_moe.py): its fused_moe.py, its tuned
# configs/ and its METADATA, out of the registry's wheel, into the git-ignored .carry/vllm (about 2 MiB;
# never committed). The device imports none of vLLM's package: the peer takes the Triton kernel from
# the file. usage (project root): scripts/gpu/vllm-carry.sh      (VLLM_VERSION: default 0.34.0)
# Check here before a device call (torch with triton, numpy below 2.4):
#   TRITON_INTERPRET=1 TORCH_PYTHON bench/peers/vllm_check.py
set -euo pipefail
cd "$(dirname "$0")/../.."
version=${VLLM_VERSION:-0.34.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 "vllm==$version" -d "$work"
rm -rf .carry/vllm && mkdir -p .carry/vllm
python3 - "$work"/vllm-*.whl <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
moe = "vllm/model_executor/layers/fused_moe/"
keep = [n for n in z.namelist() if n == moe + "fused_moe.py" or n.startswith(moe + "configs/")
        or (n.startswith("vllm-") and ".dist-info/" in n and (n.endswith("/METADATA") or "LICENSE" in n))]
for n in keep:
    z.extract(n, ".carry/vllm")
print(f"{len(keep)} files of {sys.argv[1].rsplit('/', 1)[-1]} in .carry/vllm")
PY
du -sh .carry/vllm
