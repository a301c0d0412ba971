#!/usr/bin/env bash
# Device side: onnxruntime-gpu from its carried parts into /tmp/ortgpu (onnxruntime/ under it), once
# per warm machine. The parts (part00, part01, ... in /tmp/ortparts, gathered by earlier calls) are
# either the wheel as downloaded and split (../shared/tools/ort-gpu-parts.sh) or a tar.xz of its
# onnxruntime/ folder (scripts/gpu/ort-gpu-xz-parts.sh); the first bytes say which.
# usage: bash scripts/gpu/ort-unpack.sh [LAST_PART_DIR]   (a carried folder whose part* join the others first)
# Exit status 0 when /tmp/ortgpu/onnxruntime exists after it, 1 (with the reason) otherwise.
set -uo pipefail
dest=/tmp/ortgpu
[ -d $dest/onnxruntime ] && exit 0
if [ -n "${1:-}" ] && [ "$1" != - ]; then
  mkdir -p /tmp/ortparts && cp "$1"/part* /tmp/ortparts/ || { echo "ort-unpack: no parts in $1"; exit 1; }
fi
ls /tmp/ortparts/part00 > /dev/null 2>&1 || { echo "ort-unpack: no /tmp/ortparts/part00 (carry the parts first)"; exit 1; }
mkdir -p $dest
if [ "$(head -c 2 /tmp/ortparts/part00)" = "PK" ]; then
  cat /tmp/ortparts/part* > /tmp/ortgpu.whl && python3 -m zipfile -e /tmp/ortgpu.whl $dest && rm -f /tmp/ortgpu.whl
else
  cat /tmp/ortparts/part* | xz -d -T16 | tar x -C $dest
fi
if [ ! -d $dest/onnxruntime ]; then
  echo "ort-unpack: the parts in /tmp/ortparts did not unpack (missing or truncated part?)"
  rm -rf $dest
  exit 1
fi
