#!/usr/bin/env bash
# Where wgmma_ws's quantized form spends its time (gemm_hopper_ws.cuh "Quantized W"): one launch of
# GEMM1 at Mixtral's shape under ncu, per format, then the warp-stall samples by source line
# (tests/gpu/ncu_source_summary.py) and the throughput sections. Nothing is built on the device.
# usage (device): bash tests/gpu/profile_qwgmma.sh      (FORMATS: default fp8,int4; TOKENS: 1024)
# Here, before the call: the sm_90a fatbins in .carry/kernels (tests/gpu/run_skinny.sh's header);
# carry [".carry/kernels"]. Back in $OUT: qprof-FMT.ncu-rep, qprof-FMT-source.csv, qprof-FMT.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/smoe-out}; mkdir -p "$OUT"
KB=/tmp/qprof-kernels
mkdir -p $KB && for f in .carry/kernels/*.fatbin.xz; do xz -dc "$f" > $KB/$(basename "$f" .xz); done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
for fmt in $(echo "${FORMATS:-fp8,int4}" | tr , ' '); do
  timeout "${PROFILE_S:-150}" ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section SourceCounters --section WarpStateStats --section Occupancy \
    -k "regex:scattermoe_qgemm_bf16_.*_wgmma_ws" -c 1 -f -o "$OUT/qprof-$fmt" \
    python3 tests/gpu/bench_qgemm.py --fatbin-dir $KB --shapes mixtral --tokens "${TOKENS:-1024}" --formats "$fmt" \
    --gemms g1 --cfgs wgmma_ws --reps 1 --warmup 0 --no-flush > "$OUT/qprof-$fmt.txt" 2>&1
  echo "ncu $fmt rc=$?"
  ncu -i "$OUT/qprof-$fmt.ncu-rep" --page source --csv --print-source sass > "$OUT/qprof-$fmt-source.csv" 2>&1
  ncu -i "$OUT/qprof-$fmt.ncu-rep" --page details >> "$OUT/qprof-$fmt.txt" 2>&1
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Executed Ipc A|Registers|Achieved Occupancy" "$OUT/qprof-$fmt.txt" | head -12
  python3 tests/gpu/ncu_source_summary.py "$OUT/qprof-$fmt-source.csv" --top 25 | tee -a "$OUT/qprof-$fmt.txt" | head -70
done
