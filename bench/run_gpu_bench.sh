#!/usr/bin/env bash
# Device side of bench/gpu_bench.py (its docstring is the method; bench/results/README.md lists the calls
# that make the full table on one GPU, and how the H100 and H200 tables are made).
#
# Here (project root), before the calls: the plugin and sm_90a fatbins, xz'd, as tests/gpu/run_quant.sh
# builds them (target dir of its own), and ScatterMoE's Triton code:
#   export NVCC=$PWD/scripts/gpu/nvcc-sm90a.sh CARGO_TARGET_DIR=target/device
#   cargo build --release -p scattermoe-ort
#   O=$(ls -d target/device/release/build/scattermoe-*/out | while read d; do [ -f $d/quant_gemm.fatbin ] && echo $d; done | head -1)
#   mkdir -p .carry/kernels .carry/ort && for f in $O/*.fatbin; do xz -6 -T2 -c "$f" > .carry/kernels/$(basename "$f").xz; done
#   objcopy --strip-debug target/device/release/libscattermoe_ort.so /tmp/libscattermoe_ort.so \
#     && xz -6 -T2 -c /tmp/libscattermoe_ort.so > .carry/ort/libscattermoe_ort.so.xz
#   scripts/gpu/ort-gpu-xz-parts.sh                               # onnxruntime-gpu: .carry/ort-gpux/p0 .. p4
#   scripts/gpu/vllm-carry.sh                                     # vLLM's fused_moe.py and configs: .carry/vllm
#   ScatterMoE's Triton code, git-ignored, never committed: the search tool's fetch of
#   github:shawntan/scattermoe gives a git dir G; then
#     mkdir -p .carry/scattermoe && git --git-dir=G archive HEAD scattermoe LICENSE | tar x -C .carry/scattermoe
#     git --git-dir=G rev-parse HEAD > .carry/scattermoe/COMMIT
# Device calls: onnxruntime-gpu's parts first, back to back (the machine stays warm ~30 s between calls;
# /tmp stays while it is warm; a 40 MiB part leaves no room for the other carried paths in one call):
#   carry [".carry/ort-gpux/p0"]: mkdir -p /tmp/ortparts && cp .carry/ort-gpux/p0/* /tmp/ortparts/
#   carry [".carry/ort-gpux/pI"]: cp .carry/ort-gpux/pI/* /tmp/ortparts/      (every further part)
# (the wheel's own parts, ../shared/tools/ort-gpu-parts.sh, work the same: scripts/gpu/ort-unpack.sh
# takes either), then the runs (the first one unpacks /tmp/ortparts): carry [".carry/ort", ".carry/kernels",
# ".carry/scattermoe", ".carry/vllm"] (about 33 MiB with the tracked tree):
#   NAME=mixtral bash bench/run_gpu_bench.sh --shapes mixtral ...   (bench/results/README.md: every call)
#
# Environment: NAME (the run's name, default gpu-bench), BENCH_S (timeout of gpu_bench.py, default 540),
# LIB / FATBINS (a plugin / fatbin folder other than the carried ones), ORT_LAST_PART (a carried folder
# of onnxruntime-gpu's last part, copied to /tmp/ortparts before unpacking).
# Output in $OUT, named after the device (h100, h200, ... from nvidia-smi) and NAME: DEV-NAME.md (tables),
# DEV-NAME.json (meta + rows, written after every row), DEV-NAME.log. No chart (a call returns at most 8
# files: two runs fit in one call); `gpu_bench.py --render` draws it here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/smoe-out}; mkdir -p "$OUT"
dev=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o -i -E '[a-z][0-9]{2,3}' | head -1 | tr 'A-Z' 'a-z')
STEM=${dev:-gpu}-${NAME:-gpu-bench}
LOG=$OUT/$STEM.log
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee "$LOG"
bash scripts/gpu/ort-unpack.sh "${ORT_LAST_PART:-}" 2>&1 | tee -a "$LOG"
[ -d /tmp/ortgpu/onnxruntime ] || echo "warning: /tmp/ortgpu/onnxruntime missing: the ORT columns will be '-'" | tee -a "$LOG"
if [ -z "${LIB:-}" ]; then
  LIB=.carry/ort/libscattermoe_ort.so
  [ -f "$LIB.xz" ] && xz -dc "$LIB.xz" > /tmp/libscattermoe_ort.so && LIB=/tmp/libscattermoe_ort.so
fi
if [ -z "${FATBINS:-}" ]; then
  FATBINS=target/scattermoe-kernels
  if ls .carry/kernels/*.fatbin.xz > /dev/null 2>&1; then
    FATBINS=/tmp/bench-kernels && mkdir -p $FATBINS
    for f in .carry/kernels/*.fatbin.xz; do xz -dc "$f" > $FATBINS/$(basename "$f" .xz); done
  fi
fi
libs=$(ls -d /opt/torch/.venv/lib/python3.12/site-packages/nvidia/*/lib 2>/dev/null | paste -sd:)
export LD_LIBRARY_PATH=$libs:/tmp/ortgpu/onnxruntime/capi:${LD_LIBRARY_PATH:-}
export PYTHONPATH=/tmp/ortgpu${PYTHONPATH:+:$PYTHONPATH}
PYTHONUNBUFFERED=1 timeout "${BENCH_S:-540}" python3 bench/gpu_bench.py --lib "$LIB" --fatbin-dir "$FATBINS" \
  --triton-dir .carry/scattermoe --vllm-dir .carry/vllm --out "$OUT" --name "$STEM" --no-chart "$@" 2>&1 | tee -a "$LOG"
echo "gpu-bench $STEM rc=${PIPESTATUS[0]}" | tee -a "$LOG"
