#!/usr/bin/env bash
# Device side of bench/e2e (issue 19): whole MoE LMs, every column, one table and one chart.
# Nothing is built there: the CLI, the op library and onnxruntime-genai's wheel come carried
# (bench/e2e/carry.sh packs them), onnxruntime-gpu 1.31.1 in five parts (a tar.xz of its
# onnxruntime/ folder, .carry/ort-gpux/p0..p4). Work files stay in /tmp/e2e-work while the machine is
# warm (it is given back after 30 s idle: make the calls back to back).
#
# usage: bash bench/e2e/run.sh STAGE [STAGE ...]
#   part:DIR        keeps the onnxruntime-gpu part in DIR (/tmp/ortparts); unpacks .carry/e2e-cli if carried
#   setup:DIR       keeps the last part in DIR (-: every part came by part: already), unpacks onnxruntime-gpu
#                   into /tmp/ortgpu, the op library into
#                   /tmp/e2e-bin, the wheels into /tmp/e2e-genai
#   smoke           the whole path on CUDA at --tiny widths, in $DTYPE (float16 unless set), GPT-OSS (every column,
#                   CUDA graph rows, the check with its per-layer readings), into $OUT/smoke: about a minute
#   prepare:MODEL   build, export, rewrite (--no-prove unless PROVE=1), cut; GPT-OSS also the builder model
#   bench:MODEL     every column of a prepared model, then the report of every model benched so far;
#                   the model's files are removed after (the disk holds one model at a time)
#   report          the report alone
# MODEL: mixtral, qwen3 or gptoss. DTYPE=fp16 (default) or bf16: ONNX Runtime 1.31 does not load the bfloat16
# dynamo export (a bfloat16 TopK, invalid at opset 18), so in bf16 the export and rewritten columns are reported
# not runnable (naming the node) and only the builder pair is checked. Output in $OUT: e2e.md, e2e.json, e2e.png,
# e2e-<model>-<dtype>.json, e2e.log (this call's log). Exit status 1 when a stage failed: e2e.py exits 3 when
# a rewritten model's check failed or nothing was checked (the tables say which and why).
#
# Here (project root), before the calls: build with nvcc (target/release/scattermoe and
# libscattermoe_ort.so with kernels), then `bash bench/e2e/carry.sh`.
# The calls (carry lists exact; each call well under 10 minutes; expected times are estimates, the measured ones
# from one H100 run of fp16 GPT-OSS; each bench also opens a checking copy per ONNX column: ~1 s and 33 steps each):
#   1. carry [".carry/ort-gpux/p0", ".carry/e2e-cli"]: bash bench/e2e/run.sh part:.carry/ort-gpux/p0 prepare:mixtral   (~3 min)
#   2. carry [".carry/ort-gpux/p1"]: bash bench/e2e/run.sh part:.carry/ort-gpux/p1 prepare:qwen3                       (~3 min)
#   3. carry [".carry/ort-gpux/p2"]: bash bench/e2e/run.sh part:.carry/ort-gpux/p2                                     (seconds)
#   4. carry [".carry/ort-gpux/p3"]: bash bench/e2e/run.sh part:.carry/ort-gpux/p3                                     (seconds)
#   5. carry [".carry/ort-gpux/p4", ".carry/e2e"]: bash bench/e2e/run.sh setup:.carry/ort-gpux/p4 smoke               (~3 min)
#   6. carry []: bash bench/e2e/run.sh bench:mixtral                                                                    (~4 min)
#   7. carry []: bash bench/e2e/run.sh bench:qwen3                                                                      (~4 min)
#   8. carry []: bash bench/e2e/run.sh prepare:gptoss                                                 (~2.5 min; 2.1 min on H100)
#   9. carry []: bash bench/e2e/run.sh bench:gptoss                       (~1.5 min; 1.2 min on H100 before the checking copies)
# An op library with every target's kernels (a plain `cargo build --release`, about 29 MiB xz'd) does not fit one
# call beside the last part: carry the last part alone (call 5 as `part:`) and then .carry/e2e with `setup:-`.
# Each stage is bounded by STAGE_S (default 560 s) and a call by 600 s: keep one long stage per call.
# Call 9's $OUT holds the whole table (e2e.md, e2e.json, e2e.png). If the machine went cold between
# calls, start again from call 1 (the per-model JSONs already returned can be merged here:
# mkdir -p D/results && cp e2e-*.json D/results/ && python3 bench/e2e/e2e.py report --work D --out D).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/e2e-out}; mkdir -p "$OUT"
DTYPE=${DTYPE:-fp16}
WORK=${WORK:-/tmp/e2e-work}
BIN=/tmp/e2e-bin
LOG="$OUT/e2e.log"
libs=$(ls -d /opt/torch/.venv/lib/python3.12/site-packages/nvidia/*/lib 2>/dev/null | paste -sd:)
export LD_LIBRARY_PATH=$libs:/tmp/ortgpu/onnxruntime/capi:${LD_LIBRARY_PATH:-}
export PYTHONPATH=/tmp/ortgpu${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
rewrite_args=--no-prove
[ "${PROVE:-0}" = 1 ] && rewrite_args=""
rewrite_args="$rewrite_args ${REWRITE_EXTRA:-}"  # e.g. REWRITE_EXTRA=--keep-router (the A/B of router fusion)

e2e() {  # WORK OUT ARGS...: e2e.py with the carried binaries; bounded so that the call returns its output
  local work=$1 out=$2
  shift 2
  timeout "${STAGE_S:-560}" python3 bench/e2e/e2e.py "$@" --work "$work" --out "$out" --cli "$BIN/scattermoe" \
    --lib "$BIN/libscattermoe_ort.so" --rewrite-args="$rewrite_args" --builder-pythonpath /tmp/e2e-genai 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "e2e.py $1 rc=$rc" | tee -a "$LOG"
  return "$rc"
}

unpack_cli() {
  if [ -f .carry/e2e-cli/scattermoe.xz ]; then
    mkdir -p $BIN && xz -dc .carry/e2e-cli/scattermoe.xz > $BIN/scattermoe && chmod +x $BIN/scattermoe
  fi
}

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader; df -h /tmp | tail -1; } 2>&1 | tee -a "$LOG"
status=0
for stage in "$@"; do
  echo "== $stage $(date +%T)" | tee -a "$LOG"
  case "$stage" in
    part:*)
      mkdir -p /tmp/ortparts && cp "${stage#part:}"/* /tmp/ortparts/ || status=1
      unpack_cli ;;
    setup:*)
      unpack_cli
      bash scripts/gpu/ort-unpack.sh "${stage#setup:}" 2>&1 | tee -a "$LOG"
      [ -d /tmp/ortgpu/onnxruntime ] || { echo "onnxruntime-gpu unpack failed" | tee -a "$LOG"; exit 1; }
      mkdir -p $BIN && xz -dc .carry/e2e/libscattermoe_ort.so.xz > $BIN/libscattermoe_ort.so || exit 1
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/e2e-genai .carry/e2e/whl/*.whl \
        2>&1 | tail -3 | tee -a "$LOG"
      python3 -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tee -a "$LOG"
      [ -x $BIN/scattermoe ] || { echo "no CLI: carry .carry/e2e-cli in an earlier call or this one" | tee -a "$LOG"; exit 1; } ;;
    smoke)
      e2e /tmp/e2e-smoke "$OUT/smoke" all --tiny --device cuda --dtype "$DTYPE" --models gptoss || status=1
      rm -rf /tmp/e2e-smoke ;;
    prepare:*) e2e "$WORK" "$OUT" prepare --models "${stage#prepare:}" --dtype "$DTYPE" || status=1 ;;
    bench:*) e2e "$WORK" "$OUT" bench --models "${stage#bench:}" --dtype "$DTYPE" || status=1 ;;
    report) e2e "$WORK" "$OUT" report || status=1 ;;
    *) echo "unknown stage $stage" | tee -a "$LOG"; status=2 ;;
  esac
done
df -h /tmp | tail -1 | tee -a "$LOG"
exit $status
