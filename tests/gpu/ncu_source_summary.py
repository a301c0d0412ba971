"""Summarise ncu's per-instruction source page of one kernel: where the warp-stall samples fall.
usage: ncu -i REPORT --page source --csv --print-source sass > K.csv   (a report taken with
       --section SourceCounters --section WarpStateStats)
       python3 tests/gpu/ncu_source_summary.py K.csv [--top N] [--exec LO,HI]
Prints the stall reasons over the whole kernel, the samples grouped by how often an instruction ran
(instructions of one loop body run equally often, so this separates main loop, per-tile code and
epilogue without symbols), the top instructions, and with --exec the same for the instructions whose
execution count lies in [LO, HI]."""
import argparse
import collections
import csv


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def opcode(src):
    parts = src.split()
    if not parts:
        return ""
    return parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--exec", default=None, help="LO,HI: detail the instructions executed LO..HI times")
    a = ap.parse_args()
    with open(a.csv) as f:
        r = csv.reader(f)
        kern = next(r)
        hdr = next(r)
        rows = [dict(zip(hdr, x)) for x in r if len(x) >= len(hdr)]
    samp = "Warp Stall Sampling (All Samples)"
    stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    tot = sum(num(d[samp]) for d in rows) or 1.0

    def reasons(sel):
        agg = collections.Counter()
        for d in sel:
            for c in stalls:
                agg[c] += num(d[c])
        s = sum(agg.values()) or 1.0
        return ", ".join(f"{c[6:]} {v / s * 100:.0f}%" for c, v in agg.most_common(8))

    print(f"{kern[1] if len(kern) > 1 else kern}: {len(rows)} instructions, {tot:.0f} samples")
    print("stall reasons:", reasons(rows))
    by, n = collections.Counter(), collections.Counter()
    for d in rows:
        by[num(d["Instructions Executed"])] += num(d[samp])
        n[num(d["Instructions Executed"])] += 1
    print("\nsamples by execution count (warp-level instructions executed):")
    for ex, s in by.most_common(15):
        print(f"  executed {ex:>12.0f}  instructions {n[ex]:5d}  samples {s / tot * 100:5.1f}%")

    def top(sel, k):
        for d in sorted(sel, key=lambda d: -num(d[samp]))[:k]:
            t = sorted(((num(d[c]), c[6:]) for c in stalls), reverse=True)[:3]
            print(f"  {num(d[samp]) / tot * 100:5.2f}% {d['Address'][-6:]} {d['Source'][:72]:72s} "
                  f"exec={d['Instructions Executed']} | " + " ".join(f"{nm}={v:.0f}" for v, nm in t))

    print(f"\ntop {a.top} instructions by samples:")
    top(rows, a.top)
    if a.exec:
        lo, hi = (float(v) for v in a.exec.split(","))
        sel = [d for d in rows if lo <= num(d["Instructions Executed"]) <= hi]
        s = sum(num(d[samp]) for d in sel)
        print(f"\nexecuted {lo:.0f}..{hi:.0f} times: {len(sel)} instructions, {s / tot * 100:.1f}% of samples;",
              reasons(sel))
        print("  opcodes:", collections.Counter(opcode(d["Source"]) for d in sel).most_common(20))
        top(sel, a.top)


if __name__ == "__main__":
    main()
