#!/usr/bin/env bash
# Bounded fuzzing for CI (about a minute of fuzzing, plus the first build): the structured
# mutator over the fixtures, then each libFuzzer target on the fixtures' corpus.
# Longer runs and their figures: docs/hardening.md.
#   SCATTERMOE_FUZZ=0            skip all of it
#   SCATTERMOE_FUZZ_SECONDS=N    seconds per libFuzzer target (default 20; seed 1 unless
#                                SCATTERMOE_FUZZ_SEED is set, so that a finding reruns the same way)
#   SCATTERMOE_MUTATE_RUNS=N     structured CLI runs (default 150, about 30 s; seed 1 unless
#                                SCATTERMOE_MUTATE_SEED is set: fixed, so CI is repeatable)
set -euo pipefail
cd "$(dirname "$0")"
[ "${SCATTERMOE_FUZZ:-1}" = 0 ] && { echo "fuzz: skipped (SCATTERMOE_FUZZ=0)"; exit 0; }
ROOT=$(cd .. && pwd)

# Structured mutation: every run ends cleanly, every successful rewrite matches its mutant in ORT.
"$ROOT/.venv/bin/python" mutate_cli.py --runs "${SCATTERMOE_MUTATE_RUNS:-150}" --jobs 2 --seed "${SCATTERMOE_MUTATE_SEED:-1}"

# libFuzzer through cargo-fuzz. The stable toolchain builds it with RUSTC_BOOTSTRAP=1 (cargo-fuzz
# passes nightly-only -Z flags); sanitizers off (-s none): the crate has no unsafe parsing code,
# and the targets look for panics, aborts, hangs and allocations beyond -rss_limit_mb.
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1 SCATTERMOE_NO_KERNELS=1
cargo fuzz build -s none
for t in load rewrite; do
  mkdir -p "corpus/$t"
  cp -n "$ROOT"/models/*.onnx "corpus/$t/"
  log=$(mktemp)
  rc=0
  cargo fuzz run -s none "$t" "corpus/$t" -- -seed="${SCATTERMOE_FUZZ_SEED:-1}" -max_total_time="${SCATTERMOE_FUZZ_SECONDS:-20}" -timeout=10 \
    -rss_limit_mb=2048 -max_len=1048576 -print_final_stats=1 >"$log" 2>&1 || rc=$?
  grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs|#[0-9]+ *DONE)" "$log" | sed "s/^/fuzz $t: /" || true
  if [ "$rc" != 0 ]; then
    # the panic message and libFuzzer's own error lines come before its long input dump: show them first
    echo "fuzz: $t failed (exit $rc):"; grep -E -A12 "panicked at|==[0-9]+== ERROR|deadly signal|out-of-memory|timeout after" "$log" | cut -c1-400 | head -n 60 || true
    tail -n 40 "$log" | cut -c1-400; ls "artifacts/$t" 2>/dev/null; exit 1
  fi
  rm -f "$log"
done
echo "fuzz: no crash, timeout or out-of-memory"
