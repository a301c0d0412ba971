"""The decode kernel's A/B table from run_decode_ab.sh's records (runs anywhere: it only reads them).

usage: python3 tests/gpu/decode_ab.py DIR     (DIR holds {four,fused,forced}-{1,2}.json)

Each record is bench_forward.py --only-auto --json: one row per (shape, T) with `ours_auto`, the
whole forward in a CUDA graph (ms), and `floor_ms`. Prints, per row, the floor and the median of the
runs of each arm in us, and each arm's ratio to `four` (the four kernels); `fused` is the decode
kernel where the library's choice takes it, `forced` wherever it can run."""
import json
import os
import statistics
import sys

ARMS = ("four", "fused", "forced")


def load(d):
    runs = {}
    for a in ARMS:
        runs[a] = [json.load(open(p)) for r in (1, 2) if os.path.exists(p := os.path.join(d, f"{a}-{r}.json"))]
    return runs


def table(runs):
    base = runs["four"][0]
    lines = ["us per forward, CUDA graph, median of the runs; ratios to the four kernels",
             f"{'shape':<12s} {'T':>3s} {'floor':>7s} " + " ".join(f"{a:>8s}" for a in ARMS) + "  fused/four forced/four"]
    key = lambda x: (x["shape"], x["T"])  # noqa: E731
    by_arm = {a: [{key(x): x["ours_auto"] * 1e3 for x in r} for r in runs[a]] for a in ARMS}
    for row in base:
        med = {}
        for a in ARMS:
            v = [r[key(row)] for r in by_arm[a] if key(row) in r]
            med[a] = statistics.median(v) if v else float("nan")
        lines.append(f"{row['shape']:<12s} {row['T']:>3d} {row['floor_ms'] * 1e3:7.1f} " + " ".join(f"{med[a]:8.1f}" for a in ARMS)
                     + f"  {med['fused'] / med['four']:10.3f} {med['forced'] / med['four']:11.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(load(sys.argv[1])))
